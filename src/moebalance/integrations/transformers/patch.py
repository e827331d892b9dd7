"""Putting Loss-Free Balancing into a model's routers, proven by the probe, or not at all.

Shape legend: E routed experts, K experts per token.

:func:`install` finds the routers (:mod:`.discovery`), gives each its bias slot (the model's own,
:mod:`.own_bias`, or an added ``expert_bias``, :mod:`.added_bias`), load counters and the
selection mode (:mod:`.selection`), then runs the probe (:mod:`.probe`). If anything fails, every
router is put back as it was and the error names the router class and the reason.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
from torch import nn

from moebalance.integrations.transformers.added_bias import add_slot
from moebalance.integrations.transformers.discovery import Router, expert_counts, find_routers, probe_batch
from moebalance.integrations.transformers.own_bias import BiasSlot, adopt, find_own_slot
from moebalance.integrations.transformers.probe import check_identical, check_steers, tensors_of
from moebalance.integrations.transformers.routers import COUNTERS, TokenMask, init_counters, keep_fp32
from moebalance.integrations.transformers.scores import check_scores
from moebalance.integrations.transformers.selection import steer_forward, unsteer_forward

log = logging.getLogger("moebalance.integrations.transformers")

#: transformers releases the adapters and the coverage table were generated with.
TESTED_TRANSFORMERS_VERSIONS = ("5.25.0",)


def _device(module: nn.Module, fallback) -> torch.device:
    """The device of ``module``'s first parameter or buffer, else of ``fallback``'s (a module or a
    weak reference to one)."""
    if isinstance(fallback, weakref.ref):
        fallback = fallback()
    for m in (module, fallback):
        if m is None:
            continue
        t = next(iter(m.parameters()), None)
        t = next(iter(m.buffers()), None) if t is None else t
        if t is not None:
            return t.device
    return torch.device("cpu")


def _no_router_message(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    experts, ks = expert_counts(config) if config is not None else (set(), set())
    what = (
        f"over {sorted(experts)} experts with k in {sorted(ks)}" if experts and ks
        else "over the experts (its config names no number of experts or of experts per token)"
    )
    return (
        f"no MoE router found in {type(model).__name__}: no module makes a torch.topk choice {what} in a probe "
        "forward. moebalance steers routers that pick K experts per token with one top-K; a router that picks "
        "them otherwise (a masked max, hash routing) or lets experts pick tokens cannot carry a Loss-Free bias"
    )


def _patch_one(r: Router, modules: dict[str, nn.Module], mask: TokenMask, model: nn.Module) -> BiasSlot:
    slot, why = find_own_slot(r.name, r.module, r.num_experts, modules)
    if why is not None:
        raise ValueError(f"{r.name} ({type(r.module).__name__}): {why}")
    device = _device(r.module, model)
    if slot is not None:
        adopt(slot)
    else:
        slot = add_slot(r.name, r.module, r.num_experts, device)
    init_counters(r.module, r.num_experts, device, mask)
    steer_forward(r.module, r.num_experts, r.top_k, None if slot.own else slot.name)
    # A weak reference: a deep copy of the router (PEFT modules_to_save) must not copy the model.
    device_of = functools.partial(_device, r.module, weakref.ref(model))
    keep_fp32(slot.holder, [slot.name], device_of)
    keep_fp32(r.module, list(COUNTERS), device_of)
    r.module._moebalance_slot = slot
    return slot


def uninstall(routers: list[nn.Module]) -> None:
    """Put routers back as they were before :func:`install` (forward, added buffer, counters)."""
    for m in routers:
        if "_moebalance_inner_forward" in m.__dict__:
            unsteer_forward(m)
        slot = m.__dict__.pop("_moebalance_slot", None)
        if slot is not None and not slot.own:
            slot.holder._buffers.pop(slot.name, None)
        for name in (*COUNTERS, "_moebalance_mask", "_moebalance_choice", "moebalance_score_recorder"):
            m.__dict__.pop(name, None)


def install(model: nn.Module, probe_inputs: dict | None = None, scores: bool = False) -> list[Router]:
    """Find, patch and prove every router of ``model`` (see the module docstring).

    Args:
        model: a transformers model, or any module that ``probe_inputs`` can be fed to.
        probe_inputs: keyword inputs of the probe forward; default ``[2, 11]`` random token ids.
        scores: also check that Quantile Balancing applies (:func:`.scores.check_scores`).

    Returns:
        The routers, in module order, each with ``module._moebalance_slot`` and its counters.

    Raises:
        ValueError: the model is on the meta device, no router found, a router cannot carry the
            bias (named, with the reason), or (``scores``) Quantile Balancing does not apply.
        RuntimeError: the probe forward failed, or the probe found the routing changed or the
            bias not steering (the router class is named); nothing stays patched.
    """
    if any(t.is_meta for t in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} is on the meta device: the probe that finds and checks its routers needs one "
            "real forward; call apply_loss_free_balancing after model.to_empty(device=...) (uninitialised weights "
            "are fine) or after loading the weights"
        )
    inputs = probe_inputs if probe_inputs is not None else probe_batch(model)
    routers, problems, reference = find_routers(model, inputs)
    if not routers:
        raise ValueError(_no_router_message(model) + "".join(f"; {p}" for p in problems))
    if problems:
        raise ValueError("cannot steer: " + "; ".join(problems))
    modules = dict(model.named_modules())
    mask = TokenMask()
    done: list[nn.Module] = []
    try:
        slots = []
        for r in routers:
            done.append(r.module)
            slots.append(_patch_one(r, modules, mask, model))
        if not any(t.is_meta for _, t in tensors_of(reference)):
            check_identical(model, inputs, reference, routers)
            if all(bool(t.isfinite().all()) for _, t in tensors_of(reference) if t.is_floating_point()):
                check_steers(model, inputs, routers, [s.tensor() for s in slots])
            else:
                log.info("the model's weights are not finite (not initialised?): the steering check is skipped")
        if scores:
            check_scores(model, inputs, [(r.name, r.module) for r in routers])
    except BaseException:
        uninstall(done)
        raise
    return routers
