"""What a run writes while it trains: ``metrics.jsonl`` records, TensorBoard scalars, and the
expert-load heatmap image of each evaluation.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moebalance.train.resume import continue_metrics

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RunLogger", "draw_load_heatmap", "load_heatmap_image", "pyplot", "relative_load"]


class RunLogger:
    """JSONL + TensorBoard sink.

    ``resume_step``: continue a run resumed after that step: keep ``metrics.jsonl`` up to it and
    hide TensorBoard events of later steps (``purge_step``), which the resumed run logs again.
    ``enabled=False`` (ranks other than 0) writes nothing.
    """

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None = None, enabled: bool = True) -> None:
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            continue_metrics(out_dir / "metrics.jsonl", resume_step)
        self.jsonl = open(out_dir / "metrics.jsonl", "w" if resume_step is None else "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=purge)

    def sync(self) -> None:
        """Make the records so far durable (before a checkpoint that refers to them)."""
        if self.jsonl is None:
            return
        os.fsync(self.jsonl.fileno())
        if self.tb is not None:
            self.tb.flush()

    def record(self, rec: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        if self.jsonl is None:  # not rank 0
            return
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, image_HWC, step: int) -> None:
        """An RGB ``[H, W, 3]`` uint8 image (TensorBoard only)."""
        if self.tb is not None:
            self.tb.add_image(tag, image_HWC, step, dataformats="HWC")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def relative_load(loads_LE) -> np.ndarray:
    """``load / mean load`` per (layer, expert) as ``[L, E]`` float64; 1.0 is perfectly balanced."""
    import torch

    from moebalance.metrics import load_share

    share = load_share(torch.as_tensor(loads_LE, dtype=torch.float64)).numpy()
    return share * share.shape[1]


def draw_load_heatmap(ax, fig, loads_LE, title: str, vmax: float | None = None):
    """Draw ``load / mean load`` per (layer, expert) on ``ax``; 1.0 is a perfectly balanced expert.

    ``vmax`` fixes the top of the colour scale, so that panels drawn side by side compare."""
    rel = relative_load(loads_LE)
    num_layers, num_experts = rel.shape
    im = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_yticks(range(num_layers))
    step = max(1, -(-num_experts // 8))  # at most 8 labelled experts: labels stay legible
    ax.set_xticks(range(0, num_experts, step))
    ax.set_title(title)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=ax)


def load_heatmap_image(loads_LE, title: str = "load / mean load") -> np.ndarray:
    """The expert-load heatmap of one evaluation as an RGB image, for TensorBoard's ``add_image``.

    Args:
        loads_LE: ``[L, E]`` tokens per expert of each MoE layer (tensor or nested lists).
        title: figure title.

    Returns:
        ``[H, W, 3]`` uint8 numpy array (use ``dataformats="HWC"``).
    """
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    draw_load_heatmap(ax, fig, loads_LE, title)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
