"""Expert Choice routing (Zhou et al. 2022) as a routing mode of MoELayer and the LM."""

import pytest
import torch
import torch.nn.functional as F

from moebalance.balancing import Balancing
from moebalance.moe import MoELayer
from moebalance.routing import ExpertChoiceRouter, chosen_experts, expert_choice_capacity
from moebalance.train.config import ModelConfig
from moebalance.train.model import MoETransformer


@pytest.mark.parametrize(
    "T,E,K,cf,expected",
    [(64, 8, 2, 1.0, 16), (64, 8, 2, 1.25, 20), (10, 4, 1, 1.0, 3), (5, 2, 2, 4.0, 5), (3, 8, 1, 0.1, 1)],
)
def test_capacity(T, E, K, cf, expected):
    assert expert_choice_capacity(T, E, K, cf) == expected


def test_capacity_rejects_non_positive_factor():
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(8, 4, 2, capacity_factor=0.0)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_each_expert_takes_its_best_tokens_with_unbiased_gates(score_func):
    router = ExpertChoiceRouter(8, 4, 2, score_func=score_func)
    router.expert_bias.copy_(torch.tensor([5.0, -5.0, 0.0, 1.0]))  # ignored by expert choice
    x = torch.randn(3, 6, 8)
    out = router(x)
    assert out.capacity == 9 and out.indices.shape == (4, 9)
    assert out.tokens_per_expert.tolist() == [9] * 4
    for e in range(4):
        best = out.scores[:, e].topk(9).indices
        assert set(out.indices[e].tolist()) == set(best.tolist())
        torch.testing.assert_close(out.gates[e], out.scores[out.indices[e], e])
    assert chosen_experts(out).sum().item() == 36


def test_norm_and_scale_of_gates():
    router = ExpertChoiceRouter(8, 4, 2, norm_topk_prob=True, route_scale=2.0)
    out = router(torch.randn(16, 8))
    per_token = torch.zeros(16).index_add(0, out.indices.reshape(-1), out.gates.reshape(-1))
    taken = chosen_experts(out).any(-1)
    torch.testing.assert_close(per_token[taken], torch.full((int(taken.sum()),), 2.0))


def test_padding_is_never_taken_and_sets_the_capacity():
    router = ExpertChoiceRouter(8, 4, 2)
    mask = torch.tensor([[True] * 6 + [False] * 2, [True] * 2 + [False] * 6])
    out = router(torch.randn(2, 8, 8), mask)
    assert out.capacity == expert_choice_capacity(8, 4, 2, 1.0) == 4
    assert mask.reshape(-1)[out.indices.reshape(-1)].all()


def test_load_counted_in_training_only():
    router = ExpertChoiceRouter(8, 4, 2).train()
    router(torch.randn(12, 8))
    assert router.load_counts.tolist() == [6.0] * 4
    router.eval()(torch.randn(12, 8))
    assert router.load_counts.tolist() == [6.0] * 4


@pytest.mark.parametrize("shared", [0, 1])
def test_moe_layer_matches_a_token_loop(shared):
    layer = MoELayer(8, 16, 4, 2, num_shared_experts=shared, routing="expert_choice", expert_choice_capacity=1.5).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    res = layer(x)
    r, e = res.routing, layer.experts
    expected = torch.zeros_like(x) if layer.shared_experts is None else layer.shared_experts(x)
    for i in range(4):
        for slot, t in enumerate(r.indices[i].tolist()):
            u = x[t]
            expected[t] += r.gates[i, slot] * (e.w2[i] @ (F.silu(e.w1[i] @ u) * (e.w3[i] @ u)))
    torch.testing.assert_close(res.output, expected)


def test_lm_with_expert_choice_trains_and_is_balanced():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, num_experts=4, top_k=1, d_expert=8, routing="expert_choice")
    model = MoETransformer(cfg).train()
    tokens = torch.randint(0, 50, (2, 8))
    out = model(tokens, tokens)
    out.loss.backward()
    assert model.routers[0].weight.grad is not None
    assert all(r.tokens_per_expert.tolist() == [4] * 4 for r in out.routing)
    loads = Balancing("none").after_step(model)
    assert loads.tolist() == [[4.0] * 4] * 2
    with pytest.raises(ValueError, match="expert-choice"):
        Balancing("batch_aux_loss").loss(out.routing)


def test_weights_move_between_topk_and_expert_choice():
    a = MoELayer(8, 16, 4, 2)
    b = MoELayer(8, 16, 4, 2, routing="expert_choice")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.router.weight, a.router.weight)
