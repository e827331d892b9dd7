"""The example scripts run end to end on a tiny setting."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("balance", [True, False])
def test_hf_trainer_example_tiny(tmp_path, balance):
    example = _load("hf_trainer_loss_free")
    argv = [
        "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--hidden-size", "32",
        "--vocab-size", "300", "--max-files", "20", "--val-windows", "4", "--threads", "1",
        "--update-rate", "0.01", "--out", str(tmp_path),
    ]
    summary = example.main(argv + ([] if balance else ["--no-balance"]))
    assert summary["steps"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert len(summary["maxvio_global_per_layer"]) == 2
    assert summary["maxvio_batch_first_log"] is not None
    lo, hi = summary["bias_range"]
    if balance:  # 4 sign updates of 0.01 moved the biases, by at most 0.04
        assert lo < hi and -0.04 - 1e-6 <= lo and hi <= 0.04 + 1e-6
    else:  # the baseline is measured only
        assert lo == hi == 0.0
    assert list((tmp_path / "runs").iterdir())  # TensorBoard events


TINY = ["--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32", "--hidden-size", "32",
        "--vocab-size", "300", "--max-files", "20", "--val-windows", "4", "--threads", "1", "--update-rate", "0.01"]


def _check_loop_summary(summary, out):
    assert summary["steps"] == 3
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert len(summary["maxvio_global_per_layer"]) == 2
    lo, hi = summary["bias_range"]
    assert lo < hi and -0.03 - 1e-6 <= lo and hi <= 0.03 + 1e-6  # 3 sign updates of 0.01, not 6


@pytest.mark.slow
def test_plain_loop_example_tiny(tmp_path):
    summary = _load("plain_loop_loss_free").main(TINY + ["--out", str(tmp_path)])
    _check_loop_summary(summary, tmp_path)


@pytest.mark.slow
def test_accelerate_example_tiny(tmp_path):
    import accelerate

    try:
        summary = _load("accelerate_loss_free").main(TINY + ["--out", str(tmp_path)])
    finally:
        accelerate.state.AcceleratorState._reset_state(True)
    _check_loop_summary(summary, tmp_path)
