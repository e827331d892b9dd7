"""The trainer: a small decoder-only MoE language model and the loop that trains it.

Modules:

* :mod:`~moebalance.train.config`: validated dataclasses, presets and ``section.field=value`` overrides;
* :mod:`~moebalance.train.data`: the built-in corpus, BPE, token memmaps, batches;
* :mod:`~moebalance.train.model`: the MoE Transformer (attention + :class:`~moebalance.moe.MoELayer`);
* :mod:`~moebalance.train.loop`: :func:`train` and :func:`evaluate`;
* :mod:`~moebalance.train.logs`: ``metrics.jsonl``, TensorBoard, the load heatmap;
* :mod:`~moebalance.train.checkpoint`, :mod:`~moebalance.train.resume`: crash-safe files, exact resume;
* :mod:`~moebalance.train.runfiles`: the one reader of a run's files (bounded, regular files only);
* :mod:`~moebalance.train.guards`: non-finite loss, logits and gradients.

This floor may import the library and :mod:`moebalance.parallel`, never the lab or the CLI.
``from moebalance.train import train`` keeps working (the loop is imported on first use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "evaluate", "train"]


def __getattr__(name: str) -> Any:
    # Lazy: importing moebalance.train.config must not import the whole loop.
    if name in __all__:
        from moebalance.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
