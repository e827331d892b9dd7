"""Routed experts with stacked weights and a sort-by-expert dispatch (dropless or with capacity).

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token,
N routed (token, slot) pairs that are computed (``T*K`` when dropless, fewer when a capacity
drops some).

Dispatch follows the permute -> grouped compute -> unpermute pattern of torchtitan and megablocks:
the ``T*K`` pairs are sorted (stably) by expert, each expert's rows are contiguous, one grouped
matrix multiply (``torch.nn.functional.grouped_mm`` where present) or a loop over contiguous
slices runs all experts, and the results are scattered back with ``index_add``. Memory is linear
in ``T*K*D``: there is no ``[T, E, D]`` tensor and no padding to the largest expert.

Which kernel runs (see :func:`expert_compute_plan`; measured in ``benchmarks/run.py``, results
in ``docs/benchmarks.md``):

* CUDA: ``grouped_mm`` in bfloat16 (float32 operands fall back to the loop, as the CUDA kernel
  takes bfloat16 only).
* CPU, float32: ``grouped_mm``. On the CPU build it is itself a loop of ``mm`` over the groups,
  but its backward skips the per-expert autograd nodes of a Python loop (whose cost grows with E).
* CPU, bfloat16 or float16 (weights in that dtype, or autocast to it) on a CPU without native bf16 matrix
  instructions (no AVX512-BF16 / AMX): the operands are cast to float32 and the experts run in
  float32. Without those instructions oneDNN emulates bf16 GEMMs: the layer run in native bf16
  was 23-32x slower at the benchmark's default shape; the float32 GEMM of
  bf16-rounded inputs is also at least as accurate. The output is
  float32 and the layer casts it back to its input's dtype. The bf16 sources, not float32
  copies, are kept for the backward (:func:`_recast_on_backward`).
* Anything else (float64, strides not 16-byte aligned, ``use_grouped_mm=False``): the loop.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moebalance.checks import (
    check_bool,
    check_choice,
    check_int,
    check_mask,
    check_number,
    check_score_tensor,
    describe,
    is_integer_tensor,
    values_readable,
)

DropPolicy = Literal["position", "score"]

__all__ = [
    "Dispatch",
    "DropPolicy",
    "GroupedExperts",
    "SwiGLU",
    "combine",
    "count_pairs",
    "expert_capacity",
    "expert_compute_plan",
    "permute",
]


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020), used for shared experts
    (DeepSeekMoE) and dense layers.

    Computes in the dtype :func:`expert_compute_plan` picks, as the routed experts do: bf16 on a
    CPU without native bf16 GEMMs runs in float32 and returns bf16 (native bf16 ``nn.Linear``
    there was 18x slower than the whole routed layer in ``benchmarks/run.py``).

    Args:
        d_model: ``D``. d_ff: hidden size ``F``.

    Shapes: ``[..., D]`` -> ``[..., D]``, in the autocast dtype under autocast, else the promoted
    dtype of the input and the weights.

    Raises:
        ValueError: ``d_model`` or ``d_ff`` not an int >= 1.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("d_ff", d_ff, 1)
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _operand_dtype(x, self.w1.weight)
        d_ff, d_model = self.w1.weight.shape
        _, compute = expert_compute_plan(x.device, dtype, d_model, d_ff, use_grouped_mm=False)
        if compute == dtype and (torch.is_autocast_enabled(x.device.type) or x.dtype == self.w1.weight.dtype):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        # Mixed input and weight dtypes, or a compute dtype wider than the operands'.
        (xc, w1, w3, w2), upcast = _cast_for_compute(compute, x, self.w1.weight, self.w3.weight, self.w2.weight)
        with torch.autocast(x.device.type, enabled=False), _recast_on_backward(upcast):
            out = F.linear(F.silu(F.linear(xc, w1)) * F.linear(xc, w3), w2)
        return out.to(dtype)


@dataclass
class Dispatch:
    """Where each computed pair went.

    Attributes:
        token_ids: ``[N]`` int64 source token of each expert-sorted row.
        gates: ``[N]`` float32 gate value of each expert-sorted row.
        counts: ``[E]`` int64 rows per expert that are computed (after any capacity drop).
        dropped: 0-dim int64, (token, slot) pairs of real (unmasked) tokens dropped by the
            capacity; 0 when dropless; ``None`` when the dispatch was not built by
            :func:`permute` (expert-choice routing).
    """

    token_ids: torch.Tensor
    gates: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor | None = None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows one expert may take: ``ceil(capacity_factor * T * K / E)`` (GShard §2.2, Switch §2.1),
    at most ``T``.

    The one capacity rule of the library: token-choice dispatch (:class:`~moebalance.moe.MoELayer`'s
    ``capacity_factor``) and expert-choice routing
    (:func:`~moebalance.routing.expert_choice_capacity`) both use it.

    * The product is rounded to 9 decimals before the ceiling, so that float noise does not add a
      row: ``1.1 * 100 / 11`` is ``10.000000000000002`` in floating point, and the capacity is 10.
    * It is capped at ``T``: no expert can take more than every token (a token chooses an expert
      at most once), so a huge ``capacity_factor`` (``1e300``) is dropless, not an ``OverflowError``.

    Args:
        num_tokens: ``T >= 0``. top_k: ``K >= 1``. num_experts: ``E >= 1``.
        capacity_factor: a finite number ``> 0``.

    Raises:
        ValueError: an argument outside its range (the message names it).
    """
    check_int("num_tokens", num_tokens, 0)
    check_int("top_k", top_k, 1)
    check_int("num_experts", num_experts, 1)
    check_number("capacity_factor", capacity_factor, 0.0, low_open=True)
    raw = round(capacity_factor * num_tokens * top_k / num_experts, 9)  # 10.000000000000002 is 10
    return num_tokens if raw >= num_tokens else math.ceil(raw)


