"""Non-finite loss, router logits and gradients (moebalance.train.guards and the trainer's skip/stop)."""

import json
import logging

import numpy as np
import pytest
import torch

from moebalance.routing import RouterOutput, TopKRouter, _in_backward_recompute
from moebalance.train.config import apply_overrides, get_preset
from moebalance.train.guards import NonFiniteError, nonfinite_reason
from moebalance.train.loop import train

B, S, K, ACCUM, LAYERS = 4, 16, 2, 2, 2
BAD_STEP = 3  # 1-based step whose second micro-batch goes bad


def _out(logits):
    return RouterOutput(gates=None, indices=None, scores=None, logits=logits, tokens_per_expert=None)


def test_nonfinite_reason_names_the_culprit():
    ok = torch.zeros(3, 4)
    assert nonfinite_reason(torch.tensor(1.0), [_out(ok), _out(ok)]) is None
    bad = ok.clone()
    bad[1, 2] = float("inf")  # sigmoid(inf) = 1: the loss can stay finite
    assert nonfinite_reason(torch.tensor(1.0), [_out(ok), _out(bad)]) == "router logits of MoE layer 1 are not finite"
    assert nonfinite_reason(torch.tensor(float("nan")), [_out(ok)]) == "loss is nan"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tokens.bin"
    np.random.default_rng(0).integers(0, 128, size=20_000, dtype=np.uint16).tofile(path)
    return path


def cfg_for(tokens, *extra):
    return apply_overrides(
        get_preset("smoke"),
        [
            f"data.path={tokens}",
            "data.bin_vocab_size=128",
            "model.d_model=32",
            "model.n_heads=2",
            f"model.n_layers={LAYERS}",
            "model.num_experts=4",
            f"model.top_k={K}",
            "model.d_expert=32",
            "model.max_seq_len=16",
            f"train.seq_len={S}",
            f"train.batch_size={B}",
            f"train.grad_accum={ACCUM}",
            "train.max_steps=6",
            "train.warmup_steps=1",
            "train.eval_every=100",
            "train.eval_tokens=128",
            "train.threads=1",
            "train.tensorboard=false",
            "balance.bias_update_rate=0.01",
            *extra,
        ],
    )


def inject(monkeypatch, kind: str):
    """Spoil the router output of layer 0 in micro-batch 2 of step BAD_STEP; record every training call.

    ``logits``: one logit +inf (finite gates and loss); ``loss``: NaN gates (NaN loss);
    ``grad``: NaN gradient through the scores in backward (finite loss and logits).
    """
    real = TopKRouter.forward
    seen = []  # (bias, load_counts) at each training-mode router call, in call order
    bad_call = (BAD_STEP - 1) * ACCUM * LAYERS + LAYERS  # layer 0 of the step's second micro-batch

    def forward(self, x, mask=None):
        if self.training and not _in_backward_recompute():
            seen.append((self.expert_bias.clone(), self.load_counts.clone()))
        out = real(self, x, mask)
        if self.training and len(seen) - 1 == bad_call:
            if kind == "logits":
                out.logits = out.logits.clone()
                out.logits[0, 0] = float("inf")
            elif kind == "loss":
                out.gates = out.gates * float("nan")
            else:
                out.scores.register_hook(lambda g: torch.full_like(g, float("nan")))
        return out

    monkeypatch.setattr(TopKRouter, "forward", forward)
    return seen


REASONS = {
    "logits": "router logits of MoE layer 0 are not finite",
    "loss": "loss is nan",
    "grad": "gradient norm is nan",
}


@pytest.mark.parametrize("kind", ["logits", "loss", "grad"])
def test_skipped_step_leaves_bias_and_counters_untouched(tokens, tmp_path, monkeypatch, caplog, kind):
    seen = inject(monkeypatch, kind)
    with caplog.at_level(logging.WARNING, logger="moebalance.train"):
        result = train(cfg_for(tokens), tmp_path, progress=False)
    assert result.skipped_steps == 1
    assert f"step {BAD_STEP}: {REASONS[kind]}" in caplog.text and "step skipped" in caplog.text
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [s for s in range(1, 7) if s != BAD_STEP]
    for r in train_recs:  # every update used exactly one step's tokens, none of the skipped step's
        assert [sum(layer) for layer in r["loads"]] == [K * B * S * ACCUM] * LAYERS
    per_step = ACCUM * LAYERS
    first = lambda step, layer: seen[(step - 1) * per_step + layer]  # noqa: E731
    for layer in range(LAYERS):
        # The bias moves after a normal step (so the check below can fail) ...
        assert not torch.equal(first(BAD_STEP - 1, layer)[0], first(BAD_STEP, layer)[0])
        # ... but not after the skipped one, and the counters start the next step empty.
        assert torch.equal(first(BAD_STEP, layer)[0], first(BAD_STEP + 1, layer)[0])
        assert not first(BAD_STEP + 1, layer)[1].any()


def test_on_nonfinite_stop_raises(tokens, tmp_path, monkeypatch):
    inject(monkeypatch, "logits")
    with pytest.raises(NonFiniteError, match=rf"step {BAD_STEP}: router logits .* \(train.on_nonfinite=stop\)"):
        train(cfg_for(tokens, "train.on_nonfinite=stop"), tmp_path, progress=False)


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match="train.on_nonfinite"):
        apply_overrides(get_preset("smoke"), ["train.on_nonfinite=ignore"])


def test_a_run_whose_every_step_is_skipped_fails(tmp_path):
    from moebalance.train.config import apply_overrides, get_preset
    from moebalance.train.guards import NonFiniteError
    from moebalance.train.loop import train

    cfg = apply_overrides(
        get_preset("smoke"),
        ["train.max_steps=2", "train.warmup_steps=0", "train.tensorboard=false"],
    )
    cfg.model.init_std = 1e300  # past the config's range (refused there since issue 22): the guard's own case
    with pytest.raises(NonFiniteError, match="nothing was trained"):
        train(cfg, tmp_path, progress=False)
    assert not (tmp_path / "summary.json").exists()


def test_a_final_perplexity_beyond_float_range_stops_with_a_clear_error(tmp_path):
    # lr=1000 diverges: the loss stays finite (over 709 nats/token) but exp(loss) overflows a float.
    overrides = ["train.max_steps=10", "train.lr=1000", "train.min_lr=0", "train.grad_clip=0", "train.warmup_steps=0"]
    cfg = apply_overrides(get_preset("smoke"), [*overrides, "train.eval_every=10", "train.tensorboard=false"])
    with pytest.raises(NonFiniteError, match="its perplexity overflows a float"):
        train(cfg, tmp_path, progress=False)
    assert not (tmp_path / "summary.json").exists()


def test_perplexity_beyond_float_range_is_inf():
    import math

    from moebalance.train.loop import perplexity

    assert perplexity(800.0) == math.inf  # math.exp(800.0) raises OverflowError
    assert perplexity(1.0) == pytest.approx(math.e)
    assert math.isnan(perplexity(float("nan")))
