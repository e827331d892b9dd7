"""Activation checkpointing (model.activation_checkpointing) does not double-count expert loads."""

import pytest
import torch

import moebalance.routing as routing
from moebalance.train.config import ModelConfig
from moebalance.train.model import MoETransformer

B, S, K = 3, 10, 2


def pair(**kw):
    cfg = dict(vocab_size=50, d_model=16, n_heads=2, n_layers=3, max_seq_len=16, num_experts=6, top_k=K, d_expert=8, **kw)
    plain = MoETransformer(ModelConfig(**cfg))
    recomputed = MoETransformer(ModelConfig(**cfg, activation_checkpointing=True))
    recomputed.load_state_dict(plain.state_dict())
    for router in plain.routers:  # distinct biases, so routing is not the trivial bias-0 case
        router.expert_bias.copy_(torch.randn(router.num_experts) * 0.1)
    recomputed.load_state_dict(plain.state_dict())
    return plain, recomputed


def step(model, tokens):
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    return torch.stack([r.load_counts for r in model.routers])


@pytest.mark.parametrize("first_dense_layers,shared", [(0, 0), (1, 1)])
def test_counts_equal_with_and_without_recompute(first_dense_layers, shared):
    plain, recomputed = pair(first_dense_layers=first_dense_layers, num_shared_experts=shared)
    tokens = torch.randint(0, 50, (B, S + 1))
    counts_plain, counts_re = step(plain, tokens), step(recomputed, tokens)
    assert torch.equal(counts_plain, counts_re)
    assert (counts_re.sum(-1) == K * B * S).all()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_really_reruns_the_router(monkeypatch):
    # Without the guard the recomputed forward counts every token again: the test above would see
    # doubled counts, so it does check something.
    monkeypatch.setattr(routing, "_in_backward_recompute", lambda: False)
    plain, recomputed = pair()
    tokens = torch.randint(0, 50, (B, S + 1))
    assert torch.equal(2 * step(plain, tokens), step(recomputed, tokens))


def test_no_recompute_in_eval_or_no_grad():
    _, recomputed = pair()
    recomputed.eval()
    with torch.no_grad():
        recomputed(torch.randint(0, 50, (B, S)))
    assert all(not r.load_counts.any() for r in recomputed.routers)