def permute(
    x_TD: torch.Tensor,
    indices_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    drop_policy: DropPolicy = "position",
    mask_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Dispatch]:
    """Gather token rows in expert order, dropping the pairs beyond an expert's capacity.

    Args:
        x_TD: ``[T, D]`` tokens. indices_TK: ``[T, K]`` int64 expert ids. gates_TK: ``[T, K]`` gates.
        num_experts: ``E``.
        capacity: rows each expert may take (see :func:`expert_capacity`); ``None``: dropless.
        drop_policy: which pairs an over-full expert keeps: ``"position"`` the earliest tokens
            (GShard/Switch: tokens are served in order), ``"score"`` the largest gate values
            (Megatron-Core's ``probs`` policy). Only used with a capacity.
        mask_T: optional ``[T]`` bool, ``False`` for padding. Padding pairs are served last and
            are not counted as dropped.

    Returns:
        ``x_ND`` ``[N, D]`` rows sorted by expert (dropless and ``"position"``: token order kept
        inside an expert; ``"score"``: best gate first), and the :class:`Dispatch` needed to
        combine the results.

    Raises:
        ValueError: ``x_TD`` not a ``[T, D]`` real float tensor, ``indices_TK`` not ``[T, K]``
            integer ids in ``[0, E)``, ``gates_TK`` not a real float tensor of ``indices_TK``'s
            shape, ``num_experts`` not an int >= 1, ``capacity`` not ``None`` or an int ``>= 0``,
            an unknown ``drop_policy``, or ``mask_T`` not ``[T]`` bool.
    """
    mask_T = _check_permute_args(x_TD, indices_TK, gates_TK, num_experts, capacity, drop_policy, mask_T)
    num_tokens, top_k = indices_TK.shape
    flat_experts = indices_TK.reshape(-1)
    flat_gates = gates_TK.reshape(-1)
    counts = count_pairs(flat_experts, num_experts)
    if capacity is None:
        order = torch.argsort(flat_experts, stable=True)
        dropped = counts.new_zeros(())
        token_ids = order // top_k
        return x_TD[token_ids], Dispatch(token_ids, flat_gates[order], counts, dropped)

    pad_N = None if mask_T is None else ~mask_T.reshape(-1, 1).expand(num_tokens, top_k).reshape(-1)
    if drop_policy == "score":
        # Best gate first; padding last. The stable sort by expert below keeps this order.
        priority = flat_gates.detach().float()
        if pad_N is not None:
            priority = priority.masked_fill(pad_N, float("-inf"))
        pre = torch.argsort(priority, descending=True, stable=True)
    else:
        # Token order; padding after every real token of the same expert.
        pre = torch.arange(flat_experts.numel(), device=flat_experts.device)
        if pad_N is not None:
            pre = torch.argsort(pad_N.to(torch.uint8), stable=True)
    order = pre[torch.argsort(flat_experts[pre], stable=True)]
    # Rank of each sorted row inside its expert: row index minus the expert's first row.
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[flat_experts[order]]
    keep = rank < capacity
    if pad_N is None:
        dropped = (~keep).sum()
    else:
        dropped = (~keep & ~pad_N[order]).sum()
    order = order[keep]
    token_ids = order // top_k
    kept_counts = counts.clamp(max=capacity)
    return x_TD[token_ids], Dispatch(token_ids, flat_gates[order], kept_counts, dropped)


