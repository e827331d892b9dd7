"""Adapter for routers without a selection bias: add one (``expert_bias``) to the router.

Shape legend: E routed experts.

Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, Llama 4, Jamba, ... choose their top-K from scores without
any bias. moebalance gives such a router a persistent float32 ``expert_bias`` buffer ``[E]``
(zeros) and runs its forward inside a :class:`~.selection.SelectionMode` that chooses the top-K on
``scores + expert_bias`` and hands the model's own code the unbiased scores of the chosen experts
(arXiv 2408.15664 eq. 3). The scores are whatever the router feeds its top-K: probabilities for a
softmax-then-top-K router (Mixtral, Qwen), sigmoid scores, or logits for a top-K-then-softmax
router (gpt-oss, DBRX); the bias lives on the same scale.

``save_pretrained`` writes ``<router>.expert_bias``; plain transformers has no slot for it (its
load report lists the key as UNEXPECTED) and routes without it: see ``moebalance verify``.
"""

from __future__ import annotations

import torch
from torch import nn

from moebalance.integrations.transformers.own_bias import BiasSlot

ADDED_BIAS_NAME = "expert_bias"


def add_slot(router_name: str, router: nn.Module, num_experts: int, device: torch.device) -> BiasSlot:
    """Register a zero ``[E]`` float32 ``expert_bias`` buffer on ``router`` and return its slot.

    Raises:
        ValueError: the router already has an attribute of that name that is not such a buffer.
    """
    if hasattr(router, ADDED_BIAS_NAME) and ADDED_BIAS_NAME not in router._buffers:
        raise ValueError(f"{router_name} ({type(router).__name__}) already has an attribute {ADDED_BIAS_NAME!r}")
    router.register_buffer(ADDED_BIAS_NAME, torch.zeros(num_experts, dtype=torch.float32, device=device))
    key = f"{router_name}.{ADDED_BIAS_NAME}" if router_name else ADDED_BIAS_NAME
    return BiasSlot(router, ADDED_BIAS_NAME, key, own=False)
