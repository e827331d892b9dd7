import pytest
import torch

from moebalance.metrics import (
    coefficient_of_variation,
    dead_experts,
    expert_set_changes,
    load_share,
    lost_choices,
    max_violation,
)


def test_maxvio_hand_made():
    assert max_violation(torch.tensor([4, 4, 4, 4])).item() == 0.0
    # mean 4, max 10 -> (10-4)/4 = 1.5
    assert max_violation(torch.tensor([10, 2, 4, 0])).item() == pytest.approx(1.5)
    # one expert takes everything: E - 1
    assert max_violation(torch.tensor([0, 0, 12, 0, 0, 0])).item() == pytest.approx(5.0)


def test_maxvio_per_layer():
    loads = torch.tensor([[4, 4, 4, 4], [10, 2, 4, 0], [0, 0, 0, 0]])
    vio = max_violation(loads)
    assert vio.shape == (3,)
    assert vio.tolist() == pytest.approx([0.0, 1.5, 0.0])


def test_maxvio_bad_input():
    with pytest.raises(ValueError, match="tokens_per_expert"):
        max_violation(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        max_violation(torch.tensor([1, -1]))


def test_other_metrics():
    loads = torch.tensor([[2.0, 2.0, 0.0, 4.0]])
    assert dead_experts(loads).tolist() == [1]
    assert load_share(loads).sum().item() == pytest.approx(1.0)
    assert coefficient_of_variation(loads).item() == pytest.approx(torch.tensor([2.0, 2, 0, 4]).std(unbiased=False).item() / 2)


def test_maxvio_rejects_non_finite_loads():
    with pytest.raises(ValueError, match="finite"):
        max_violation(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="finite"):
        max_violation(torch.tensor([1.0, float("inf")]))


def test_expert_set_changes_ignore_order_and_count_lost_choices():
    before = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    after = torch.tensor([[1, 0], [2, 4], [0, 1], [6, 7]])  # same set; one lost; both lost; same
    assert lost_choices(before, after).tolist() == [0, 1, 2, 0]
    tokens, choices = expert_set_changes(before, after)
    assert tokens == pytest.approx(2 / 4)
    assert choices == pytest.approx(3 / 8)
    assert expert_set_changes(before, before) == (0.0, 0.0)


@pytest.mark.parametrize(
    "before, after",
    [
        (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long)),  # other K
        (torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)),  # not [T, K]
        (torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)),  # no token
        (torch.zeros(3, 2), torch.zeros(3, 2)),  # not ids
    ],
)
def test_expert_set_changes_refuse_bad_input(before, after):
    with pytest.raises(ValueError, match="before_TK|integers"):
        expert_set_changes(before, after)


def test_layer_routing_changes_count_a_token_once_over_layers():
    from moebalance.metrics import layer_routing_changes

    before = [torch.tensor([[0, 1], [2, 3], [0, 1]]), torch.tensor([[0, 1], [2, 3], [0, 1]])]
    after = [torch.tensor([[0, 1], [2, 4], [0, 1]]), torch.tensor([[1, 0], [2, 4], [0, 2]])]
    res = layer_routing_changes(before, after)
    assert res["tokens_per_layer"] == pytest.approx([1 / 3, 2 / 3])
    assert res["choices_per_layer"] == pytest.approx([1 / 6, 2 / 6])
    assert res["tokens_any_layer"] == pytest.approx(2 / 3)  # token 1 changed in both layers: counted once
    with pytest.raises(ValueError, match="one \\[T, K\\] tensor per layer"):
        layer_routing_changes(before, after[:1])
    with pytest.raises(ValueError, match="same tokens"):
        layer_routing_changes([before[0], before[1][:2]], [after[0], after[1][:2]])