def _check_permute_args(x_TD, indices_TK, gates_TK, num_experts, capacity, drop_policy, mask_T):
    """The checks of :func:`permute` (its Raises); returns the mask as ``[T]`` bool or ``None``."""
    check_score_tensor("x_TD", x_TD, (2,), "[T, D]")
    check_int("num_experts", num_experts, 1)
    if not is_integer_tensor(indices_TK) or indices_TK.dim() != 2 or indices_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"indices_TK must be a [T={x_TD.shape[0]}, K] integer tensor of expert ids, got {describe(indices_TK)}")
    check_score_tensor("gates_TK", gates_TK, (2,), "[T, K]")
    if gates_TK.shape != indices_TK.shape:
        raise ValueError(f"gates_TK must have indices_TK's shape {tuple(indices_TK.shape)}, got {tuple(gates_TK.shape)}")
    if capacity is not None:
        check_int("capacity", capacity, 0)
    check_choice("drop_policy", drop_policy, ("position", "score"))
    return check_mask("mask_T", mask_T, x_TD.shape[:1], "[T]")


def count_pairs(flat_experts: torch.Tensor, num_experts: int, name: str = "indices_TK") -> torch.Tensor:
    """``[E]`` int64 pairs per expert of ``[N]`` integer expert ids.

    Raises:
        ValueError: an id outside ``[0, E)`` (the message names ``name``); checked on the counts of
            a CPU tensor (see :func:`~moebalance.checks.values_readable`).
    """
    try:
        counts = torch.bincount(flat_experts, minlength=num_experts)
    except RuntimeError as err:  # a negative id
        raise ValueError(f"{name} must hold expert ids in [0, num_experts={num_experts}): {err}") from None
    if values_readable(counts) and counts.numel() != num_experts:
        raise ValueError(f"{name} must hold expert ids in [0, num_experts={num_experts}), got {counts.numel() - 1}")
    return counts


def combine(y_ND: torch.Tensor, dispatch: Dispatch, num_tokens: int) -> torch.Tensor:
    """Weight expert outputs by their gates and sum them back per token.

    ``h_t = sum_i g_{i,t} FFN_i(u_t)`` (arXiv 2408.15664 eq. 1, without the residual). A token
    whose pairs were all dropped gets 0.

    Precision: the products and the sum over a token's ``K`` pairs are computed in float32 (float64
    for float64 outputs) and the result is cast to ``y_ND``'s dtype once, as Megatron-Core's
    unpermute does. Weighting and summing in bfloat16 rounds up to ``2K`` times: for
    ``MoELayer(64, 128, 16, 8)`` in bf16 it gave 1.78x the error of one bf16 rounding in issue 22
    (1.92x on the development CPU with bf16 experts forced), float32 then one cast 1.00x
    (tests/test_experts.py measures it).

    Args:
        y_ND: ``[N, D]`` expert outputs, rows as ``dispatch.token_ids``.
        dispatch: the :class:`Dispatch` of :func:`permute` (``gates`` ``[N]`` float32).
        num_tokens: ``T``.

    Returns:
        ``[T, D]`` in ``y_ND``'s dtype.

    Raises:
        ValueError: ``y_ND`` not an ``[N, D]`` real float tensor, ``dispatch`` not a
            :class:`Dispatch` with ``N`` rows, or ``num_tokens`` not an int >= 0.
    """
    check_score_tensor("y_ND", y_ND, (2,), "[N, D]")
    if not isinstance(dispatch, Dispatch):
        raise ValueError(f"dispatch must be the Dispatch of permute(), got {type(dispatch).__name__}")
    check_int("num_tokens", num_tokens, 0)
    if dispatch.token_ids.shape != (y_ND.shape[0],) or dispatch.gates.shape != (y_ND.shape[0],):
        raise ValueError(f"dispatch must describe y_ND's {y_ND.shape[0]} rows, got {dispatch.token_ids.numel()} token ids")
    wide = torch.promote_types(y_ND.dtype, torch.float32)
    weighted = y_ND.to(wide) * dispatch.gates.to(wide).unsqueeze(-1)
    out = weighted.new_zeros(num_tokens, y_ND.shape[-1])
    return out.index_add_(0, dispatch.token_ids, weighted).to(y_ND.dtype)


