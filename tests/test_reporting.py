"""TensorBoard output of the trainer, and ``moebalance plot`` redrawing finished runs."""

import json

import numpy as np
import pytest

from moebalance.cli import main
from moebalance.lab.reporting import find_run_dirs, plot_runs
from moebalance.train.config import apply_overrides, get_preset
from moebalance.train.logs import load_heatmap_image

TINY = [
    "data.max_files=20",
    "data.vocab_size=300",
    "model.n_layers=2",
    "model.d_model=32",
    "model.num_experts=4",
    "model.d_expert=32",
    "train.seq_len=32",
    "train.batch_size=4",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_tokens=256",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from moebalance.train.loop import train

    out = tmp_path_factory.mktemp("run")
    train(apply_overrides(get_preset("smoke"), TINY), out, progress=False)
    return out


def test_tensorboard_has_scalars_and_load_heatmaps(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/tokens_per_s",
        "train/maxvio_batch",
        "train/bias_min",
        "train/bias_max",
        "val/loss",
        "val/ppl",
        "maxvio_batch/layer1",
        "maxvio_global/layer1",
        "bias_range/layer1",
    ):
        assert tag in scalars, tag
    assert len(acc.Scalars("train/loss")) == 4
    images = acc.Images("val/expert_load")
    assert [im.step for im in images] == [2, 4]  # one heatmap per evaluation
    assert images[0].width > 100 and images[0].height > 100


def test_load_heatmap_image_shape():
    image = load_heatmap_image([[4, 0, 2, 2], [1, 1, 1, 5]])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 0  # something was drawn


def test_plot_cli_redraws_from_finished_runs(run_dir, tmp_path, capsys):
    # A compare-style folder holding two runs, plus the same run named directly.
    parent = tmp_path / "cmp"
    for name in ("loss_free", "aux_loss"):
        (parent / name).mkdir(parents=True)
        (parent / name / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    assert list(find_run_dirs([parent])) == ["aux_loss", "loss_free"]
    out = tmp_path / "plots"
    assert main(["plot", str(parent), str(run_dir), "--out", str(out)]) == 0
    for name in ("maxvio_batch.png", "val_loss.png", "expert_load.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "expert_load.png" in capsys.readouterr().out


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1}) + "\n")
    with pytest.raises(ValueError, match="no training record|none of the runs"):
        plot_runs([empty], tmp_path / "o")
