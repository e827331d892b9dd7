"""The supported router classes and the two family adapters: softmax routers get a patched
``forward``; DeepSeek-V3 keeps its own ``e_score_correction_bias`` and only gets a counting hook.

Shape legend: T tokens, D hidden size, E routed experts, K experts per token.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moebalance.integrations.transformers.routers import TokenMask, count, count_hook, init_counters, keep_fp32_apply
from moebalance.routing import route_topk

log = logging.getLogger("moebalance.integrations.transformers")

TESTED_TRANSFORMERS_VERSIONS = ("5.24.0",)


@dataclass(frozen=True)
class Family:
    """How one router class scores, as read from its transformers source."""

    family: str
    native_bias: str | None = None  # name of the model's own selection-bias buffer, if any
    renormalize: Literal["always", "norm_topk_prob"] = "norm_topk_prob"
    cast_weights_to_logits_dtype: bool = True


SUPPORTED_ROUTERS: dict[str, Family] = {
    "MixtralTopKRouter": Family("Mixtral", renormalize="always", cast_weights_to_logits_dtype=False),
    "Qwen2MoeTopKRouter": Family("Qwen2-MoE"),
    "Qwen3MoeTopKRouter": Family("Qwen3-MoE"),
    "OlmoeTopKRouter": Family("OLMoE"),
    "DeepseekV3TopkRouter": Family("DeepSeek-V3", native_bias="e_score_correction_bias"),
}

SUPPORTED_TEXT = ", ".join(f"{f.family} ({name})" for name, f in SUPPORTED_ROUTERS.items())


def family_of(module: nn.Module) -> Family | None:
    """The :class:`Family` of a router module (by class name, subclasses included), else ``None``."""
    for cls in type(module).__mro__:
        if cls.__name__ in SUPPORTED_ROUTERS:
            return SUPPORTED_ROUTERS[cls.__name__]
    return None


def normalises_single_gate(router: nn.Module) -> bool:
    """True when the router renormalises the gate of a top-1 choice, making it a constant.

    transformers does this (Mixtral always; the others with ``norm_topk_prob``); the core
    :class:`~moebalance.routing.TopKRouter` refuses the combination instead.
    """
    spec: Family = router._moebalance_family
    return router.top_k == 1 and (spec.renormalize == "always" or bool(getattr(router, "norm_topk_prob", False)))


# ---------------------------------------------------------------------------------------------
# Softmax families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): patched forward
# ---------------------------------------------------------------------------------------------


def softmax_router_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Replacement ``forward`` of a softmax top-K router (Mixtral, Qwen2/3-MoE, OLMoE in 5.x).

    Same operations as the model's own router, except that the top-K is chosen on
    ``probs + expert_bias`` (arXiv 2408.15664 eq. 3); the gate weights are gathered from the
    unbiased ``probs``. With a zero bias the result is bit-identical to the original.

    Returns:
        ``(router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])`` as transformers does.
    """
    spec: Family = self._moebalance_family
    hidden_TD = hidden_states.reshape(-1, self.hidden_dim)
    logits_TE = F.linear(hidden_TD, self.weight)
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    index_TK = route_topk(probs_TE.detach(), self.top_k, self.expert_bias)
    weights_TK = probs_TE.gather(1, index_TK)  # unbiased: the bias only selects
    if spec.renormalize == "always" or self.norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if spec.cast_weights_to_logits_dtype:
        weights_TK = weights_TK.to(logits_TE.dtype)
    count(self, index_TK)
    return logits_TE, weights_TK, index_TK


def check_patch_matches(router: nn.Module, original_forward: Callable) -> None:
    """Run the original and the patched router on a probe (zero bias) and require identical outputs.

    The probe uses its own finite weight ``[E, D]`` and input ``[2, 8, D]`` (fixed seed, the
    router's dtype and device), swapped in for the duration of the check: the result does not
    depend on the model's current weight values, so the check is the same on freshly initialised,
    trained, or uninitialised weights (``to_empty`` memory, NaN/Inf). The probe leaves the global
    RNG, the router's weight, the bias and the load counts untouched.

    Skipped on a meta-device router (nothing to compute).

    Raises:
        RuntimeError: an output differs (another transformers release routes differently).
    """
    weight = router.weight
    if weight.device.type == "meta":
        return
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, 8, router.hidden_dim, generator=gen).to(weight.device, weight.dtype)
    probe_weight = torch.randn(tuple(weight.shape), generator=gen).to(weight.device, weight.dtype)
    was_training = router.training
    saved = router.expert_bias.clone(), router.moebalance_eval_counts.clone()
    router.eval()
    router._parameters["weight"] = nn.Parameter(probe_weight, requires_grad=False)
    try:
        with torch.no_grad():
            ref = original_forward(probe)
            router.expert_bias.zero_()
            got = router.forward(probe)
    finally:
        router._parameters["weight"] = weight
        router.expert_bias.copy_(saved[0])
        router.moebalance_eval_counts.copy_(saved[1])
        router.train(was_training)
    for a, b, what in zip(ref, got, ("router_logits", "top_k_weights", "top_k_index")):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            import transformers

            raise RuntimeError(
                f"{type(router).__name__} of transformers {transformers.__version__} computes {what} "
                f"differently from what moebalance expects (checked: {', '.join(TESTED_TRANSFORMERS_VERSIONS)}); "
                "refusing to patch it"
            )


def _patch_softmax(router: nn.Module) -> None:
    device = router.weight.device
    router.register_buffer("expert_bias", torch.zeros(router.num_experts, dtype=torch.float32, device=device))
    router._moebalance_bias_name = "expert_bias"
    original = router.forward
    router.forward = types.MethodType(softmax_router_forward, router)
    check_patch_matches(router, original)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3: its own bias, a counting hook
# ---------------------------------------------------------------------------------------------


def _adopt_native_bias(router: nn.Module, name: str) -> None:
    bias = getattr(router, name)
    router._buffers[name] = bias.detach().to(torch.float32)
    router._moebalance_bias_name = name
    router.register_forward_hook(count_hook)


def patch_router(router: nn.Module, mask: TokenMask) -> None:
    """Make ``router`` carry a float32 Loss-Free bias and count its loads (the family's adapter).

    Raises:
        RuntimeError: from :func:`check_patch_matches`.
    """
    spec = family_of(router)
    router._moebalance_family = spec
    init_counters(router, mask)
    if spec.native_bias is not None:
        _adopt_native_bias(router, spec.native_bias)
    else:
        _patch_softmax(router)
    router._apply = types.MethodType(keep_fp32_apply, router)
