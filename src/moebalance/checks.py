"""Argument checks of the library's public calls.

One concern: a bad argument is refused at the call with a ``ValueError`` whose message names the
argument and what it may be, instead of an obscure error deep inside PyTorch or, worse, a silent
wrong result (a ``[S, B]`` mask applied to a ``[B, S]`` batch, ``norm_topk_prob="no"`` taken as
True, negative loads turned into a bias update). Every check here is a pure function of its
arguments; the tensor checks look at shapes and dtypes only, except where a value range is named
(:func:`check_index_tensor`, :func:`check_loads`, :func:`check_mask` for an integer mask), which
costs one host synchronisation.

Used by :mod:`moebalance.routing`, :mod:`moebalance.balancing`, :mod:`moebalance.losses`,
:mod:`moebalance.metrics`, :mod:`moebalance.experts` and :mod:`moebalance.moe`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_index_tensor",
    "check_int",
    "check_loads",
    "check_mask",
    "check_number",
    "check_score_tensor",
    "check_tensor",
    "describe",
    "is_finite_number",
    "is_integer_tensor",
]


def is_finite_number(value: object) -> bool:
    """``True`` for a finite int or float (not a bool, a string or a tensor); ``False`` also for an
    int too large for a float (``math.isfinite(10**400)`` raises ``OverflowError``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def values_readable(t: torch.Tensor) -> bool:
    """Whether checking ``t``'s values is free: a concrete CPU tensor. A check that reads values
    from a CUDA tensor would synchronise the host every call, and a meta or fake tensor (shape
    tracing, ``torch.compile``, the paper presets' memory-free forward) has no values; there the
    value checks of the hot path are skipped and only shapes and dtypes are checked."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not is_fake(t)


def describe(value: object) -> str:
    """A tensor's shape and dtype, or a non-tensor's type, for an error message."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__


def is_integer_tensor(value: object) -> bool:
    """``True`` for a tensor of an integer dtype (not bool, float or complex)."""
    return isinstance(value, torch.Tensor) and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    )


def _range_text(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"<= {high}" if high is not None else "any value"


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound may be ``None``).

    Raises:
        ValueError: not an ``int`` (a bool, a float such as ``16.0`` or ``16.5``, a tensor are
            not), or outside the range; the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {_range_text(low, high)}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {_range_text(low, high)}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` itself when it is ``True`` or ``False``.

    Raises:
        ValueError: anything else (``"no"``, ``0``, ``None``); the message names ``name``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_number(
    name: str, value: object, low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> float:
    """``value`` as a float, finite and in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Raises:
        ValueError: not an int or float (bools, strings, tensors are not), not finite, or outside
            the range; the message names ``name``.
    """
    ok = is_finite_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number {_range_text(low, high, low_open)}, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` when it is one of the strings ``choices``.

    Raises:
        ValueError: anything else; the message names ``name`` and the choices.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_tensor(name: str, value: object, dims: Sequence[int], shape_text: str) -> torch.Tensor:
    """``value`` when it is a ``torch.Tensor`` with one of the numbers of dimensions ``dims``.

    Args:
        shape_text: the expected shape as the message shows it (``"[T, E]"``).

    Raises:
        ValueError: not a tensor, or another number of dimensions.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(value).__name__}")
    if value.dim() not in dims:
        raise ValueError(f"{name} must have shape {shape_text}, got shape {tuple(value.shape)}")
    return value


def check_score_tensor(name: str, value: object, dims: Sequence[int] = (2,), shape_text: str = "[T, E]") -> torch.Tensor:
    """A real floating-point tensor (scores, logits, token representations) of ``dims`` dimensions.

    Raises:
        ValueError: not a tensor, wrong number of dimensions, or not real floating point
            (integer, bool and complex tensors are refused).
    """
    check_tensor(name, value, dims, shape_text)
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {value.dtype}")
    return value


def check_index_tensor(name: str, value: object, num_rows: int | None, bound: int, what: str) -> torch.Tensor:
    """A 2-D integer tensor of ids in ``[0, bound)``, with ``num_rows`` rows when given.

    Args:
        what: what the ids are and the bound's name, for the message (``"expert ids, E=8"``).

    Raises:
        ValueError: not a 2-D integer tensor, another number of rows, or an id out of range.
    """
    check_tensor(name, value, (2,), "[T, K]")
    if not is_integer_tensor(value):
        raise ValueError(f"{name} must be an integer tensor of {what}, got dtype {value.dtype}")
    if num_rows is not None and value.shape[0] != num_rows:
        raise ValueError(f"{name} must have one row per token ({num_rows}), got shape {tuple(value.shape)}")
    if value.numel() and bool(((value < 0) | (value >= bound)).any()):
        raise ValueError(f"{name} must hold {what} in [0, {bound}), got values in [{int(value.min())}, {int(value.max())}]")
    return value


def check_loads(name: str, value: object, allow_nonfinite: bool = False) -> torch.Tensor:
    """``[E]`` or ``[L, E]`` loads: a real (not bool, not complex) tensor with at least one expert,
    no negative entry, and finite unless ``allow_nonfinite`` (NaN and +inf then pass).

    Raises:
        ValueError: the message names ``name``.
    """
    check_tensor(name, value, (1, 2), "[E] or [L, E]")
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be a real-valued tensor of loads, got dtype {value.dtype}")
    if value.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one expert, got shape {tuple(value.shape)}")
    if not allow_nonfinite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite (got NaN or inf)")
    if bool((value < 0).any()):
        raise ValueError(f"{name} must be >= 0 (loads are token counts), got a minimum of {float(value.min())}")
    return value


def check_mask(name: str, mask: object, shape: Sequence[int], shape_text: str) -> torch.Tensor | None:
    """A padding mask of exactly ``shape``, flattened to ``[T]`` bool; ``None`` stays ``None``.

    A bool mask, or an integer one of 0 and 1 (``True``/1 for a real token). A mask of another
    shape with the same number of entries (``[S, B]`` for a ``[B, S]`` batch) is refused: it
    would be applied to the wrong tokens.

    Raises:
        ValueError: not a tensor, another shape, a float/complex dtype, or an integer other than 0/1.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor of shape {shape_text}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_text} = {list(shape)}, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"{name} must be a bool tensor (True for a real token), got dtype {mask.dtype}")
        if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} as an integer tensor must hold only 0 and 1, got other values")
    return mask.reshape(-1).to(torch.bool)
