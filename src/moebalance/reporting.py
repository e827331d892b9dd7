"""Reports and plots of finished runs: ``report.json``, ``report.md`` and PNG figures.

Everything here reads what the trainer wrote (``metrics.jsonl``, ``summary.json``), so figures can
be redrawn from finished runs without training again. Files are written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from moebalance.checkpoint import atomic_write_bytes

__all__ = [
    "load_metrics",
    "plot_loads",
    "plot_maxvio_batch",
    "plot_tradeoff",
    "plot_val_loss",
    "write_json",
    "write_text",
]


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def load_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train_records, eval_records)`` of a run's ``metrics.jsonl``.

    A last line cut short by a kill is ignored.
    """
    train, evals = [], []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (train if rec.get("kind") == "train" else evals).append(rec)
    return train, evals


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_maxvio_batch(runs: dict[str, str | Path], path: str | Path) -> None:
    """MaxVio_batch (mean over layers) per training step, one line per run (paper Fig. 3 style)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run_dir in runs.items():
        train, _ = load_metrics(run_dir)
        steps = [r["step"] for r in train]
        vio = [r["maxvio_batch"] for r in train]
        window = max(1, len(vio) // 50)
        ax.plot(steps, _smooth(vio, window), label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio_batch (mean over layers)")
    ax.set_yscale("log")
    ax.set_title("Load balance during training")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_val_loss(runs: dict[str, str | Path], path: str | Path) -> None:
    """Validation loss at each evaluation, one line per run."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run_dir in runs.items():
        _, evals = load_metrics(run_dir)
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_loads(runs: dict[str, str | Path], path: str | Path) -> None:
    """Heatmaps of each expert's share of its layer's validation load at the last evaluation."""
    import torch

    from moebalance.metrics import load_share

    plt = _figure()
    names = list(runs)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        _, evals = load_metrics(runs[name])
        share = load_share(torch.tensor(evals[-1]["loads"], dtype=torch.float64)).numpy()
        num_experts = share.shape[1]
        im = ax.imshow(share * num_experts, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"{name}: load / mean load")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax)
    _save(fig, path)
    plt.close(fig)


def plot_tradeoff(points: dict[str, tuple[float, float]], path: str | Path, highlight: list[str] = ()) -> None:
    """Validation perplexity against MaxVio_global, one point per run (arXiv 2408.15664 Figure 2).

    Args:
        points: run name -> ``(maxvio_global, val_ppl)``.
        path: PNG to write.
        highlight: runs drawn as stars (Loss-Free), the others as circles.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (vio, ppl) in points.items():
        star = name in highlight
        ax.scatter([vio], [ppl], marker="*" if star else "o", s=160 if star else 50, color="tab:red" if star else "tab:blue")
        ax.annotate(name, (vio, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("MaxVio_global (lower is better balanced)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Balance against quality (stars: Loss-Free)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
