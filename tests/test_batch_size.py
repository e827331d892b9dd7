"""The batch-size study (moebalance.lab.batch_size, ``moebalance sweep batch-size``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moebalance import cli
from moebalance.lab import batch_size as bs
from moebalance.lab import sweeps
from moebalance.train.config import RunConfig, apply_overrides, get_preset


def _cfgs(base: RunConfig, **kw) -> dict[str, RunConfig]:
    return {name: apply_overrides(base, o) for name, o in sweeps.grid_runs("batch-size", base, **kw).items()}


def test_every_run_trains_the_same_tokens_at_its_own_batch():
    base = RunConfig()
    cfgs = _cfgs(base)
    assert len(cfgs) == len(bs.STUDY_METHODS) * len(bs.DEFAULT_TOKENS_PER_STEP)
    for name, cfg in cfgs.items():
        method, size, seed = bs.parse_run_name(name)
        t = cfg.train
        assert seed is None and t.batch_size * t.seq_len == size
        assert t.max_steps * size == 600 * 1024
        # warm-up, evaluation and logging at the same token counts as the base run (at least 1 step)
        assert t.warmup_steps == min(max(1, round(50 * 1024 / size)), t.max_steps - 1)
        assert t.eval_every == max(1, round(150 * 1024 / size)) and t.log_every == max(1, round(10 * 1024 / size))
        assert t.lr == base.train.lr
    assert cfgs["sign_t1024"].to_dict() == apply_overrides(base, ["balance.bias_update=sign"]).to_dict()
    assert cfgs["quantile_pooled_t256"].balance.qb_estimator == "pooled"
    assert cfgs["proportional_t512"].balance.bias_update_rate == pytest.approx(16e-3)
    assert cfgs["deepseek_v3_t2048"].balance.seq_aux_coeff == 1e-4


def test_extra_seeds_train_at_the_base_size_only():
    cfgs = _cfgs(RunConfig(), sizes=(256, 1024), seeds=3)
    seeds = {n: c.train.seed for n, c in cfgs.items() if "_seed" in n}
    assert len(seeds) == 2 * len(bs.STUDY_METHODS)
    assert set(seeds.values()) == {1235, 1236} and all("_t1024_" in n for n in seeds)
    with pytest.raises(ValueError, match="--seeds 3 trains its extra seeds at the base run's 1024 tokens per step"):
        _cfgs(RunConfig(), sizes=(256, 512), seeds=3)
    assert not any("_seed" in n for n in _cfgs(RunConfig(), sizes=(256, 512)))


def test_proportional_steps_as_error_for_any_number_of_experts():
    for experts in (8, 16, 64):
        base = apply_overrides(RunConfig(), [f"model.num_experts={experts}"])
        cfg = _cfgs(base, sizes=(1024,))["proportional_t1024"]
        assert cfg.balance.bias_update_rate == pytest.approx(experts * 1e-3) and cfg.balance.target_load == ""


def test_floors_use_the_base_size_or_the_nearest_one():
    assert bs.floor_weights_size((256, 1024, 4096), 1024) == 1024
    assert bs.floor_weights_size((256, 4096), 1024) == 256  # a tie on the log scale: the smaller
    assert bs.floor_weights_size((2048, 20480), 1024) == 2048
    assert bs.recovery_window(614400) == 20480 and bs.recovery_window(15360) == 512


@pytest.mark.parametrize(
    ("sizes", "seeds", "match"),
    [
        ((), 1, "at least one"),
        ((256, 256), 1, "twice"),
        ((300,), 1, "multiple of train.seq_len"),
        ((128 * 7,), 1, "divides"),
        ((0,), 1, "multiple"),
        ((256,), 0, "--seeds"),
        ((256,), 11, "--seeds"),
    ],
)
def test_bad_sizes_and_seeds_are_refused_naming_the_option(sizes, seeds, match):
    with pytest.raises(ValueError, match=match):
        sweeps.grid_runs("batch-size", RunConfig(), sizes=sizes, seeds=seeds)


def test_other_grids_refuse_the_study_options():
    with pytest.raises(ValueError, match="batch-size grid"):
        sweeps.grid_runs("alpha", RunConfig(), sizes=(256,))


def test_run_names_round_trip():
    assert bs.parse_run_name("quantile_pooled_t1024_seed1235") == ("quantile_pooled", 1024, 1235)
    assert bs.parse_run_name("sign_t256") == ("sign", 256, None)
    for bad in ("sign", "nope_t256", "sign_tx", "sign_t256_seedx"):
        with pytest.raises(ValueError, match="not a batch-size study run"):
            bs.parse_run_name(bad)


def test_recovery_is_the_first_step_below_the_threshold_after_the_peak():
    # 1024 tokens a step: a moving average over 20 steps
    curve = [0.5] * 10 + [5.0] * 30 + [0.2] * 100
    tokens = bs.recovery_tokens(curve, 1024)
    smooth = [np.mean(curve[max(0, i - 19) : i + 1]) for i in range(len(curve))]
    first = next(i for i in range(int(np.argmax(smooth)), len(curve)) if smooth[i] <= 1.0)
    assert tokens == (first + 1) * 1024
    assert bs.recovery_tokens([3.0] * 50, 1024) is None
    assert bs.recovery_tokens([], 1024) is None
    # one step per window at 20480 tokens: no smoothing
    assert bs.recovery_tokens([0.5, 4.0, 2.0, 0.9], 20480) == 4 * 20480


def test_noise_floor_matches_the_binomial_spread_and_falls_with_the_batch():
    floors = [bs.noise_floor(t, 16, 2, 2) for t in (256, 1024, 4096)]
    assert floors[0] > floors[1] > floors[2] > 0
    # each expert's load ~ Binomial(T, K/E): its max over 16 experts is about 1.8 standard deviations
    # above the mean (Gumbel approximation), relative to the mean T*K/E
    for t, f in zip((256, 1024, 4096), floors):
        mean = t * 2 / 16
        sd = np.sqrt(t * (2 / 16) * (1 - 2 / 16))
        assert f == pytest.approx(1.77 * sd / mean, rel=0.2)
    assert bs.noise_floor(1024, 16, 2, 2) == bs.noise_floor(1024, 16, 2, 2)  # fixed seed


@pytest.fixture
def small_study(monkeypatch):
    """Two methods, floors of 4 updates on 4,096 validation tokens: the mechanics, in seconds."""
    methods = {k: bs.STUDY_METHODS[k] for k in ("sign", "quantile_pooled")}
    monkeypatch.setattr(bs, "STUDY_METHODS", methods)
    monkeypatch.setattr(bs, "BIAS_METHODS", ("sign", "quantile_pooled"))
    monkeypatch.setattr(bs, "FLOOR_UPDATES", 4)
    monkeypatch.setattr(bs, "FLOOR_EVAL_TOKENS", 4096)
    return ["sweep", "batch-size", "--preset", "smoke", "--no-progress", "--tokens-per-step", "512,1024", "--seeds", "2",
            "train.max_steps=12", "train.eval_every=6", "train.tensorboard=false"]  # fmt: skip


def test_the_study_writes_tables_plots_and_floors_and_a_rerun_reads_them_back(small_study, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bs"
    assert cli.main(small_study + ["--out", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert set(report["rows"]) == {f"{m}_t{t}" for m in ("sign", "quantile_pooled") for t in (512, 1024)} | {
        "sign_t512_seed1235", "quantile_pooled_t512_seed1235"
    }  # fmt: skip
    for row in report["rows"].values():
        assert row["size"] * json.loads((out / f"{row['method']}_t{row['size']}" / "summary.json").read_text())["steps"] == 12 * 512
    floors = report["floors"]
    assert floors["weights"] == "sign_t512" and set(floors["entries"]) == {"sign_t512", "sign_t1024", "quantile_pooled_t512", "quantile_pooled_t1024"}
    assert all(0 <= e["floor"] < 100 and [c["step"] for c in e["curve"]] == [2, 3, 4] for e in floors["entries"].values())
    assert report["seed_spread"]["sign"]["maxvio_global"][2] == 2
    sampling = floors["sampling"]
    assert 0 < sampling["slice"]["floor"] and sampling["split"]["tokens"] >= sampling["slice"]["tokens"]
    md = (out / "sweep.md").read_text()
    for heading in ("MaxVio_global at the end", "MaxVio_batch, mean", "Tokens until", "Validation perplexity", "Floor with frozen weights", "Seeds at T = 512"):
        assert heading in md
    assert "| uniform random routing |" in md and "| perfect balance, as measured |" in md
    for png in ("maxvio_global_vs_tokens.png", "maxvio_batch_vs_tokens.png", "floor_vs_tokens.png", "ppl_vs_tokens.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # Run again: every run and every floor is read back, nothing is trained or measured.
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(bs, "floor_of", refuse)
    monkeypatch.setattr(sweeps, "run_or_resume", lambda cfg, d, *a, **k: (json.loads((d / "summary.json").read_text()), "finished"))
    assert cli.main(small_study + ["--out", str(out)]) == 0
    assert json.loads((out / "sweep.json").read_text())["floors"] == floors


def test_an_interrupted_floor_continues_where_it_stopped(small_study, tmp_path, monkeypatch):
    out = tmp_path / "bs"
    real, calls = bs.floor_of, []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(bs, "floor_of", stop_after_two)
    assert cli.main(small_study + ["--out", str(out)]) == 130
    assert len(json.loads((out / "floor.json").read_text())["entries"]) == 2
    calls.clear()
    monkeypatch.setattr(bs, "floor_of", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert cli.main(small_study + ["--out", str(out)]) == 0
    assert len(calls) == 2  # only the two missing floors


def test_study_options_are_refused_by_the_cli_before_anything_runs(tmp_path, capsys):
    for extra, match in ((["--tokens-per-step", "a,b"], "comma-separated integers"), (["--tokens-per-step", "100"], "multiple")):
        assert cli.main(["sweep", "batch-size", "--preset", "smoke", "--out", str(tmp_path / "x")] + extra) == 2
        assert match in capsys.readouterr().err
    assert cli.main(["sweep", "alpha", "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path / "y")]) == 2
    assert "batch-size grid" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert get_preset("smoke").train.max_steps == 30  # nothing above changed the preset


def test_each_size_is_checked_for_memory_and_sizes_are_plain_digits(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert cli.main(["sweep", "batch-size", "--tokens-per-step", "1024,614400", "model.d_model=512", "--out", out]) == 2
    assert "its run of 614400 tokens per step: this config needs at least" in capsys.readouterr().err
    for odd in (" 512", "1_024", "\u0665\u0661\u0662", "512,"):
        assert cli.main(["sweep", "batch-size", "--preset", "smoke", "--tokens-per-step", odd, "--out", out]) == 2
        assert "digits 0-9 only" in capsys.readouterr().err
    assert cli.main(["sweep", "batch-size", "--preset", "smoke", "--out", out]) == 2
    assert "a size of the default list" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_no_warm_up_stays_none():
    cfgs = _cfgs(apply_overrides(RunConfig(), ["train.warmup_steps=0"]), sizes=(256, 20480))
    assert {c.train.warmup_steps for c in cfgs.values()} == {0}
    cfgs = _cfgs(apply_overrides(RunConfig(), ["train.warmup_steps=600"]), sizes=(1024, 20480))
    assert cfgs["sign_t1024"].train.warmup_steps == 600 and cfgs["sign_t20480"].train.warmup_steps == 30


def test_a_damaged_floor_entry_is_measured_again():
    good = {"floor": 0.1, "time_s": 1.0, "curve": [{"step": 2, "maxvio_global": 0.1}]}
    assert bs._valid_entry(good)
    for bad in ("x", [1], {}, good | {"floor": "abc"}, good | {"floor": float("nan")}, good | {"time_s": "abc"},
                {k: v for k, v in good.items() if k != "time_s"}, good | {"curve": [{"maxvio_global": None}]}):  # fmt: skip
        assert not bs._valid_entry(bad), bad
    sampling = {w: {"floor": 0.05, "std": 0.02, "measured": 0.1, "chunks": 3, "tokens": 384} for w in ("slice", "split")}
    assert bs._valid_sampling(sampling)
    assert not bs._valid_sampling("x") and not bs._valid_sampling({"slice": sampling["slice"]})
    assert not bs._valid_sampling(sampling | {"split": sampling["split"] | {"floor": "x"}})
