"""The Mixture-of-Experts layer: router + routed experts + optional shared experts.

``h_t = sum_i g_{i,t} FFN_i(u_t) + sum_j FFN^shared_j(u_t)`` (arXiv 2408.15664 eq. 1 without the
residual, which the Transformer block adds; shared experts as in DeepSeekMoE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moebalance.checks import check_choice, check_int, check_number
from moebalance.experts import Dispatch, DropPolicy, GroupedExperts, SwiGLU, combine, expert_capacity, permute
from moebalance.routing import BiasMode, ExpertChoiceOutput, ExpertChoiceRouter, RouterOutput, ScoreFunc, TopKRouter

__all__ = ["MoELayer", "MoEOutput"]


@dataclass
class MoEOutput:
    """Result of :meth:`MoELayer.forward`.

    Attributes:
        output: same shape as the input (``[T, D]`` or ``[B, S, D]``).
        routing: the router's :class:`~moebalance.routing.RouterOutput` (for losses and metrics).
        dropped_tokens: 0-dim int64, (token, slot) pairs of real tokens dropped by the capacity
            factor in this call (always 0 when dropless). ``routing.tokens_per_expert`` counts
            the load *before* dropping: it is what the router asked for, and what the Loss-Free
            bias update balances.
    """

    output: torch.Tensor
    routing: RouterOutput
    dropped_tokens: torch.Tensor | None = None


class MoELayer(nn.Module):
    """MoE feed-forward layer (dropless by default) with a Loss-Free Balancing router.

    Args:
        d_model: ``D``.
        d_ff: hidden size ``F`` of one routed expert (and of each shared expert).
        num_experts: ``E`` routed experts.
        top_k: ``K`` experts per token.
        num_shared_experts: experts every token passes through (DeepSeekMoE), fused into one
            SwiGLU of hidden size ``num_shared_experts * d_ff``.
        score_func, norm_topk_prob, route_scale, bias_mode, n_group, topk_group: passed to
            :class:`~moebalance.routing.TopKRouter`.
        use_grouped_mm: see :class:`~moebalance.experts.GroupedExperts`.
        routing: ``"topk"`` (token choice) or ``"expert_choice"``
            (:class:`~moebalance.routing.ExpertChoiceRouter`, which ignores ``bias_mode`` and groups).
        expert_choice_capacity: capacity factor of expert-choice routing.
        capacity_factor: ``None`` (default): dropless. A float ``> 0``: each expert takes at most
            ``ceil(capacity_factor * T * K / E)`` (token, slot) pairs per call (GShard/Switch);
            the rest are dropped (they add nothing to the output; the residual carries the token).
        drop_policy: which pairs an over-full expert keeps, ``"position"`` (earliest tokens,
            GShard/Switch) or ``"score"`` (largest gates); see :func:`~moebalance.experts.permute`.

    Raises:
        ValueError: a field of the wrong type or outside its range (the message names it), also
            one that the chosen ``routing`` does not use (``expert_choice_capacity`` with
            ``"topk"``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        num_shared_experts: int = 0,
        score_func: ScoreFunc = "sigmoid",
        norm_topk_prob: bool = False,
        route_scale: float = 1.0,
        bias_mode: BiasMode = "additive",
        n_group: int = 1,
        topk_group: int = 1,
        use_grouped_mm: bool = True,
        routing: str = "topk",
        expert_choice_capacity: float = 1.0,
        capacity_factor: float | None = None,
        drop_policy: DropPolicy = "position",
    ) -> None:
        super().__init__()
        if capacity_factor is not None:
            check_number("capacity_factor", capacity_factor, 0.0, low_open=True)
        check_choice("drop_policy", drop_policy, ("position", "score"))
        check_choice("routing", routing, ("topk", "expert_choice"))
        if capacity_factor is not None and routing == "expert_choice":
            raise ValueError("capacity_factor applies to routing='topk'; expert choice has expert_choice_capacity")
        check_number("expert_choice_capacity", expert_choice_capacity, 0.0, low_open=True)
        check_int("d_ff", d_ff, 1)
        check_int("num_shared_experts", num_shared_experts, 0)
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        if routing == "expert_choice":
            self.router: TopKRouter = ExpertChoiceRouter(
                d_model, num_experts, top_k, score_func, norm_topk_prob, route_scale, expert_choice_capacity
            )
        else:
            self.router = TopKRouter(
                d_model, num_experts, top_k, score_func, norm_topk_prob, route_scale, bias_mode, n_group, topk_group
            )
        self.experts = GroupedExperts(num_experts, d_model, d_ff, use_grouped_mm)
        self.shared_experts = SwiGLU(d_model, num_shared_experts * d_ff) if num_shared_experts else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
        """Route, compute and combine.

        Args:
            x: ``[T, D]`` or ``[B, S, D]``.
            mask: optional ``[T]`` / ``[B, S]`` bool, ``False`` for padding. Padding tokens are still
                computed (their output is harmless) but count for no load and no loss.

        Returns:
            :class:`MoEOutput` with ``output`` of ``x``'s shape and dtype.

        Raises:
            ValueError: as :meth:`~moebalance.routing.TopKRouter.forward` (``x`` and ``mask``).
        """
        routing = self.router(x, mask)
        x_TD = x.reshape(-1, x.shape[-1])
        if isinstance(routing, ExpertChoiceOutput):  # [E, C] token ids: rows already grouped by expert
            dispatch = Dispatch(routing.indices.reshape(-1), routing.gates.reshape(-1), routing.tokens_per_expert)
            x_ND = x_TD[dispatch.token_ids]
        else:
            num_experts = self.router.num_experts
            capacity = None
            if self.capacity_factor is not None:
                capacity = expert_capacity(x_TD.shape[0], self.router.top_k, num_experts, self.capacity_factor)
            x_ND, dispatch = permute(
                x_TD, routing.indices, routing.gates, num_experts, capacity, self.drop_policy, routing.mask
            )
        y_ND = self.experts(x_ND, dispatch.counts)
        out_TD = combine(y_ND, dispatch, x_TD.shape[0])
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        if dispatch.dropped is not None:
            routing.dropped_tokens = dispatch.dropped  # so the metrics of a whole model see it
        return MoEOutput(output=out_TD.to(x.dtype).view_as(x), routing=routing, dropped_tokens=dispatch.dropped)
