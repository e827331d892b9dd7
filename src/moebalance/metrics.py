"""Load-balance metrics (arXiv 2408.15664 §4.1).

``MaxVio = (max_i Load_i - mean(Load)) / mean(Load)``: 0 for a perfectly balanced layer, ``E - 1``
when one expert takes every token. Computed on one training batch it is ``MaxVio_batch``; on the
load counted over the whole validation set it is ``MaxVio_global``.
"""

from __future__ import annotations

import torch

from moebalance.checks import check_loads

__all__ = ["coefficient_of_variation", "dead_experts", "load_share", "max_violation"]


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
