"""Routed experts with stacked weights and a sort-by-expert (dropless) dispatch.

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token,
N = T*K routed (token, slot) pairs.

Dispatch follows the permute -> grouped compute -> unpermute pattern of torchtitan and megablocks:
the ``N`` pairs are sorted (stably) by expert, each expert's rows are contiguous, one grouped
matrix multiply (``torch.nn.functional.grouped_mm`` where present) or a loop over contiguous
slices runs all experts, and the results are scattered back with ``index_add``. Memory is linear
in ``T*K*D``: there is no ``[T, E, D]`` tensor and no padding to the largest expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Dispatch", "GroupedExperts", "SwiGLU", "combine", "permute"]


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020), used for shared experts
    (DeepSeekMoE) and dense layers.

    Args:
        d_model: ``D``. d_ff: hidden size ``F``.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Dispatch:
    """Where each routed pair went.

    Attributes:
        token_ids: ``[N]`` int64 source token of each expert-sorted row.
        gates: ``[N]`` float32 gate value of each expert-sorted row.
        counts: ``[E]`` int64 rows per expert (the dropless ``tokens_per_expert``).
    """

    token_ids: torch.Tensor
    gates: torch.Tensor
    counts: torch.Tensor


def permute(
    x_TD: torch.Tensor, indices_TK: torch.Tensor, gates_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, Dispatch]:
    """Gather token rows in expert order.

    Args:
        x_TD: ``[T, D]`` tokens. indices_TK: ``[T, K]`` int64 expert ids. gates_TK: ``[T, K]`` gates.
        num_experts: ``E``.

    Returns:
        ``x_ND`` ``[T*K, D]`` rows sorted by expert (stable: token order kept inside an expert),
        and the :class:`Dispatch` needed to combine the results.
    """
    top_k = indices_TK.shape[1]
    flat_experts = indices_TK.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_ids = order // top_k
    counts = torch.bincount(flat_experts, minlength=num_experts)
    return x_TD[token_ids], Dispatch(token_ids, gates_TK.reshape(-1)[order], counts)


def combine(y_ND: torch.Tensor, dispatch: Dispatch, num_tokens: int) -> torch.Tensor:
    """Weight expert outputs by their gates and sum them back per token.

    ``h_t = sum_i g_{i,t} FFN_i(u_t)`` (arXiv 2408.15664 eq. 1, without the residual).

    Returns:
        ``[T, D]`` in ``y_ND``'s dtype.
    """
    weighted = y_ND * dispatch.gates.to(y_ND.dtype).unsqueeze(-1)
    out = y_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out.index_add_(0, dispatch.token_ids, weighted)


def _grouped_mm_usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``grouped_mm`` needs float32/bfloat16 operands whose strides are 16-byte multiples."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    align = 16 // x.element_size()
    return all(w.dtype == x.dtype and w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts with weights stacked as 3-D parameters.

    ``w1``, ``w3``: ``[E, F, D]``; ``w2``: ``[E, D, F]`` (each expert's slice has ``nn.Linear``'s
    ``[out, in]`` layout, so conversion to and from Mixtral/Qwen-MoE experts is a stack).

    Args:
        num_experts: ``E``. d_model: ``D``. d_ff: ``F`` (hidden size of one expert).
        use_grouped_mm: use ``torch.nn.functional.grouped_mm`` where the dtype and shapes allow
            it; otherwise (or when ``False``) loop over experts' contiguous slices.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, use_grouped_mm: bool = True) -> None:
        super().__init__()
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

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous rows.

        Args:
            x_ND: ``[N, D]`` rows sorted by expert. counts_E: ``[E]`` rows per expert.

        Returns:
            ``[N, D]``.
        """
        w1, w3, w2 = self.w1, self.w3, self.w2
        if torch.is_autocast_enabled(x_ND.device.type):
            dtype = torch.get_autocast_dtype(x_ND.device.type)
            x_ND, w1, w3, w2 = (t.to(dtype) for t in (x_ND, w1, w3, w2))
        if self.use_grouped_mm and x_ND.shape[0] > 0 and _grouped_mm_usable(x_ND, w1, w2):
            offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
            h = F.silu(F.grouped_mm(x_ND, w1.transpose(1, 2), offs=offs))
            h = h * F.grouped_mm(x_ND, w3.transpose(1, 2), offs=offs)
            return F.grouped_mm(h, w2.transpose(1, 2), offs=offs)
        out = x_ND.new_empty(x_ND.shape[0], w2.shape[1])
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                rows = x_ND[start : start + n]
                out[start : start + n] = (F.silu(rows @ w1[e].T) * (rows @ w3[e].T)) @ w2[e].T
                start += n
        return out
