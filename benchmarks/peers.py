"""The `transformers` MoE blocks the benchmark compares against, loaded with our layer's weights.

* Mixtral's sparse block (softmax router, top-K renormalised, SwiGLU experts) with each experts
  implementation that transformers 5.x registers: ``eager`` (loop over the experts that got
  tokens), ``batched_mm`` (gathers one weight matrix per (token, slot) pair and runs ``bmm``) and
  ``grouped_mm`` (sort by expert, ``torch.nn.functional.grouped_mm``). The implementation is
  chosen by ``config._experts_implementation``, as ``from_pretrained(experts_implementation=...)``
  would set it.
* Qwen2-MoE's sparse block: softmax router without renormalisation, plus one shared expert whose
  output is scaled by a sigmoid gate (``shared_expert_gate``, a ``D -> 1`` linear). Our layer has
  no such gate, so its output differs from Qwen's by that scalar per token; the work differs by one
  ``[T, D] x [D, 1]`` product.

Weight mapping (ours -> transformers): ``router.weight -> gate.weight``;
``cat(w1, w3, dim=1) -> experts.gate_up_proj`` (``[E, 2F, D]``); ``w2 -> experts.down_proj``;
shared SwiGLU ``w1/w3/w2 -> shared_expert.gate_proj/up_proj/down_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from moebalance.moe import MoELayer

MIXTRAL_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def ours_like_mixtral(d_model: int, d_ff: int, num_experts: int, top_k: int) -> MoELayer:
    """Our layer with Mixtral's routing: softmax scores, top-K renormalised, no shared expert."""
    return MoELayer(d_model, d_ff, num_experts, top_k, score_func="softmax", norm_topk_prob=True)


def ours_like_qwen2(d_model: int, d_ff: int, num_experts: int, top_k: int) -> MoELayer:
    """Our layer with Qwen2-MoE's routing (softmax, not renormalised) and one shared expert of size F."""
    return MoELayer(d_model, d_ff, num_experts, top_k, num_shared_experts=1, score_func="softmax", norm_topk_prob=False)


@torch.no_grad()
def _load_experts(peer_experts: nn.Module, ours: MoELayer) -> None:
    e = ours.experts
    peer_experts.gate_up_proj.copy_(torch.cat([e.w1, e.w3], dim=1))
    peer_experts.down_proj.copy_(e.w2)


def mixtral_block(ours: MoELayer, implementation: str) -> nn.Module:
    """A ``MixtralSparseMoeBlock`` with ``ours``' weights. Raises ``ValueError`` for an unknown implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if implementation not in MIXTRAL_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {MIXTRAL_IMPLEMENTATIONS}, got {implementation!r}")
    r, e = ours.router, ours.experts
    cfg = MixtralConfig(
        hidden_size=r.d_model,
        intermediate_size=e.w1.shape[1],
        num_local_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(r.weight)
    _load_experts(block.experts, ours)
    return block


def qwen2_block(ours: MoELayer, implementation: str = "grouped_mm") -> nn.Module:
    """A ``Qwen2MoeSparseMoeBlock`` with ``ours``' weights (``ours`` from :func:`ours_like_qwen2`)."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    r, e, s = ours.router, ours.experts, ours.shared_experts
    cfg = Qwen2MoeConfig(
        hidden_size=r.d_model,
        moe_intermediate_size=e.w1.shape[1],
        shared_expert_intermediate_size=s.w1.weight.shape[0],
        num_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        norm_topk_prob=ours.router.norm_topk_prob,
        hidden_act="silu",
    )
    cfg._experts_implementation = implementation
    block = Qwen2MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(r.weight)
        block.shared_expert.gate_proj.weight.copy_(s.w1.weight)
        block.shared_expert.up_proj.weight.copy_(s.w3.weight)
        block.shared_expert.down_proj.weight.copy_(s.w2.weight)
        nn.init.normal_(block.shared_expert_gate.weight, std=0.02)
    _load_experts(block.experts, ours)
    return block


def peer_blocks(
    x: torch.Tensor, d_ff: int, num_experts: int, top_k: int, implementations: list[str], max_gather_gb: float
) -> tuple[dict, dict[str, str]]:
    """Our layers and the transformers blocks with the same weights, on ``x``'s device and dtype.

    Args:
        x: ``[1, T, D]`` input every block's forward reads.
        implementations: Mixtral experts implementations to build (of :data:`MIXTRAL_IMPLEMENTATIONS`).
        max_gather_gb: skip Mixtral ``batched_mm`` when the weights it gathers exceed this (GiB).

    Returns:
        ``({name: (module, forward)}, skipped)``: ``ours``, ``mixtral_<impl>``..., ``ours_shared``,
        ``qwen2_grouped_mm``; ``skipped`` maps a left-out block to the reason.
    """
    _, T, D = x.shape
    torch.manual_seed(0)
    mix = ours_like_mixtral(D, d_ff, num_experts, top_k)
    qwen = ours_like_qwen2(D, d_ff, num_experts, top_k)
    blocks = {"ours": (mix, lambda m=mix: m(x).output)}
    skipped = {}
    for impl in implementations:
        # batched_mm gathers one [2F, D] and one [D, F] weight matrix per (token, slot) pair.
        gathered = T * top_k * 3 * d_ff * D * x.element_size()
        if impl == "batched_mm" and gathered > max_gather_gb * 2**30:
            skipped[f"mixtral_{impl}"] = f"would gather {gathered / 2**30:.1f} GiB of expert weights"
            continue
        blk = mixtral_block(mix, impl)
        blocks[f"mixtral_{impl}"] = (blk, lambda m=blk: m(x))
    blocks["ours_shared"] = (qwen, lambda m=qwen: m(x).output)
    blk = qwen2_block(qwen, "grouped_mm")
    blocks["qwen2_grouped_mm"] = (blk, lambda m=blk: m(x))
    for m, _ in blocks.values():
        m.to(x.device, x.dtype)
    return blocks, skipped
