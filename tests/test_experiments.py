"""experiments/bias_floor.py: the frozen-weights floor of the bias update (docs/reproduction.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

from moebalance.train import train
from moebalance.train.config import preset_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bias_floor.py"


def _load(script: Path):
    """A fresh module of one experiments/ script (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module():
    return _load(SCRIPT)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = preset_config("smoke", ["train.max_steps=10", "train.eval_every=10", "train.tensorboard=false"])
    train(cfg, out, progress=False)
    return out


def test_bias_floor_writes_curve_and_probe(smoke_run, tmp_path):
    out = tmp_path / "floor.json"
    argv = [str(smoke_run), "--steps", "6", "--eval-every", "3", "--probe-batches", "5", "--out", str(out)]
    assert _module().main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["step"] for r in res["curve"]] == [0, 3, 6]
    assert all(0 <= r["maxvio_global"] for r in res["curve"])
    n_layers = 2  # the smoke preset
    for key in ("max_mean_minus_1", "max_abs_median_minus_1", "val_max_minus_1"):
        assert len(res["probe"][key]) == n_layers
    assert res["probe"]["mean_abs_relative_error"] > 0


def test_bias_floor_takes_a_study_method_and_a_validation_slice(smoke_run, tmp_path, monkeypatch):
    module = _module()
    seen = {}
    real = module.bias_only_updates

    def spy(model, data, cfg, balancer, *args, **kwargs):
        seen["rule"], seen["eval_tokens"] = balancer.rule, kwargs["eval_tokens"]
        return real(model, data, cfg, balancer, *args, **kwargs)

    monkeypatch.setattr(module, "bias_only_updates", spy)
    out = tmp_path / "qb.json"
    argv = [str(smoke_run), "--method", "quantile_pooled", "--eval-tokens", "2048", "--steps", "4", "--eval-every", "2",
            "--probe-batches", "2", "--out", str(out)]  # fmt: skip
    assert module.main(argv) == 0
    assert seen["eval_tokens"] == 2048
    assert (seen["rule"].name, seen["rule"].estimator, seen["rule"].window, seen["rule"].ema) == ("quantile", "pooled", 8, 0.9)
    assert json.loads(out.read_text())["args"]["method"] == "quantile_pooled"


def test_bias_floor_moves_the_bias_and_only_the_bias(smoke_run, tmp_path):
    module = _module()
    model, _, _ = module.load_frozen(smoke_run)
    assert not any(p.requires_grad for p in model.parameters())
    before = json.loads((smoke_run / "summary.json").read_text())["maxvio_global"]
    out = tmp_path / "floor.json"
    module.main([str(smoke_run), "--steps", "2", "--eval-every", "2", "--probe-batches", "1", "--out", str(out)])
    curve = json.loads(out.read_text())["curve"]
    assert curve[0]["maxvio_global"] == pytest.approx(before, abs=1e-6)  # step 0 is the run's own final score
    assert curve[1]["per_layer"] != curve[0]["per_layer"]


