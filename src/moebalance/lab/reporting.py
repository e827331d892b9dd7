"""Reports and plots of finished runs: ``report.json``, ``report.md`` and PNG figures.

Everything here reads what the trainer wrote (``metrics.jsonl``, ``summary.json``), so figures can
be redrawn from finished runs without training again. Files are written atomically.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from moebalance.train.checkpoint import STASH, atomic_write_bytes, write_json
from moebalance.train.config import RunConfig
from moebalance.train.logs import draw_load_heatmap, pyplot, relative_load
from moebalance.train.runfiles import read_metrics

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

__all__ = [
    "BIAS_DISTANCE",
    "PLOT_FILES",
    "bias_reach",
    "find_run_dirs",
    "plot_folder_problem",
    "load_metrics",
    "plot_loads",
    "plot_inputs",
    "plot_maxvio_batch",
    "plot_runs",
    "maxvio_global_label",
    "moving_average",
    "plot_tradeoff",
    "plot_val_loss",
    "plot_against_size",
    "run_colours",
    "short_run_note",
]


def load_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train_records, eval_records)`` of a run's ``metrics.jsonl``, read and checked by
    :func:`moebalance.train.runfiles.read_metrics` (a torn last line of a killed run is dropped;
    any other line that is not a metrics record is refused).

    Raises:
        FileNotFoundError: no ``metrics.jsonl``.
        RunFileError: a ``ValueError`` naming the file: not a regular file, over its size limit,
            not UTF-8, or a line that is not a record.
    """
    train, evals = [], []
    for rec in read_metrics(Path(run_dir) / "metrics.jsonl"):
        (train if rec["kind"] == "train" else evals).append(rec)
    return train, evals