def _operand_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer's operands have: autocast's where it is on, else the promoted one."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 matrices in hardware."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def _aligned(dtype: torch.dtype, *dims: int) -> bool:
    """``grouped_mm`` wants every stride a multiple of 16 bytes."""
    align = 16 // torch.empty((), dtype=dtype).element_size()
    return all(d % align == 0 for d in dims)


def expert_compute_plan(
    device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int, use_grouped_mm: bool = True
) -> tuple[str, torch.dtype]:
    """The kernel and compute dtype the experts use for operands of ``dtype`` on ``device``.

    The rules and the measurements behind them are in this module's docstring.

    Returns:
        ``(kernel, compute_dtype)`` with kernel ``"grouped_mm"`` or ``"loop"``.

    Raises:
        ValueError: ``device`` not a ``torch.device``, ``dtype`` not a ``torch.dtype``, a size not
            an int >= 1, or ``use_grouped_mm`` not a bool.
    """
    if not isinstance(device, torch.device):
        raise ValueError(f"device must be a torch.device, got {device!r}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    check_int("d_model", d_model, 1)
    check_int("d_ff", d_ff, 1)
    check_bool("use_grouped_mm", use_grouped_mm)
    compute = dtype
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_native_bf16():
        compute = torch.float32
    usable = (
        use_grouped_mm
        and hasattr(F, "grouped_mm")
        and compute in ((torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16))
        and device.type in ("cpu", "cuda")
        and _aligned(compute, d_model, d_ff)
    )
    return ("grouped_mm" if usable else "loop"), compute


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient.

    ``grouped_mm``'s backward rejects a stride-0 gradient (the one ``out.sum().backward()``
    produces); this makes every gradient that reaches it a real tensor.
    """

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()


def _cast_for_compute(
    compute: torch.dtype, *sources: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``sources`` cast to ``compute``, and the ``(wide_copy, narrow_source)`` pairs among them
    that :func:`_recast_on_backward` keeps narrow for the backward."""
    casts = tuple(t.to(compute) for t in sources)
    return casts, [(c, t) for c, t in zip(casts, sources) if c.dtype.itemsize > t.dtype.itemsize]


