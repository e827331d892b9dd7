"""Auxiliary losses for sigmoid gates average per-token normalised scores (DeepSeek-V3 eq. 19-20).

With raw sigmoid scores an ``f . P`` loss can be lowered by shrinking every score, without moving a
token; these tests pin the numbers of issue 11 item 2 (docs/balancing.md).
"""

import pytest
import torch

from moebalance.balancing import Balancing
from moebalance.losses import batch_aux_loss, global_batch_aux_loss, normalize_scores, sequence_aux_loss
from moebalance.metrics import max_violation
from moebalance.routing import RouterOutput, TopKRouter


def _all_on_expert_zero(requires_grad=True):
    """E=4, K=1, 8 tokens (2 sequences of 4), sigmoid scores of logits near -50, expert 0 highest."""
    logits = torch.full((8, 4), -50.0)
    logits[:, 0] = -49.5
    logits.requires_grad_(requires_grad)
    scores = torch.sigmoid(logits)
    indices = torch.zeros(8, 1, dtype=torch.long)
    return logits, scores, indices


LOSSES = {
    "sequence": lambda s, idx: sequence_aux_loss(s, idx, seq_len=4),
    "batch": lambda s, idx: batch_aux_loss(s, idx),
    "global": lambda s, idx: global_batch_aux_loss(s, torch.tensor([8.0, 0, 0, 0]), top_k=1),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_raw_sigmoid_scores_make_the_loss_vanish_normalised_ones_do_not(name):
    logits, scores, indices = _all_on_expert_zero()
    raw = LOSSES[name](scores, indices)
    (grad_raw,) = torch.autograd.grad(raw, logits)
    assert raw.item() < 1e-20 and grad_raw.abs().max().item() < 1e-20  # blind to a total collapse
    logits, scores, indices = _all_on_expert_zero()
    norm = LOSSES[name](normalize_scores(scores), indices)
    (grad_norm,) = torch.autograd.grad(norm, logits)
    # s'_0 = e^0.5 / (e^0.5 + 3) = 0.355; f_0 = E = 4: the loss reads the collapse (balanced: 1).
    assert norm.item() == pytest.approx(4 * 0.3547, rel=1e-3)
    assert grad_norm[:, 0].min().item() > 1e-2  # pushes expert 0's logits down
    assert grad_norm[:, 1:].max().item() < -1e-3  # and the others up


def test_deepseek_v3_strategy_is_eq_17_to_20():
    # Sigmoid router, E=4, K=2, two sequences of four tokens, uniform scores: sum_i f_i P_i = 1.
    router = TopKRouter(8, num_experts=4, top_k=2, score_func="sigmoid")
    torch.nn.init.zeros_(router.weight)  # every logit 0: every score 0.5
    out = router(torch.randn(2, 4, 8))
    assert torch.all(out.scores == 0.5)
    loss, _ = Balancing("deepseek_v3", seq_aux_coeff=1.0).loss([out])
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    raw, _ = Balancing("deepseek_v3", seq_aux_coeff=1.0, aux_loss_scores="raw").loss([out])
    assert raw.item() == pytest.approx(2.0, abs=1e-6)  # the unnormalised value: sum_i P_i = 4 * 0.5


@pytest.mark.parametrize("strategy", ["aux_loss", "batch_aux_loss", "global_aux_loss", "deepseek_v3"])
def test_every_f_p_strategy_reads_the_collapse(strategy):
    logits, scores, indices = _all_on_expert_zero(requires_grad=False)
    out = RouterOutput(
        gates=torch.ones(8, 1), indices=indices, scores=scores, logits=logits,
        tokens_per_expert=torch.tensor([8, 0, 0, 0]), seq_len=4,
    )
    kw = {"seq_aux_coeff": 1.0} if strategy == "deepseek_v3" else {"aux_loss_coeff": 1.0}
    assert Balancing(strategy, **kw).loss([out])[0].item() > 1.0
    assert Balancing(strategy, aux_loss_scores="raw", **kw).loss([out])[0].item() < 1e-20


def test_balanced_value_is_one_for_both_gates():
    indices = torch.tensor([[0, 1], [2, 3]] * 4)  # f_i = 1 for every expert
    for scores in (torch.rand(8, 4).softmax(-1), torch.rand(8, 4).sigmoid()):
        value = batch_aux_loss(normalize_scores(scores), indices)
        torch.testing.assert_close(value, torch.tensor(1.0))
    softmax = torch.randn(8, 4).softmax(-1)
    torch.testing.assert_close(normalize_scores(softmax), softmax)  # the identity for softmax


def _optimise_batch_aux_loss(scores_mode: str, score_func: str = "sigmoid"):
    """Adam on the router alone, minimising batch_aux_loss on one fixed batch whose tokens share a
    common component (as hidden states do); returns (MaxVio before, after, mean score after)."""
    torch.manual_seed(0)
    router = TopKRouter(16, num_experts=4, top_k=1, score_func=score_func)
    x = torch.ones(1024, 16) + 0.5 * torch.randn(1024, 16)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    before = max_violation(router(x).tokens_per_expert).item()
    for _ in range(150):
        out = router(x)
        scores = normalize_scores(out.scores) if scores_mode == "normalized" else out.scores
        loss = batch_aux_loss(scores, out.indices)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = router(x)
    return before, max_violation(out.tokens_per_expert).item(), out.scores.mean().item()


def test_optimising_the_normalised_loss_balances_a_sigmoid_gate():
    before, after, mean_score = _optimise_batch_aux_loss("normalized")
    assert before > 1.5 and after < 0.1 and mean_score > 0.3
    _, soft_after, _ = _optimise_batch_aux_loss("normalized", "softmax")
    assert soft_after < 0.1


def test_optimising_the_raw_loss_shrinks_the_scores_instead():
    before, after, mean_score = _optimise_batch_aux_loss("raw")
    assert mean_score < 0.01  # the loss fell by shrinking every score ...
    assert after > 1.0  # ... and the routing stayed far from balanced (MaxVio 0 is balanced)


def test_unknown_aux_loss_scores():
    with pytest.raises(ValueError, match="aux_loss_scores must be 'normalized' or 'raw'"):
        Balancing("aux_loss", aux_loss_scores="softmax")