def _check_fields(run: str, records: list[dict], fields: tuple[str, ...]) -> None:
    """Every record holds ``fields`` as numbers or lists (what the plots read), else ``ValueError``."""
    for rec in records:
        bad = [k for k in fields if isinstance(rec.get(k), bool) or not isinstance(rec.get(k), (int, float, list))]
        if bad:
            raise ValueError(f"{run}: a metrics.jsonl record of step {rec.get('step')!r} lacks {bad}; not a moebalance run")


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean of ``values`` over the last ``window`` entries (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _smoothing_note(windows: set[int]) -> str:
    """Title suffix naming the moving-average window; nothing when no run was smoothed."""
    if windows <= {1}:
        return ""
    if len(windows) == 1:
        return f" (moving average over {windows.pop()} steps)"
    return " (moving average over 1/50 of each run's steps)"


def _plain_log_axis(ax) -> None:
    """A log-scale y axis labelled in plain numbers (``0.2``, ``3``), never ``3×10⁰``.

    Ticks at 1, 2 and 5 times each power of ten; unlabelled minor ticks in between.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def run_colours(names) -> dict[str, str]:
    """A colour per run name, from the names alone (``C0``, ``C1``, ... in sorted order), so that a
    run has the same colour in a report's figures and in ``moebalance plot``'s, whatever order
    either draws the runs in."""
    return {name: f"C{i % 10}" for i, name in enumerate(sorted(names))}


def plot_maxvio_batch(runs: dict[str, str | Path], path: str | Path) -> None:
    """MaxVio_batch (mean over layers) per training step, one line per run (paper Fig. 3 style)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    windows, colours = set(), run_colours(runs)
    for name, run_dir in runs.items():
        train, _ = load_metrics(run_dir)
        steps = [r["step"] for r in train]
        vio = [r["maxvio_batch"] for r in train]
        window = max(1, len(vio) // 50)
        windows.add(window)
        ax.plot(steps, moving_average(vio, window), label=name, color=colours[name])
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio_batch (mean over layers)")
    _plain_log_axis(ax)
    ax.set_title("Load balance during training" + _smoothing_note(windows))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_val_loss(runs: dict[str, str | Path], path: str | Path) -> None:
    """Validation loss at each evaluation, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = run_colours(runs)
    for name, run_dir in runs.items():
        _, evals = load_metrics(run_dir)
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker="o", label=name, color=colours[name])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_loads(runs: dict[str, str | Path], path: str | Path) -> None:
    """Heatmaps of each expert's share of its layer's validation load at the last evaluation."""
    plt = pyplot()
    names = list(runs)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3), squeeze=False)
    final_loads = {name: load_metrics(runs[name])[1][-1]["loads"] for name in names}
    vmax = max(float(relative_load(loads).max()) for loads in final_loads.values())  # one scale for all panels
    for ax, name in zip(axes[0], names):
        draw_load_heatmap(ax, fig, final_loads[name], f"{name}: load / mean load", vmax=vmax)
    _save(fig, path)
    plt.close(fig)


def maxvio_global_label(val_split: str | None) -> str:
    """How a report names the MaxVio over the validation split ``val_split`` (``data.val_split``).

    On held-out chunks (the training distribution) it is the paper's MaxVio_global (arXiv
    2408.15664 §4.1). On held-out files it is measured under a distribution shift and must not be
    read as the paper's metric; a ``train.bin``/``val.bin`` folder is the user's own split.
    """
    if val_split == "files":
        return "MaxVio_global under distribution shift (held-out files)"
    if val_split == "given":
        return "MaxVio_global (on the given val.bin)"
    return "MaxVio_global"


def plot_against_size(
    series: dict[str, dict[int, float]], path: str | Path, ylabel: str, title: str, log_y: bool = True,
    reference: tuple[str, dict[int, float]] | None = None, colours: dict[str, str] | None = None,
) -> None:
    """One line per method of a metric against tokens per step (log x), for the batch-size study.

    Args:
        series: method -> {tokens per step: value}; a missing size or a ``None`` value is a gap.
        path: PNG to write.
        reference: ``(label, {tokens per step: value})`` drawn dashed in grey (a floor).
        colours: method -> colour (default :func:`run_colours` of ``series``), so that several
            figures of one report give a method one colour.
    """
    from matplotlib.ticker import NullLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = colours or run_colours(series)
    markers = "osD^vP*Xh"  # a method's marker by its place in the colour order: overlaps stay visible
    order = {name: i for i, name in enumerate(sorted(colours))}
    for name, values in series.items():
        pts = sorted((t, v) for t, v in values.items() if v is not None)
        marker = markers[order.get(name, 0) % len(markers)]
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker=marker, markerfacecolor="none", label=name, color=colours[name])
    if reference:
        pts = sorted(reference[1].items())
        ax.plot([t for t, _ in pts], [v for _, v in pts], "--", color="grey", label=reference[0])
    ax.set_xscale("log", base=2)
    sizes = sorted({t for values in series.values() for t in values})
    ax.set_xticks(sizes, [f"{t:,}" for t in sizes], rotation=30)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("tokens per step")
    ax.set_ylabel(ylabel)
    if log_y:
        _plain_log_axis(ax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    plt.close(fig)


def plot_tradeoff(
    points: dict[str, tuple[float, float]], path: str | Path, highlight: list[str] = (), val_split: str | None = None
) -> None:
    """Validation perplexity against MaxVio_global, one point per run (arXiv 2408.15664 Figure 2).

    Args:
        points: run name -> ``(maxvio_global, val_ppl)``.
        path: PNG to write.
        highlight: runs drawn as stars (Loss-Free), the others as circles.
        val_split: the runs' ``data.val_split``; names the x axis (:func:`maxvio_global_label`).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (vio, ppl) in points.items():
        star = name in highlight
        ax.scatter([vio], [ppl], marker="*" if star else "o", s=160 if star else 50, color="tab:red" if star else "tab:blue")
        ax.annotate(name, (vio, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{maxvio_global_label(val_split)} (lower is better balanced)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Balance against quality (stars: Loss-Free)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


#: How far the biases of the default model had to move to catch up with the routing collapse of
#: its first steps: the common-mode logit offsets of docs/reproduction.md ("≈ 0.4–0.7").
BIAS_DISTANCE = (0.4, 0.7)


def bias_reach(cfg: RunConfig) -> float | None:
    """The farthest a Loss-Free bias can move in the run of ``cfg``: ``u`` times the sum of the
    update-rate factors over its steps (``u * max_steps`` with the constant schedule; Algorithm 1's
    sign rule moves every bias by exactly ``u * factor`` a step). ``None`` where there is no such
    bound: no bias update, or the ``error`` rule, whose step grows with the imbalance."""
    from moebalance.train.loop import bias_rate_scale

    b = cfg.balance
    if b.strategy not in ("loss_free", "deepseek_v3") or b.bias_update != "sign" or cfg.model.routing != "topk":
        return None
    return b.bias_update_rate * sum(bias_rate_scale(step, cfg) for step in range(cfg.train.max_steps))


def short_run_note(configs: dict[str, RunConfig]) -> str | None:
    """A warning for the report when a Loss-Free run is too short for its bias to travel the
    distance :data:`BIAS_DISTANCE` (its MaxVio then measures the catch-up, not the balance it
    reaches, and can rank it below runs it beats in a long run); ``None`` otherwise."""
    short = {name: reach for name, cfg in configs.items() if (reach := bias_reach(cfg)) is not None and reach < BIAS_DISTANCE[0]}
    if not short:
        return None
    lo, hi = BIAS_DISTANCE
    runs = "; ".join(f"{reach:.3g} in {name}" for name, reach in short.items())
    return (
        f"**Too short for Loss-Free to balance:** a bias can move at most u × steps = {runs}, "
        f"less than the {lo}–{hi} the default model's biases needed to catch up with the early routing "
        "collapse (docs/reproduction.md). Its MaxVio here measures that catch-up, not the balance Loss-Free "
        "reaches, and can rank it below runs it beats in a longer run: raise train.max_steps (or the rate)."
    )


def find_run_dirs(paths: list[str | Path]) -> dict[str, Path]:
    """Runs named by ``paths``: a folder with a ``metrics.jsonl`` is one run; a folder without one
    (a ``compare`` output) contributes its sub-folders that have one (never the hidden
    ``.replaced-run`` of an interrupted ``--overwrite``). Runs are named by their folder
    name, prefixed by the parent's name where two would clash.

    Raises:
        FileNotFoundError: a path is not a folder, or holds no run.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{str(p)!r} is not a folder")
        if os.path.lexists(p / "metrics.jsonl"):  # whatever it is: the reader names it if it cannot serve
            found.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.name != STASH and os.path.lexists(d / "metrics.jsonl"))
        if not subs:
            raise FileNotFoundError(f"{str(p)!r} holds no metrics.jsonl (neither a run nor a compare folder)")
        found.extend(subs)
    names = [d.name for d in found]
    runs: dict[str, Path] = {}
    for d in found:
        name = d.name if names.count(d.name) == 1 else f"{d.parent.name}/{d.name}"
        if name in runs:
            name = str(d)
        runs[name] = d
    return runs


def plot_inputs(paths: list[str | Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """``(with_train, with_eval)``: the runs of ``paths`` (:func:`find_run_dirs`) that have
    training records and those that have evaluation records, every run's ``metrics.jsonl`` read
    and checked for the fields the plots draw (``moebalance plot`` calls this before it writes).

    Raises:
        FileNotFoundError: see :func:`find_run_dirs`.
        ValueError: a damaged ``metrics.jsonl`` (:func:`load_metrics`), no run has any training
            record, or a record lacks a field the plots read; the message names the run or file.
    """
    runs = find_run_dirs(paths)
    records = {name: load_metrics(d) for name, d in runs.items()}
    with_train = {n: runs[n] for n, (tr, _) in records.items() if tr}
    with_eval = {n: runs[n] for n, (_, ev) in records.items() if ev}
    if not with_train:
        raise ValueError("none of the runs has a training record in metrics.jsonl")
    for name in records:  # say which runs a figure leaves out, and why
        if name not in with_train:
            log.warning("%s: its metrics.jsonl has no training record; left out of every figure", name)
        elif name not in with_eval:
            log.warning("%s: its metrics.jsonl has no evaluation record; left out of val_loss.png and expert_load.png", name)
    for name, (train, evals) in records.items():
        _check_fields(name, train, ("step", "maxvio_batch"))
        _check_fields(name, evals, ("step", "val_loss", "loads"))
    return with_train, with_eval


#: What ``moebalance plot`` writes into its folder (``plots.json``: the run folders it drew).
PLOT_FILES = ("maxvio_batch.png", "val_loss.png", "expert_load.png", "plots.json")


def _drawn_runs(paths: list[str | Path]) -> list[str]:
    return [str(Path(p).resolve()) for p in paths]


def plot_folder_problem(out_dir: str | Path, paths: list[str | Path], overwrite: bool = False) -> str | None:
    """Why ``moebalance plot`` must not draw ``paths`` into ``out_dir``, or ``None``: the folder
    holds plots of other runs (its ``plots.json`` names others, or it has none beside plot files)
    and ``overwrite`` is false. Plots of the same runs are redrawn (the same picture)."""
    out = Path(out_dir)
    present = [f for f in PLOT_FILES if (out / f).exists()]
    if overwrite or not present:
        return None
    manifest, drawn = out / "plots.json", None
    try:  # a regular file of plausible size only: a FIFO or a device there must not block or flood
        if manifest.is_file() and manifest.stat().st_size < 2**20:
            drawn = json.loads(manifest.read_text())["runs"]
    except (OSError, ValueError, TypeError, KeyError):
        drawn = None
    if drawn == _drawn_runs(paths):
        return None
    return (
        f"{str(out)!r} already holds plots of other runs ({', '.join(present)}); not overwritten: "
        "choose another --out, or replace them with --overwrite"
    )


def plot_runs(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Redraw the report plots of finished runs (``moebalance plot``), without training.

    Writes ``maxvio_batch.png``, ``val_loss.png`` and ``expert_load.png`` (the last evaluation's
    load of each run that has one) into ``out_dir``.

    Returns:
        The written files.

    Raises:
        FileNotFoundError, ValueError: see :func:`plot_inputs`.
    """
    with_train, with_eval = plot_inputs(paths)
    out = Path(out_dir)
    written = [out / "maxvio_batch.png"]
    plot_maxvio_batch(with_train, written[-1])
    if with_eval:
        written.append(out / "val_loss.png")
        plot_val_loss(with_eval, written[-1])
        written.append(out / "expert_load.png")
        plot_loads(with_eval, written[-1])
    write_json(out / "plots.json", {"runs": _drawn_runs(paths)})  # the run folders (cli: find_run_dirs)
    return written
