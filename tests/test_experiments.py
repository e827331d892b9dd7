"""experiments/bias_floor.py: the frozen-weights floor of the bias update (docs/reproduction.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

from moebalance.train import train
from moebalance.train.config import preset_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bias_floor.py"


def _module():
    spec = importlib.util.spec_from_file_location("bias_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.parametrize("bad", [["--rate", "0"], ["--steps", "-1"], ["--update", "median"]])
def test_bias_floor_refuses_bad_arguments(smoke_run, tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        _module().main([str(smoke_run), "--out", str(tmp_path / "f.json"), *bad])
    assert exc.value.code == 2


def test_bias_floor_refuses_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as exc:
        _module().main([str(tmp_path), "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2
