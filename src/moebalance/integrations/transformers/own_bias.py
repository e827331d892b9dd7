"""Adapter for routers that carry a selection bias of their own: train *that* slot.

Shape legend: E routed experts, R rows of a stacked bias.

Most MoE families released since DeepSeek-V3 ship a bias that only selects (trained by the
paper's Algorithm 1 in their own pre-training) and route with it in plain transformers, vLLM and
SGLang. Where it lives differs by family, which is why it is looked up by name and place rather
than by class:

* on the router: ``gate.e_score_correction_bias`` (DeepSeek-V3 and its descendants, GLM-4.5,
  dots1, ...), ``gate.expert_bias``;
* in a child of the router: ``gate.moe_statics.e_score_correction_bias``, an ``nn.Parameter`` of
  shape ``[1, E]`` (ERNIE-4.5);
* on the MoE block that passes it to the router: ``mlp.e_score_correction_bias`` (MiniMax-M2),
  ``mlp.expert_bias`` (AFMoE, LFM2-MoE with ``use_expert_bias``).

The slot found is adopted as it is (buffer or Parameter, same name, same state-dict key, kept
float32, never given a gradient), so a checkpoint saved after training is read by every engine
that reads the model's own bias. Whether the slot really steers the choice is proven by the probe
(:func:`moebalance.integrations.transformers.probe.check_router`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Names under which families keep a selection bias.
OWN_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")


@dataclass(frozen=True)
class BiasSlot:
    """Where a router's Loss-Free bias lives.

    Attributes:
        holder: the module whose parameter or buffer holds it. name: the attribute name there.
        key: its state-dict key in the model (``model.layers.3.mlp.gate.e_score_correction_bias``).
        own: True for the model's own slot (plain transformers routes with it), False for the
            ``expert_bias`` buffer moebalance added.
    """

    holder: nn.Module
    name: str
    key: str
    own: bool

    def tensor(self) -> torch.Tensor:
        """The live ``[E]`` float32 bias (the buffer or Parameter itself, or a view of a ``[1, E]``
        one): writing to it in place steers routing."""
        t = getattr(self.holder, self.name)
        return t if t.dim() == 1 else t.detach().view(-1)


def _candidates(router_name: str, router: nn.Module, modules: dict[str, nn.Module]):
    """``(holder name, holder, attribute)`` of every tensor named like a selection bias on the router,
    on its direct children, or directly on its parent (the MoE block)."""
    parent_name = router_name.rpartition(".")[0]
    places = [(router_name, router)]
    places += [(f"{router_name}.{n}", c) for n, c in router.named_children()]
    if parent_name in modules and parent_name != router_name:
        places.append((parent_name, modules[parent_name]))
    for holder_name, holder in places:
        for attr in OWN_BIAS_NAMES:
            t = holder._parameters.get(attr, holder._buffers.get(attr))
            if isinstance(t, torch.Tensor):
                yield holder_name, holder, attr


def find_own_slot(router_name: str, router: nn.Module, num_experts: int,
                  modules: dict[str, nn.Module]) -> tuple[BiasSlot | None, str | None]:
    """The model's own selection-bias slot of ``router``, if it has one.

    Returns:
        ``(slot, None)``; ``(None, None)`` when it has none; ``(None, reason)`` when one is there but
        cannot be used (a stacked ``[R, E]`` bias with ``R > 1``, another size).
    """
    for holder_name, holder, attr in _candidates(router_name, router, modules):
        t = getattr(holder, attr)
        if t.numel() == num_experts and t.shape[-1] == num_experts:
            key = f"{holder_name}.{attr}" if holder_name else attr
            return BiasSlot(holder, attr, key, own=True), None
        if t.shape[-1] == num_experts:
            return None, (
                f"its own bias {holder_name}.{attr} has shape {tuple(t.shape)}: which of its rows routes "
                "which tokens is not known to moebalance"
            )
    return None, None


def adopt(slot: BiasSlot) -> None:
    """Make the slot's tensor float32 (same kind, same name) and keep it out of autograd."""
    holder, name = slot.holder, slot.name
    t = getattr(holder, name)
    with torch.no_grad():
        if isinstance(t, nn.Parameter):
            holder._parameters[name] = nn.Parameter(t.detach().to(torch.float32), requires_grad=False)
        else:
            holder._buffers[name] = t.detach().to(torch.float32)