@contextlib.contextmanager
def _recast_on_backward(copies: list[tuple[torch.Tensor, torch.Tensor]]):
    """Keep the narrow source instead of a widened copy among the tensors saved for backward.

    When bf16 operands are computed in float32 (see :func:`expert_compute_plan`), the GEMMs save
    their float32 operands for the backward, which would hold a float32 copy of every expert
    weight (``O(E*F*D)``) and of the input rows. Saving the bf16 source and casting it again in the
    backward costs one memory-bound pass and keeps the saved memory at the bf16 size.

    Args:
        copies: ``(wide_copy, narrow_source)`` pairs; the copy is ``narrow_source.to(wide)``.
    """
    if not copies:
        yield
        return
    # Only contiguous pairs: then a view of the copy (size, stride, offset) is the same view of
    # the source, and the backward recasts just that view (a per-expert slice, not all E experts).
    by_storage = {
        c.untyped_storage().data_ptr(): (c, s)
        for c, s in copies
        if c.is_contiguous() and s.is_contiguous() and c.storage_offset() == 0 and s.storage_offset() == 0
    }
    # Compose with hooks already active (e.g. save_on_cpu, or a memory probe): ours are innermost,
    # so the outer ones see what we save instead of nothing.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: None)(False)
    outer_pack, outer_unpack = top if top is not None else (lambda t: t, lambda t: t)

    def pack(t: torch.Tensor):
        entry = by_storage.get(t.untyped_storage().data_ptr())
        if entry is None or t.dtype != entry[0].dtype:
            return False, outer_pack(t)
        return True, (outer_pack(entry[1]), t.dtype, t.size(), t.stride(), t.storage_offset())

    def unpack(packed):
        recast, payload = packed
        if not recast:
            return outer_unpack(payload)
        source, dtype, size, stride, offset = payload
        return outer_unpack(source).as_strided(size, stride, offset).to(dtype)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts with weights stacked as 3-D parameters.

    ``w1``, ``w3``: ``[E, F, D]``; ``w2``: ``[E, D, F]`` (each expert's slice has ``nn.Linear``'s
    ``[out, in]`` layout, so conversion to and from Mixtral/Qwen-MoE experts is a stack).

    Args:
        num_experts: ``E``. d_model: ``D``. d_ff: ``F`` (hidden size of one expert).
        use_grouped_mm: use ``torch.nn.functional.grouped_mm`` where the dtype and shapes allow
            it (see :func:`expert_compute_plan`); otherwise (or when ``False``) loop over the
            experts' contiguous slices.

    Raises:
        ValueError: a size not an int >= 1, or ``use_grouped_mm`` not a bool.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, use_grouped_mm: bool = True) -> None:
        super().__init__()
        check_int("num_experts", num_experts, 1)
        check_int("d_model", d_model, 1)
        check_int("d_ff", d_ff, 1)
        check_bool("use_grouped_mm", use_grouped_mm)
        self.num_experts = num_experts
        self.use_grouped_mm = use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default, per expert.
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def plan(self, x: torch.Tensor) -> tuple[str, torch.dtype]:
        """``(kernel, compute_dtype)`` for input ``x`` under the current autocast state."""
        dtype = _operand_dtype(x, self.w1)
        d_ff, d_model = self.w1.shape[1:]
        return expert_compute_plan(x.device, dtype, d_model, d_ff, self.use_grouped_mm)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous rows.

        Args:
            x_ND: ``[N, D]`` rows sorted by expert. counts_E: ``[E]`` rows per expert
                (``sum(counts_E) == N``).

        Returns:
            ``[N, D]`` in the compute dtype of :meth:`plan` (float32 for bf16 on a CPU without
            native bf16; the autocast dtype under autocast; else the promoted input dtype).

        Raises:
            ValueError: ``x_ND`` not an ``[N, D]`` real float tensor, or ``counts_E`` not an ``[E]``
                integer tensor (whose values, on a CPU, sum to ``N``; not read on a GPU, where
                that would synchronise the host every call).
        """
        check_score_tensor("x_ND", x_ND, (2,), f"[N, D={self.w1.shape[2]}]")
        if x_ND.shape[1] != self.w1.shape[2]:
            raise ValueError(f"x_ND must have shape [N, D={self.w1.shape[2]}], got {tuple(x_ND.shape)}")
        if not is_integer_tensor(counts_E) or counts_E.dim() != 1:
            total, smallest = -1, -1
        elif not values_readable(counts_E):  # no host sync on a GPU; a fake tensor's size is symbolic
            total, smallest = x_ND.shape[0], 0
        elif counts_E.shape[0] != self.num_experts:
            total, smallest = -1, -1
        else:
            total, smallest = torch.stack([counts_E.sum(), counts_E.min()]).tolist()
        if total != x_ND.shape[0] or smallest < 0:
            raise ValueError(
                f"counts_E must be [E={self.num_experts}] integer rows per expert, >= 0, summing to "
                f"N={x_ND.shape[0]}, got {describe(counts_E)}"
            )
        kernel, compute = self.plan(x_ND)
        # Under autocast these casts are the ones autocast would make for a linear layer.
        (x_ND, w1, w3, w2), upcast = _cast_for_compute(compute, x_ND, self.w1, self.w3, self.w2)
        with torch.autocast(x_ND.device.type, enabled=False), _recast_on_backward(upcast):
            if kernel == "grouped_mm" and x_ND.shape[0] > 0:
                offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
                h = F.silu(F.grouped_mm(x_ND, w1.transpose(1, 2), offs=offs))
                h = h * F.grouped_mm(x_ND, w3.transpose(1, 2), offs=offs)
                return _DenseGrad.apply(F.grouped_mm(h, w2.transpose(1, 2), offs=offs))
            # split/unbind: one autograd node each, not one per expert (indexing w1[e] would add
            # a full [E, F, D] zero gradient per expert in the backward).
            outs = [
                F.linear(F.silu(F.linear(rows, a)) * F.linear(rows, b), c)
                for rows, a, b, c in zip(x_ND.split(counts_E.tolist()), w1.unbind(0), w3.unbind(0), w2.unbind(0))
            ]
            return torch.cat(outs) if outs else x_ND.new_empty(0, w2.shape[1])
