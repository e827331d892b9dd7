"""Load-balance metrics (arXiv 2408.15664 §4.1).

``MaxVio = (max_i Load_i - mean(Load)) / mean(Load)``: 0 for a perfectly balanced layer, ``E - 1``
when one expert takes every token. Computed on one training batch it is ``MaxVio_batch``; on the
load counted over the whole validation set it is ``MaxVio_global``.
"""

from __future__ import annotations

import torch

from moebalance.checks import check_loads

__all__ = ["coefficient_of_variation", "dead_experts", "expert_set_changes", "layer_routing_changes", "load_share",
           "lost_choices", "max_violation"]


def _as_float_loads(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The checked loads as float64 (see :func:`~moebalance.checks.check_loads`)."""
    return check_loads("tokens_per_expert", tokens_per_expert).detach().double()


def max_violation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """MaxVio of a load vector (arXiv 2408.15664 §4.1).

    Args:
        tokens_per_expert: ``[E]`` or ``[L, E]`` loads (any numeric dtype, >= 0).

    Returns:
        float32 tensor: 0-dim for ``[E]``, ``[L]`` (one value per layer) for ``[L, E]``.
        A layer with no load at all has MaxVio 0.

    Raises:
        ValueError: not a tensor, not ``[E]`` or ``[L, E]``, no experts, a bool or complex dtype,
            a NaN/inf or a negative load (the message names ``tokens_per_expert``). The other
            metrics of this module raise the same.
    """
    loads = _as_float_loads(tokens_per_expert)
    mean = loads.mean(-1)
    vio = (loads.max(-1).values - mean) / mean.clamp_min(1e-300)
    return torch.where(mean > 0, vio, torch.zeros_like(vio)).float()


def coefficient_of_variation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Standard deviation over mean of the loads (population std), per layer like :func:`max_violation`."""
    loads = _as_float_loads(tokens_per_expert)
    mean = loads.mean(-1)
    cv = loads.std(-1, unbiased=False) / mean.clamp_min(1e-300)
    return torch.where(mean > 0, cv, torch.zeros_like(cv)).float()


def load_share(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Each expert's share of its layer's load (rows sum to 1; an empty row stays 0)."""
    loads = _as_float_loads(tokens_per_expert)
    return (loads / loads.sum(-1, keepdim=True).clamp_min(1e-300)).float()


def dead_experts(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Number of experts with load 0, per layer (int64)."""
    return (_as_float_loads(tokens_per_expert) == 0).sum(-1)


def lost_choices(before_TK: torch.Tensor, after_TK: torch.Tensor) -> torch.Tensor:
    """``[T]`` int64: how many of each token's K experts in ``before_TK`` are not in ``after_TK``
    (0: the same set of experts, in any order).

    Args:
        before_TK, after_TK: ``[T, K]`` integer expert ids of the same ``T`` tokens (``T, K >= 1``).

    Raises:
        ValueError: the shapes differ, are not ``[T, K]`` with ``T, K >= 1``, or the ids are not integers.
    """
    if before_TK.shape != after_TK.shape or before_TK.dim() != 2 or before_TK.numel() == 0:
        raise ValueError(
            f"before_TK and after_TK must be [T, K] of one shape (T, K >= 1), got {tuple(before_TK.shape)} and {tuple(after_TK.shape)}"
        )
    if before_TK.is_floating_point() or after_TK.is_floating_point():
        raise ValueError(f"expert ids must be integers, got {before_TK.dtype} and {after_TK.dtype}")
    # [T, K, K]: is choice k of `before` among the K choices of `after`?
    kept_TK = (before_TK.unsqueeze(-1) == after_TK.to(before_TK.device).unsqueeze(-2)).any(-1)
    return (~kept_TK).sum(-1)


def expert_set_changes(before_TK: torch.Tensor, after_TK: torch.Tensor) -> tuple[float, float]:
    """How much two top-K routings of the same tokens differ.

    Used to compare routings with and without a selection bias (``moebalance verify``, the
    bias-dropping measurement of docs/transformers.md); the order of the K ids does not matter.

    Args:
        before_TK, after_TK: ``[T, K]`` integer expert ids of the same ``T`` tokens (``T, K >= 1``).

    Returns:
        ``(tokens, choices)``: the share of tokens whose *set* of K experts differs, and the share
        of the ``T * K`` choices of ``before_TK`` that ``after_TK`` does not make; both in [0, 1].

    Raises:
        ValueError: as :func:`lost_choices`.
    """
    lost_T = lost_choices(before_TK, after_TK)
    return (lost_T > 0).float().mean().item(), (lost_T.sum() / before_TK.numel()).item()


def layer_routing_changes(before: list[torch.Tensor], after: list[torch.Tensor]) -> dict[str, list[float] | float]:
    """:func:`expert_set_changes` of each MoE layer, and the share of tokens changed in any layer.

    Args:
        before, after: one ``[T, K]`` integer id tensor per layer (the same ``T`` tokens in every layer).

    Returns:
        ``tokens_per_layer`` and ``choices_per_layer`` (lists of shares, one per layer) and
        ``tokens_any_layer``: the share of tokens whose expert set differs in at least one layer.

    Raises:
        ValueError: ``before`` and ``after`` have different lengths or none, the layers see different
            token counts, or as :func:`lost_choices`.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"before and after must hold one [T, K] tensor per layer, got {len(before)} and {len(after)}")
    lost_LT = [lost_choices(b, a) for b, a in zip(before, after)]
    if len({lost.numel() for lost in lost_LT}) != 1:
        raise ValueError(f"every layer must route the same tokens, got {[lost.numel() for lost in lost_LT]}")
    changes = [expert_set_changes(b, a) for b, a in zip(before, after)]
    return {
        "tokens_per_layer": [c[0] for c in changes],
        "choices_per_layer": [c[1] for c in changes],
        "tokens_any_layer": (torch.stack(lost_LT) > 0).any(0).float().mean().item(),
    }
