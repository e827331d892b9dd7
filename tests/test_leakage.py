"""Future-token leakage (arXiv 2408.15664 §5): Loss-Free top-K is causal, Expert Choice is not."""

import copy
import json

import numpy as np
import pytest
import torch

from moebalance.lab.leakage import (
    changed_fraction,
    current_batch_bias_router,
    leakage,
    measure_leakage,
    model_router,
)
from moebalance.train.config import ModelConfig, apply_overrides, get_preset
from moebalance.train.model import MoETransformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, num_experts=8, top_k=2, d_expert=16)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    topk = MoETransformer(CFG)
    for r in topk.routers:  # a bias from past batches: fixed while the batch is routed
        r.expert_bias.copy_(0.02 * torch.randn(8))
    ec_cfg = copy.deepcopy(CFG)
    ec_cfg.routing = "expert_choice"
    ec = MoETransformer(ec_cfg)
    ec.load_state_dict(topk.state_dict())
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    return topk, ec, tokens


def test_changed_fraction_by_hand():
    before = torch.zeros(2, 2 * 4, 3, dtype=torch.bool)  # L=2, B=2, S=4, E=3
    after = before.clone()
    after[0, 1, 0] = True  # layer 0, seq 0, position 1
    after[1, 1, 2] = True  # layer 1, same token
    after[1, 4, 1] = True  # layer 1, seq 1, position 0
    after[0, 3, 1] = True  # position 3 > p: not compared
    frac, per_layer = changed_fraction(before, after, batch=2, position=2)
    assert frac == pytest.approx(2 / 6)
    assert per_layer == pytest.approx([1 / 6, 2 / 6])


def test_loss_free_routing_is_exactly_causal(models):
    topk, _, tokens = models
    for p in (0, 7, 14):
        assert measure_leakage(model_router(topk), tokens, p, 64, trials=3)["fraction"] == 0.0


def test_expert_choice_leaks(models):
    _, ec, tokens = models
    assert measure_leakage(model_router(ec), tokens, 7, 64, trials=3)["fraction"] > 0.0


def test_current_batch_bias_leaks_and_restores_the_bias(models):
    topk, _, tokens = models
    saved = [r.expert_bias.clone() for r in topk.routers]
    assert measure_leakage(current_batch_bias_router(topk, 1e-2), tokens, 7, 64, trials=3)["fraction"] > 0.0
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(topk.routers, saved))


def test_position_and_iterations_are_checked(models):
    topk, _, tokens = models
    with pytest.raises(ValueError, match="position"):
        measure_leakage(model_router(topk), tokens, 15, 64)
    with pytest.raises(ValueError, match="iterations"):
        current_batch_bias_router(topk, 1e-2, iterations=0)


@pytest.mark.slow
def test_leakage_command_writes_json(tmp_path):
    cfg = apply_overrides(
        get_preset("smoke"),
        ["model.d_model=32", "model.n_heads=2", "train.batch_size=4", "train.seq_len=32", "data.max_files=20"],
    )
    result = leakage(cfg, tmp_path, trials=2, warmup_batches=2)
    saved = json.loads((tmp_path / "leakage.json").read_text())
    assert saved["loss_free"] == 0.0 and saved["expert_choice"] > 0.0
    assert set(saved["per_layer"]) == {"expert_choice", "loss_free", "current_batch_bias"}
    assert saved["position"] == 15 and result["tokens_compared"] == 4 * 16


def test_warmup_without_a_checkpoint_learns_a_bias():
    # the warm-up forwards count their loads (they once ran under no_grad, which counts nothing)
    from types import SimpleNamespace

    import numpy as np

    from moebalance.lab.leakage import _models

    cfg = apply_overrides(get_preset("smoke"), ["model.d_model=32", "model.n_heads=2", "train.batch_size=2", "train.seq_len=8"])
    data = SimpleNamespace(train=np.random.default_rng(0).integers(0, cfg.model.vocab_size, 200))
    topk, _ = _models(cfg, data, None, 2, torch.Generator().manual_seed(0))
    assert all(r.expert_bias.abs().sum() > 0 for r in topk.routers)


def test_quantile_rule_warms_the_bias_up_from_past_batches_and_stays_causal():
    """``_models`` runs its warm-up updates with the configured rule; the quantile rule needs the
    routers' scores, so it must be prepared (it raised 'call prepare' before)."""
    from types import SimpleNamespace

    from moebalance.lab.leakage import _models
    from moebalance.train.config import RunConfig, TrainConfig

    cfg = RunConfig(model=copy.deepcopy(CFG), train=TrainConfig(batch_size=4, seq_len=16))
    cfg = apply_overrides(cfg, ["balance.bias_update=quantile", "balance.qb_estimator=pooled"])
    data = SimpleNamespace(train=np.random.default_rng(0).integers(0, 64, 4096).astype(np.uint16))
    topk, _ = _models(cfg, data, None, 3, torch.Generator().manual_seed(0))
    assert all(torch.count_nonzero(r.expert_bias) > 0 for r in topk.routers)
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    assert measure_leakage(model_router(topk), tokens, 7, 64, trials=2)["fraction"] == 0.0


def test_leakage_honours_train_threads_and_shows_progress(tmp_path, capsys):
    # Issue 22: leakage ignored train.threads (29.5 s against 10.5 s at one thread on a loaded
    # machine) and showed nothing for minutes.
    cfg = apply_overrides(
        get_preset("smoke"),
        ["model.d_model=32", "model.n_heads=2", "train.batch_size=4", "train.seq_len=32", "data.max_files=20", "train.threads=1"],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        leakage(cfg, tmp_path, trials=2, warmup_batches=2, progress=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "leakage" in err and "/9" in err  # 3 routings x (2 trials + the unperturbed batch)
