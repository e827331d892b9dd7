"""The auxiliary losses of moebalance.losses: normalisation, masks, hand-computed values."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebalance.losses import (
    batch_aux_loss,
    expert_counts,
    global_batch_aux_loss,
    importance_loss,
    router_z_loss,
    sequence_aux_loss,
)
from moebalance.routing import route_topk


def _routing(T, E, K, softmax=True):
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    scores = logits.softmax(-1) if softmax else logits.sigmoid()
    return logits, scores, route_topk(scores.detach(), K)


def test_batch_loss_by_hand():
    # T=4 tokens, E=3 experts, K=1: f = E/(K T) * counts, P = mean scores.
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    indices = torch.tensor([[0], [0], [1], [0]])
    f = torch.tensor([3 / 4 * 3, 3 / 4 * 1, 0.0])
    torch.testing.assert_close(batch_aux_loss(scores, indices), (f * scores.mean(0)).sum())


def test_batch_loss_pools_sequences_unlike_sequence_loss():
    # Sequence 1 sends everything to expert 0, sequence 2 to expert 1: each sequence is collapsed
    # (sequence loss high), the batch is balanced (batch loss = sum P = 1).
    scores = torch.full((4, 2), 0.5)
    indices = torch.tensor([[0], [0], [1], [1]])
    torch.testing.assert_close(batch_aux_loss(scores, indices), torch.tensor(1.0))
    torch.testing.assert_close(sequence_aux_loss(scores, indices, seq_len=2), torch.tensor(2 * 0.5))
    torch.testing.assert_close(batch_aux_loss(scores, indices), sequence_aux_loss(scores, indices, seq_len=4))


@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (6, 3)])
def test_balanced_value_is_one_for_softmax(E, K):
    scores = torch.softmax(torch.randn(E * 4, E), -1)
    indices = (torch.arange(E * 4)[:, None] * K + torch.arange(K)) % E  # each expert 4*K times
    torch.testing.assert_close(expert_counts(indices, E), torch.full((E,), 4.0 * K))
    torch.testing.assert_close(batch_aux_loss(scores, indices), torch.tensor(1.0))


def test_global_loss_with_local_counts_is_the_batch_loss():
    _, scores, idx = _routing(12, 4, 2)
    counts = expert_counts(idx, 4)
    torch.testing.assert_close(global_batch_aux_loss(scores, counts, 2), batch_aux_loss(scores, idx).double(), check_dtype=False)


def test_global_loss_over_micro_batches_equals_batch_loss_of_the_whole():
    # f from the whole global batch, P per micro-batch: the mean over equal micro-batches gives the
    # loss (and the gradient) of the global batch.
    logits, scores, idx = _routing(16, 4, 2)
    counts = expert_counts(idx, 4)
    parts = [global_batch_aux_loss(scores[i : i + 8], counts, 2) for i in (0, 8)]
    mean = (parts[0] + parts[1]) / 2
    whole = batch_aux_loss(scores, idx)
    torch.testing.assert_close(mean.float(), whole.float())
    g1 = torch.autograd.grad(mean, logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(whole, logits)[0]
    torch.testing.assert_close(g1.float(), g2.float())


def test_global_loss_rejects_wrong_counts_shape():
    _, scores, _ = _routing(4, 4, 1)
    with pytest.raises(ValueError, match="global_counts_E"):
        global_batch_aux_loss(scores, torch.ones(3), 1)


def test_importance_loss_values():
    E = 4
    p = torch.softmax(torch.randn(10, E), -1)
    P = p.mean(0)
    torch.testing.assert_close(importance_loss(p), E * ((P - 1 / E) ** 2).sum())  # SPEC §3 form
    assert importance_loss(torch.full((5, E), 0.3)).item() == 0.0
    onehot = torch.zeros(5, E)
    onehot[:, 2] = 1.0
    torch.testing.assert_close(importance_loss(onehot), torch.tensor(E - 1.0))
    sig = torch.rand(7, E)
    torch.testing.assert_close(importance_loss(3 * sig), importance_loss(sig))  # scale-free


def test_importance_loss_gradient_reaches_unselected_experts():
    logits = torch.randn(6, 4, requires_grad=True)
    importance_loss(logits.softmax(-1)).backward()
    assert (logits.grad.abs().sum(0) > 0).all()


def test_z_loss_finite_with_gradient_for_huge_logits():
    logits = torch.tensor([[1000.0, -300.0, 5.0], [-1000.0, -1000.0, 0.0]], requires_grad=True)
    z = router_z_loss(logits)
    z.backward()
    assert torch.isfinite(z) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(z, torch.tensor((1000.0**2 + 0.0) / 2))


LOSSES = {
    "batch": lambda s, l, i, m: batch_aux_loss(s, i, m),
    "sequence": lambda s, l, i, m: sequence_aux_loss(s, i, s.shape[0], m),
    "global": lambda s, l, i, m: global_batch_aux_loss(s, expert_counts(i, s.shape[1], m), i.shape[1], m),
    "importance": lambda s, l, i, m: importance_loss(s, m),
    "z": lambda s, l, i, m: router_z_loss(l, m),
    "counts": lambda s, l, i, m: expert_counts(i, s.shape[1], m),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 12), E=st.integers(2, 6), data=st.data())
def test_padding_counts_for_nothing(name, T, E, data):
    K = data.draw(st.integers(1, E))
    keep = data.draw(st.lists(st.booleans(), min_size=T, max_size=T).filter(any))
    mask = torch.tensor(keep)
    logits, scores, idx = _routing(T, E, K, softmax=data.draw(st.booleans()))
    fn = LOSSES[name]
    torch.testing.assert_close(fn(scores, logits, idx, mask), fn(scores[mask], logits[mask], idx[mask], None))
