"""TensorBoard output of the trainer, and ``moebalance plot`` redrawing finished runs."""

import json
from pathlib import Path

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


# -- issue 22: plot colours runs as the report does, never overwrites other plots, says what it drops


def test_plot_colours_each_run_as_the_report_does(run_dir, tmp_path, monkeypatch):
    # Issue 22: the report drew loss_free, aux_loss (C0, C1) and plot drew the same runs sorted by
    # folder name (aux_loss C0): the colours swapped. A run's colour now follows its name only.
    from moebalance.lab import reporting

    drawn = []
    real = reporting.pyplot

    def spying_pyplot():
        plt = real()
        subplots = plt.subplots

        def spy(*a, **kw):
            fig, ax = subplots(*a, **kw)
            plot = ax.plot
            ax.plot = lambda *pa, **pkw: drawn.append((pkw.get("label"), pkw.get("color"))) or plot(*pa, **pkw)
            return fig, ax

        monkeypatch.setattr(plt, "subplots", spy)
        return plt

    monkeypatch.setattr(reporting, "pyplot", spying_pyplot)
    report_order = {"loss_free": run_dir, "aux_loss": run_dir}
    reporting.plot_maxvio_batch(report_order, tmp_path / "a.png")
    in_report = dict(drawn)
    drawn.clear()
    reporting.plot_maxvio_batch(dict(sorted(report_order.items())), tmp_path / "b.png")  # plot's order
    assert dict(drawn) == in_report and in_report["loss_free"] != in_report["aux_loss"]


def test_plot_refuses_to_overwrite_plots_of_other_runs(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    out = tmp_path / "plots"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    first = (out / "maxvio_batch.png").read_bytes()
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0  # the same runs again: redrawn
    capsys.readouterr()
    assert main(["plot", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds plots of other runs" in err and "--overwrite" in err
    assert (out / "maxvio_batch.png").read_bytes() == first
    assert main(["plot", str(other), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "plots.json").read_text())["runs"] == [str(other.resolve())]


def test_plot_says_when_it_leaves_a_run_out(run_dir, tmp_path, caplog):
    from moebalance.train.runfiles import RunFileError

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")  # a run that wrote no record yet
    with caplog.at_level("WARNING"):
        plot_runs([run_dir, empty], tmp_path / "o")
    assert "empty: its metrics.jsonl has no training record; left out of every figure" in caplog.text
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "metrics.jsonl").write_text("\x00garbage\n")  # a damaged line is refused, naming the file
    with pytest.raises(RunFileError, match="damaged/metrics.jsonl.*line 1"):
        plot_runs([run_dir, damaged], tmp_path / "o2")


def test_a_run_too_short_for_the_bias_to_travel_is_said_beside_the_numbers():
    # Issue 22: `sweep alpha train.max_steps=50` ranked Loss-Free the least balanced of five runs
    # with no warning; at u = 1e-3 its bias travels at most 0.05 of the 0.4-0.7 it needs.
    from moebalance.lab.reporting import bias_reach, short_run_note
    from moebalance.lab.sweeps import grid_runs, render_sweep_markdown
    from moebalance.train.config import apply_overrides, get_preset

    base = get_preset("default")
    assert bias_reach(base) == pytest.approx(0.6)  # "Ours can travel 0.6 in the whole run"
    assert bias_reach(apply_overrides(base, ["balance.bias_update_schedule=lr"])) == pytest.approx(0.353, abs=1e-3)
    assert bias_reach(apply_overrides(base, ["balance.strategy=aux_loss"])) is None
    assert short_run_note({"loss_free": base}) is None
    short = apply_overrides(base, ["train.max_steps=50"])
    note = short_run_note({n: apply_overrides(short, o) for n, o in grid_runs("alpha", short).items()})
    assert "0.05 in loss_free_u_1e-3" in note and "0.4–0.7" in note and "aux_alpha" not in note
    stored = json.loads((Path(__file__).parents[1] / "docs" / "results" / "sweep_alpha" / "sweep.json").read_text())
    md = render_sweep_markdown(stored | {"short_run_note": note})
    table_end = md.index("| loss_free_u_1e-3 |")
    assert md.index("Too short for Loss-Free to balance") > table_end  # right under the numbers


def test_plot_never_blocks_on_a_plots_json_that_is_a_fifo(run_dir, tmp_path, capsys):
    import os

    out = tmp_path / "plots"
    out.mkdir()
    (out / "maxvio_batch.png").write_bytes(b"an old plot")
    os.mkfifo(out / "plots.json")
    assert main(["plot", str(run_dir), "--out", str(out)]) == 2  # refused, not hung on the FIFO
    assert "already holds plots of other runs" in capsys.readouterr().err
