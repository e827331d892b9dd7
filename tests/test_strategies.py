"""Balancing strategies by name (moebalance.balancing.Balancing) and their config."""

import pytest
import torch
from torch import nn

from moebalance.balancing import STRATEGIES, Balancing, GlobalBatchCounts
from moebalance.losses import (
    batch_aux_loss,
    global_batch_aux_loss,
    importance_loss,
    normalize_scores,
    router_z_loss,
    sequence_aux_loss,
)
from moebalance.moe import MoELayer
from moebalance.train.config import BalanceConfig, RunConfig, apply_overrides, get_preset


def _two_layers(x):
    model = nn.ModuleList([MoELayer(8, 16, 4, 2), MoELayer(8, 16, 4, 2)]).train()
    return model, [layer(x).routing for layer in model]


EXPECTED = {  # strategy -> (unscaled per-layer loss, bias updated)
    "none": (None, False),
    "loss_free": (None, True),
    # P from per-token normalised scores (the default balance.aux_loss_scores="normalized").
    "aux_loss": (lambda r: sequence_aux_loss(normalize_scores(r.scores), r.indices, r.seq_len, r.mask), False),
    "batch_aux_loss": (lambda r: batch_aux_loss(normalize_scores(r.scores), r.indices, r.mask), False),
    "global_aux_loss": (lambda r: batch_aux_loss(normalize_scores(r.scores), r.indices, r.mask), False),  # one micro-batch
    "importance_loss": (lambda r: importance_loss(normalize_scores(r.scores), r.mask), False),
    "deepseek_v3": (lambda r: sequence_aux_loss(normalize_scores(r.scores), r.indices, r.seq_len, r.mask), True),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_adds_its_loss_and_updates_its_bias(strategy):
    assert set(EXPECTED) == set(STRATEGIES)
    x = torch.randn(3, 5, 8)
    model, routing = _two_layers(x)
    bal = Balancing(strategy, aux_loss_coeff=1e-2, seq_aux_coeff=1e-4, z_loss_coeff=1e-3)
    loss, parts = bal.loss(routing)
    fn, updates_bias = EXPECTED[strategy]
    z = 1e-3 * sum(router_z_loss(r.logits, r.mask) for r in routing)
    coeff = 1e-4 if strategy == "deepseek_v3" else 1e-2
    expected = z if fn is None else z + coeff * sum(fn(r) for r in routing)
    torch.testing.assert_close(loss, expected)
    assert ("aux_loss" in parts) == (fn is not None) and "z_loss" in parts
    bal.after_step(model)
    moved = any(layer.router.expert_bias.abs().sum() > 0 for layer in model)
    assert moved == updates_bias
    assert all(layer.router.load_counts.sum() == 0 for layer in model)


def test_zero_coefficient_adds_nothing():
    _, routing = _two_layers(torch.randn(2, 4, 8))
    assert Balancing("aux_loss", aux_loss_coeff=0.0).loss(routing) == (None, {})


def test_global_counts_accumulate_over_micro_batches_and_reset_after_step():
    layer = MoELayer(8, 16, 4, 2).train()
    calls = []

    def fake_all_reduce(t):  # a second rank with the same load
        calls.append(t.clone())
        t.mul_(2)

    bal = Balancing("global_aux_loss", aux_loss_coeff=1.0, all_reduce=fake_all_reduce)
    r1, r2 = layer(torch.randn(2, 4, 8)).routing, layer(torch.randn(2, 4, 8)).routing
    l1, _ = bal.loss([r1])
    torch.testing.assert_close(l1, global_batch_aux_loss(normalize_scores(r1.scores), 2 * r1.tokens_per_expert.float(), 2))
    l2, _ = bal.loss([r2])
    both = 2 * (r1.tokens_per_expert + r2.tokens_per_expert).float()
    torch.testing.assert_close(l2, global_batch_aux_loss(normalize_scores(r2.scores), both, 2))
    assert [c.sum().item() for c in calls] == [16.0, 16.0]  # each micro-batch reduced once, not the running sum
    bal.after_step(layer)
    assert bal.global_counts.counts_LE is None


def test_global_counts_skip_masked_tokens():
    layer = MoELayer(8, 16, 4, 2)
    mask = torch.tensor([[True, True, False, False]])
    counts = GlobalBatchCounts().add([layer(torch.randn(1, 4, 8), mask).routing])
    assert counts.sum().item() == 2 * 2


def test_unknown_strategy_and_bad_coefficients():
    with pytest.raises(ValueError, match="strategy"):
        Balancing("magic")
    with pytest.raises(ValueError, match="seq_aux_coeff"):
        Balancing("deepseek_v3", seq_aux_coeff=-1)
    with pytest.raises(ValueError, match="balance.strategy"):
        BalanceConfig(strategy="magic")
    with pytest.raises(ValueError, match="balance.seq_aux_coeff"):
        BalanceConfig(seq_aux_coeff=-1e-4)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_is_selectable_from_the_cli_syntax(strategy):
    cfg = apply_overrides(get_preset("smoke"), [f"balance.strategy={strategy}"])
    assert Balancing.from_config(cfg.balance).strategy == strategy


def test_expert_choice_only_without_balancing():
    with pytest.raises(ValueError, match="balance.strategy"):
        apply_overrides(get_preset("smoke"), ["model.routing=expert_choice"])  # default strategy: loss_free
    cfg = apply_overrides(get_preset("smoke"), ["model.routing=expert_choice", "balance.strategy=none"])
    assert isinstance(cfg, RunConfig)
    with pytest.raises(ValueError, match="model.expert_choice_capacity"):
        apply_overrides(get_preset("smoke"), ["model.expert_choice_capacity=0"])
    with pytest.raises(ValueError, match="model.routing"):
        apply_overrides(get_preset("smoke"), ["model.routing=random"])
