"""Expert parallelism: the routed experts of an MoE layer sharded over a process group.

Shape legend: T tokens on this rank, D model dim, E experts in all, R ranks of the expert-parallel
group, E_local = E / R experts per rank, N = T*K routed (token, slot) rows.

Rank ``r`` owns experts ``[r * E_local, (r + 1) * E_local)`` (contiguous, as in Megatron-Core and
torchtitan). The router and the shared experts stay replicated. One forward:

1. route locally (the Loss-Free bias selects, arXiv 2408.15664 eq. 3) and sort the rows by
   expert (:func:`~moebalance.experts.permute`); rows for rank ``r``'s experts are then contiguous;
2. exchange the per-expert counts, then the rows (``all_to_all_single`` with uneven splits);
3. regroup the received rows by local expert, run the local experts, undo the regrouping;
4. send the results back (the reverse exchange) and combine them with the gates.

Both exchanges go through autograd (their backward is the opposite exchange), so the gradient of
an expert weight sums the contributions of the tokens of every rank. The collectives themselves
live in :mod:`moebalance.parallel.process`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moebalance.experts import GroupedExperts, combine, permute
from moebalance.moe import MoELayer, MoEOutput
from moebalance.parallel.process import DistContext, all_to_all_rows, exchange_counts, gather_expert_shards
from moebalance.routing import TopKRouter

__all__ = ["ExpertParallelMoELayer", "apply_expert_parallel"]


class ExpertParallelMoELayer(MoELayer):
    """An :class:`~moebalance.moe.MoELayer` whose routed experts are sharded over ``group``.

    Built from a full single-process layer (same on every rank, e.g. same seed): it keeps the
    layer's router and shared experts and copies this rank's slice of the expert weights, so its
    output on any tokens equals the full layer's output on the same tokens. It subclasses
    :class:`MoELayer` so models, balancers and metrics treat it as one (``router`` is the same
    object), and its ``state_dict`` keys are the full layer's (with ``E_local`` experts; see
    :func:`full_state_dict` for the gathered one).

    Every rank of ``group`` must call ``forward`` the same number of times (the exchanges are
    collectives), possibly with zero tokens, and, in training, backward as many times.

    Args:
        layer: the full layer to shard.
        group: the expert-parallel process group (default: all ranks).

    Raises:
        ValueError: the number of experts is not a multiple of the group size; a capacity factor
            or expert-choice routing (not supported here).
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, layer: MoELayer, group: Any = None) -> None:
        # nn.Module.__init__, not MoELayer.__init__: the router and shared experts are taken over
        # from ``layer`` and only a slice of its experts is kept, so nothing is built twice.
        nn.Module.__init__(self)
        if not dist.is_initialized():
            raise RuntimeError("expert parallelism needs an initialised torch.distributed process group")
        if getattr(layer, "capacity_factor", None) is not None:
            raise ValueError("model.capacity_factor is not supported with expert parallelism (dropless only)")
        if type(layer.router) is not TopKRouter:  # ExpertChoiceRouter subclasses it
            raise ValueError("expert parallelism needs top-K routing (model.routing=topk)")
        self.capacity_factor = None
        self.drop_policy = getattr(layer, "drop_policy", "position")
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        num_experts = layer.router.num_experts
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"model.num_experts={num_experts} must be a multiple of the expert-parallel size {self.ep_size}"
            )
        self.num_local_experts = num_experts // self.ep_size
        full = layer.experts
        d_ff, d_model = full.w1.shape[1], full.w1.shape[2]
        self.router = layer.router
        self.shared_experts = layer.shared_experts
        self.experts = GroupedExperts(self.num_local_experts, d_model, d_ff, full.use_grouped_mm)
        self.experts.to(device=full.w1.device, dtype=full.w1.dtype)
        lo, hi = self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                getattr(self.experts, name).copy_(getattr(full, name)[lo:hi])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
        """Route, exchange, compute, exchange back and combine (same contract as :meth:`MoELayer.forward`)."""
        routing = self.router(x, mask)
        x_TD = x.reshape(-1, x.shape[-1])
        x_ND, dispatch = permute(x_TD, routing.indices, routing.gates, self.router.num_experts)
        send_RE = dispatch.counts.view(self.ep_size, self.num_local_experts)
        recv_RE = exchange_counts(send_RE, self.group)
        send_splits, recv_splits = send_RE.sum(1).tolist(), recv_RE.sum(1).tolist()
        x_recv = all_to_all_rows(x_ND, send_splits, recv_splits, self.group)
        # Received rows come grouped by source rank, then by local expert; the experts need them
        # grouped by expert. A stable sort keeps a fixed order, so results are deterministic.
        local_ids = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep_size)
        local_ids = local_ids.repeat_interleave(recv_RE.reshape(-1))
        order = torch.argsort(local_ids, stable=True)
        x_sorted = x_recv[order]
        y_sorted = self.experts(x_sorted, recv_RE.sum(0))
        if x_sorted.requires_grad and not y_sorted.requires_grad:
            # No rows arrived, so the experts did nothing. The reverse exchange's backward is a
            # collective every rank must join, so keep it in the graph; and give the local experts
            # a zero gradient (not None), as the full layer's stacked weights get: AdamW then
            # decays and moves them exactly as in the single-process run.
            tie = x_sorted.sum() + sum(p.sum() for p in self.experts.parameters())
            y_sorted = y_sorted + 0.0 * tie
        y_recv = y_sorted[torch.argsort(order)]
        y_ND = all_to_all_rows(y_recv, recv_splits, send_splits, self.group)
        out_TD = combine(y_ND, dispatch, x_TD.shape[0])
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return MoEOutput(output=out_TD.to(x.dtype).view_as(x), routing=routing)

    def extra_repr(self) -> str:
        return f"ep_rank={self.ep_rank}, ep_size={self.ep_size}, num_local_experts={self.num_local_experts}"


def apply_expert_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Replace every :class:`~moebalance.moe.MoELayer` inside ``model`` by its expert-parallel shard.

    Call it on identical models on every rank (same seed), before building the optimizer and
    before wrapping in DDP. Returns ``model`` (changed in place).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELayer) and not isinstance(child, ExpertParallelMoELayer):
                setattr(parent, name, ExpertParallelMoELayer(child, group))
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that expert parallelism shards (DDP must leave them alone)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoELayer):
            names += [f"{mod_name}.experts.{p}" for p, _ in mod.experts.named_parameters()]
    return names


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The single-process ``state_dict`` of ``model`` (a collective under expert parallelism).

    Sharded expert weights are gathered into the full ``[E, ...]`` stacks, so the checkpoint
    loads into a plain :class:`~moebalance.train.model.MoETransformer`.
    """
    state = model.state_dict()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoELayer):
            for p_name, p in mod.experts.named_parameters():
                state[f"{mod_name}.experts.{p_name}"] = gather_expert_shards(p, mod.group)
    return state