@pytest.mark.parametrize("bad", [["--rate", "0"], ["--steps", "-1"], ["--update", "median"], ["--eval-tokens", "-1"], ["--method", "nope"]])
def test_bias_floor_refuses_bad_arguments(smoke_run, tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        _module().main([str(smoke_run), "--out", str(tmp_path / "f.json"), *bad])
    assert exc.value.code == 2


def test_bias_floor_refuses_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as exc:
        _module().main([str(tmp_path), "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2


@pytest.mark.parametrize("rate", ["inf", "1e39", "1e-50"])
def test_bias_floor_refuses_a_rate_the_float32_bias_cannot_take(smoke_run, tmp_path, rate, capsys):
    with pytest.raises(SystemExit) as exc:
        _module().main([str(smoke_run), "--rate", rate, "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2
    assert "--rate" in capsys.readouterr().err


def test_bias_floor_names_a_corrupt_checkpoint_in_one_line(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((smoke_run / "checkpoint.pt").read_bytes()[:1000])
    assert _module().main([str(run), "--out", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "checkpoint.pt is truncated" in err
    assert not (tmp_path / "f.json").exists()


def test_bias_floor_names_a_checkpoint_that_is_no_training_state(tmp_path, capsys):
    import torch

    (tmp_path / "run").mkdir()
    torch.save(torch.ones(2), tmp_path / "run" / "checkpoint.pt")
    assert _module().main([str(tmp_path / "run"), "--out", str(tmp_path / "f.json")]) == 2
    assert "not the training state of a `moebalance train` run" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["folder", "below_a_file"])
def test_bias_floor_checks_out_before_the_work(smoke_run, tmp_path, where, capsys, monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "load_frozen", lambda *a, **k: pytest.fail("worked before --out was checked"))
    out = tmp_path if where == "folder" else smoke_run / "summary.json" / "f.json"
    with pytest.raises(SystemExit) as exc:
        module.main([str(smoke_run), "--out", str(out)])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_bias_floor_rerun_reads_back_and_never_overwrites(smoke_run, tmp_path, capsys, monkeypatch):
    module = _module()
    out = tmp_path / "floor.json"
    argv = [str(smoke_run), "--steps", "2", "--eval-every", "2", "--probe-batches", "1", "--out", str(out)]
    assert module.main(argv) == 0
    first = out.read_bytes()
    monkeypatch.setattr(module, "load_frozen", lambda *a, **k: pytest.fail("recomputed a finished result"))
    assert module.main(argv) == 0  # the same arguments: the result is read back
    assert "already" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # other arguments: refused, the file kept
        module.main([*argv, "--seed", "5"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == first
    monkeypatch.undo()
    assert module.main([*argv, "--seed", "5", "--overwrite"]) == 0
    assert json.loads(out.read_text())["args"]["seed"] == 5


def test_bias_floor_ctrl_c_is_one_line_status_130_and_writes_nothing(smoke_run, tmp_path, capsys, monkeypatch):
    module = _module()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "bias_only_updates", interrupted)
    out = tmp_path / "floor.json"
    assert module.main([str(smoke_run), "--steps", "2", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option, value",
    [("--batch-size", "100000000"), ("--steps", "1000001"), ("--eval-every", "1000001"), ("--probe-batches", "1000001"),
     ("--eval-tokens", "1000000001"), ("--seed", "99999999999999999999999"), ("--seed", "-1")],
)  # fmt: skip
def test_bias_floor_bounds_the_sizes_and_the_seed_up_front(smoke_run, tmp_path, option, value, capsys, monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before the arguments were checked"))
    with pytest.raises(SystemExit) as exc:
        module.main([str(smoke_run), option, value, "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("[" in err or "range" in err)


def test_bias_floor_names_a_model_state_that_does_not_fit_its_config_in_one_line(smoke_run, tmp_path, capsys):
    from moebalance.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(smoke_run / "checkpoint.pt")
    state["model"].pop(next(iter(state["model"])))
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", state)
    assert _module().main([str(tmp_path / "run"), "--steps", "2", "--out", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "does not fit its config" in err
    assert not (tmp_path / "f.json").exists()


def test_bias_floor_takes_a_result_without_probe_for_another_result(smoke_run, tmp_path, capsys):
    module = _module()
    out = tmp_path / "floor.json"
    argv = [str(smoke_run), "--steps", "2", "--eval-every", "2", "--probe-batches", "1", "--out", str(out)]
    out.write_text(json.dumps({"args": module.recorded_args(module.parse_args(argv))}))
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert module.main([*argv, "--overwrite"]) == 0
    assert "probe" in json.loads(out.read_text())


# -- experiments/sampling_floor.py: the validation split's own floor (docs/reproduction.md) -------

SAMPLING = SCRIPT.parent / "sampling_floor.py"


def _sampling():
    return _load(SAMPLING)


def test_sampling_floor_checks_out_below_a_file_before_the_work(smoke_run, capsys, monkeypatch):
    module = _sampling()
    monkeypatch.setattr(module, "load_frozen", lambda *a, **k: pytest.fail("worked before --out was checked"))
    with pytest.raises(SystemExit) as exc:
        module.main([str(smoke_run), "--out", str(smoke_run / "summary.json" / "x.json")])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_sampling_floor_takes_a_result_without_floor_for_another_result(smoke_run, tmp_path, capsys, monkeypatch):
    module = _sampling()
    monkeypatch.setattr(module, "load_frozen", lambda *a, **k: pytest.fail("recomputed over another result"))
    out = tmp_path / "s.json"
    out.write_text(json.dumps({"args": {"run_dir": str(smoke_run), "eval_tokens": 0, "draws": 500}}))
    with pytest.raises(SystemExit) as exc:
        module.main([str(smoke_run), "--out", str(out)])
    assert exc.value.code == 2 and "another result" in capsys.readouterr().err


def test_sampling_floor_bounds_eval_tokens(smoke_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _sampling().main([str(smoke_run), "--eval-tokens", "1000000001", "--out", str(tmp_path / "s.json")])
    assert exc.value.code == 2 and "--eval-tokens" in capsys.readouterr().err


# -- experiments/drop_bias.py: what dropping the trained bias costs (docs/transformers.md) --------

DROP_BIAS = SCRIPT.parent / "drop_bias.py"


def _drop_bias():
    return _load(DROP_BIAS)


def test_drop_bias_measures_each_condition_against_the_trained_routing(smoke_run, tmp_path):
    import torch

    from moebalance.balancing import find_routers
    from moebalance.train.loop import evaluate

    module = _drop_bias()
    out = tmp_path / "drop.json"
    assert module.main([str(smoke_run), "--eval-tokens", "2048", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["trained"]["tokens_changed_any_layer"] == 0.0 and res["trained"]["tokens_changed_per_layer"] == [0.0, 0.0]
    before = json.loads((smoke_run / "summary.json").read_text())
    assert res["run"]["steps"] == before["steps"]
    # The zero condition is the run's model with every bias at 0, measured by the trainer's own evaluate.
    model, cfg, data = _module().load_frozen(smoke_run)
    assert any(r.expert_bias.abs().max() > 0 for r in find_routers(model))
    with torch.no_grad():
        for r in find_routers(model):
            r.expert_bias.zero_()
    torch.set_num_threads(cfg.train.threads)
    ev = evaluate(model, data, cfg, max_tokens=2048)
    assert res["zero"]["val_ppl"] == pytest.approx(ev["val_ppl"], rel=1e-6)
    assert res["zero"]["maxvio_global"] == pytest.approx(ev["maxvio_global"], abs=1e-6)
    assert res["zero"]["tokens_changed_any_layer"] > 0  # the smoke run's bias already steers some tokens
    for condition in module.CONDITIONS:
        assert 0 <= res[condition]["tokens_changed_any_layer"] <= 1
        assert len(res[condition]["choices_changed_per_layer"]) == 2
    assert len(res["biases"]["bf16_collisions_per_layer"]) == 2


def test_drop_bias_rerun_reads_back_and_refuses_other_arguments(smoke_run, tmp_path, capsys, monkeypatch):
    module = _drop_bias()
    out = tmp_path / "drop.json"
    argv = [str(smoke_run), "--eval-tokens", "1024", "--out", str(out)]
    assert module.main(argv) == 0
    first = out.read_bytes()
    monkeypatch.setattr(module, "measure", lambda *a, **k: pytest.fail("recomputed a finished result"))
    assert module.main(argv) == 0
    assert "already" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        module.main([str(smoke_run), "--eval-tokens", "2048", "--out", str(out)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == first


def test_drop_bias_refuses_a_run_without_a_loss_free_bias(tmp_path, capsys):
    from moebalance.train import train
    from moebalance.train.config import preset_config

    cfg = preset_config("smoke", ["train.max_steps=2", "train.tensorboard=false", "balance.strategy=aux_loss"])
    train(cfg, tmp_path / "aux", progress=False)
    assert _drop_bias().main([str(tmp_path / "aux"), "--eval-tokens", "1024", "--out", str(tmp_path / "d.json")]) == 4
    err = capsys.readouterr().err
    assert "balance.strategy=aux_loss" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.json").exists()
