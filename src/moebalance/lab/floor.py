"""The floor of a bias rule: how low it brings MaxVio_global when only the bias moves.

A trained model's weights are frozen; the rule keeps updating the bias from fresh training
batches of a given size, and MaxVio_global (arXiv 2408.15664 §4.1, eq. 5) is scored on a fixed
slice of the validation split. With nothing drifting, what is left is the rule itself at that
batch size: its step jitter and its estimation noise (for the sign rule also the gap between the
median and the mean of an expert's per-batch load: it settles where an expert is over-loaded in
half of the batches, while MaxVio_global measures the mean).

Used by the batch-size study (:mod:`moebalance.lab.batch_size`) and experiments/bias_floor.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moebalance.balancing import LossFreeBalancer, rule_from_config
from moebalance.train.checkpoint import load_checkpoint
from moebalance.train.config import BalanceConfig, RunConfig
from moebalance.train.data import TokenData, batch_at, eval_window_offsets, prepare_data, sample_batch
from moebalance.train.loop import evaluate
from moebalance.train.model import MoETransformer

__all__ = ["CheckpointMismatch", "bias_only_updates", "floor_of", "load_frozen", "sampling_floor", "window_loads"]


class CheckpointMismatch(ValueError):
    """A checkpoint whose model state does not fit its own config (:func:`load_frozen`)."""


def load_frozen(run_dir: str | Path, state: dict | None = None, data: TokenData | None = None):
    """A finished run's model with every weight frozen (``requires_grad=False``), its config and
    its data.

    Args:
        run_dir: a ``moebalance train`` run folder (its ``checkpoint.pt`` is read unless ``state``).
        state: the run's checkpoint, already loaded.
        data: the run's tokens, already prepared (else prepared from the run's ``data`` config).

    Returns:
        ``(model, cfg, data)``.

    Raises:
        OSError, ValueError: the checkpoint cannot be read or its data prepared.
        CheckpointMismatch: (a ``ValueError``) the checkpoint's model state does not fit its config.
    """
    state = load_checkpoint(Path(run_dir) / "checkpoint.pt") if state is None else state
    cfg = RunConfig.from_dict(state["config"])
    data = prepare_data(cfg.data) if data is None else data
    cfg.model.vocab_size = data.vocab_size
    model = MoETransformer(cfg.model, cfg.balance)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:  # missing / unexpected keys, shapes; not a dict
        raise CheckpointMismatch(f"checkpoint.pt: the model state does not fit its config: {exc}") from exc
    model.requires_grad_(False)
    return model, cfg, data


def bias_only_updates(
    model: MoETransformer,
    data: TokenData,
    cfg: RunConfig,
    balancer: LossFreeBalancer,
    batch_size: int,
    updates: int,
    score_at: set[int],
    eval_tokens: int,
    seed: int = 999,
    on_score: Callable[[dict], None] | None = None,
    generator: torch.Generator | None = None,
) -> list[dict[str, Any]]:
    """Run ``updates`` bias updates of ``balancer`` on fresh training batches, weights frozen.

    Each update: one forward of ``batch_size`` sequences of ``cfg.train.seq_len`` tokens (training
    mode, so the routers count loads; no graph, since no weight requires grad), then
    ``balancer.step(model)`` (the rule's own update from those loads, or scores for ``quantile``).

    Args:
        score_at: updates after which MaxVio_global is scored (0: before the first).
        eval_tokens: validation tokens of each score (0: the whole split); the same tokens every time.
        seed: seed of the batch sampler, unless ``generator`` (which then goes on from where the
            updates leave it, for the caller's further batches).
        on_score: called with each score record as it is made.

    Returns:
        score records in order: ``{"step", "maxvio_global", "per_layer", "loads"}``
        (``loads`` ``[L, E]`` of the validation slice).
    """
    balancer.prepare(model)  # the quantile rule records the routers' scores
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    def score(step: int) -> dict[str, Any]:
        ev = evaluate(model, data, cfg, max_tokens=eval_tokens)
        rec = {"step": step, "maxvio_global": ev["maxvio_global"], "per_layer": ev["maxvio_global_per_layer"], "loads": ev["loads"]}
        if on_score is not None:
            on_score(rec)
        return rec

    curve = [score(0)] if 0 in score_at else []
    for step in range(1, updates + 1):
        model.train()
        x, _ = sample_batch(data.train, batch_size, cfg.train.seq_len, gen)
        model(x)
        balancer.step(model)
        if step in score_at:
            curve.append(score(step))
    return curve


def floor_of(
    run_dir: str | Path,
    balance: BalanceConfig,
    batch_size: int,
    updates: int,
    eval_tokens: int,
    data: TokenData | None = None,
    seed: int = 999,
) -> dict[str, Any]:
    """The floor of ``balance``'s bias rule at ``batch_size`` sequences per update, on the frozen
    weights of the run in ``run_dir``, starting from that run's trained bias.

    The floor is the mean MaxVio_global of the scores after ``updates/2``, ``3*updates/4`` and
    ``updates`` updates (the first half lets the rule reach its own level).

    Args:
        balance: the rule (``bias_update`` and its options) and its rate ``bias_update_rate``.
        eval_tokens: validation tokens of each score (0: all).

    Returns:
        ``{"floor", "curve": [{"step", "maxvio_global"}]}``.

    Raises:
        OSError, ValueError: the run cannot be read; the rule's options out of range.
    """
    model, cfg, data = load_frozen(run_dir, data=data)
    balancer = LossFreeBalancer(balance.bias_update_rate, rule_from_config(balance))
    at = {max(1, updates // 2), max(1, 3 * updates // 4), updates}
    curve = bias_only_updates(model, data, cfg, balancer, batch_size, updates, at, eval_tokens, seed)
    return {
        "floor": sum(r["maxvio_global"] for r in curve) / len(curve),
        "curve": [{"step": r["step"], "maxvio_global": r["maxvio_global"]} for r in curve],
    }


def window_loads(model: MoETransformer, data: TokenData, cfg: RunConfig, eval_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Each validation window's expert loads: ``([W, L, E] float64 token counts, [W] int64
    offsets)``, over the windows :func:`~moebalance.train.loop.evaluate` reads with ``eval_tokens``
    (0: the whole split), one forward per window, in evaluation mode."""
    was_training = model.training
    model.eval()
    offsets = eval_window_offsets(data.val, cfg.train.seq_len, eval_tokens)
    loads = []
    with torch.no_grad():
        for start in offsets:
            x, _ = batch_at(data.val, start.view(1), cfg.train.seq_len)
            out = model(x.to(cfg.train.device))
            loads.append(torch.stack([r.tokens_per_expert for r in out.routing]).double().cpu().numpy())
    model.train(was_training)
    return np.stack(loads), offsets.numpy()


def sampling_floor(
    model: MoETransformer, data: TokenData, cfg: RunConfig, eval_tokens: int, draws: int = 500, seed: int = 0
) -> dict[str, float]:
    """The MaxVio_global a validation slice shows for routing that is *perfectly* balanced on the
    distribution the slice is drawn from: the measurement's own floor.

    MaxVio_global (arXiv 2408.15664 §4.1, eq. 5) of a finite validation set scatters around the
    population's value: the held-out text is a sample of independently drawn chunks
    (``data.val_chunk_tokens`` tokens each, the split's unit), and experts specialise, so one
    chunk's loads are far from uniform. Null model: each expert's per-window loads shifted so that
    its mean over the slice equals the mean of all experts (the chunk-to-chunk spread kept, the
    imbalance removed); then a block bootstrap over chunks (``draws`` resamples with replacement,
    numpy, fixed ``seed``) gives the MaxVio_global of that balanced routing on slices of this size.

    Returns:
        ``{"floor": mean, "std": standard deviation over the resamples, "measured": the slice's own
        MaxVio_global, "chunks": chunks in the slice, "tokens": tokens in the slice}``.
    """
    loads, offsets = window_loads(model, data, cfg, eval_tokens)
    unit = cfg.data.val_chunk_tokens if cfg.data.val_split == "chunks" else cfg.train.seq_len
    _, chunk_of = np.unique(offsets // unit, return_inverse=True)
    chunks = np.zeros((chunk_of.max() + 1, *loads.shape[1:]))
    np.add.at(chunks, chunk_of, loads)
    per_expert = chunks.mean(0, keepdims=True)
    null = chunks - per_expert + per_expert.mean(-1, keepdims=True)

    def maxvio(total_LE: np.ndarray) -> float:
        return float((total_LE.max(-1) / total_LE.mean(-1) - 1).mean())

    rng = np.random.default_rng(seed)
    n = len(null)
    vios = [maxvio(null[rng.integers(0, n, n)].sum(0)) for _ in range(draws)]
    return {"floor": float(np.mean(vios)), "std": float(np.std(vios)), "measured": maxvio(chunks.sum(0)), "chunks": n, "tokens": int(len(offsets) * cfg.train.seq_len)}
