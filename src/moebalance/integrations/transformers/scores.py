"""Quantile Balancing on transformers routers: the checks that its formula applies, and the
per-router :class:`~moebalance.rules.ScoreRecorder` the handle's update reads.

Shape legend: T tokens, E routed experts, K experts per token, L routers.

Quantile Balancing (``update="quantile"``, :class:`moebalance.rules.QuantileRule`; J. Su,
kexue.fm/archives/11619; Megatron-LM ``quantile_balancing``) sets the bias from quantiles of the
unbiased selection scores ``s`` ``[T, E]``, assuming each token chooses the top-K of ``s + b``.
:class:`~.selection.SelectionMode` hands ``(s, b)`` of every counted training forward to the
router's ``moebalance_score_recorder`` (the tokens the load counts: padding and non-finite rows
excluded); the handle pops the records once per optimizer step through
:meth:`moebalance.LossFreeBalancer.score_delta`, the same code as moebalance's own routers.

Refused, with the field named (Megatron-LM's guards): group-limited routing (``topk_group`` below
the number of expert groups: a token may only choose among some groups), experts masked with
``-inf`` before the top-K, a router whose own bias is not added to the scores it chooses on (found
by behaviour: shifting the bias by a constant must shift the top-K input by that constant), and
the model's own router auxiliary loss left on.
"""

from __future__ import annotations

import torch
from torch import nn

from moebalance.integrations.transformers.discovery import _configs
from moebalance.integrations.transformers.probe import _probe_counts
from moebalance.integrations.transformers.selection import SelectionMode
from moebalance.rules import BiasRule

#: Names under which configs and routers give the number of expert groups (``topk_group`` of them chosen).
GROUP_NAMES = ("n_group", "num_group", "num_expert_group", "n_expert_groups")

#: Constant added to an own bias in the additivity check; a top-K input that is not ``s + b``
#: moves by ``0.375 * SHIFT`` or more (a sigmoid's slope is at most 1/4; softmax ignores it).
SHIFT = 0.5

#: Largest change of ``input - b`` under the shift that still counts as ``s + b`` (bfloat16 rounding).
SHIFT_TOLERANCE = 0.05

_REFUSED = "bias_update='quantile'"


def group_limit(model: nn.Module, router: nn.Module) -> str | None:
    """``"<where>.<field>=G with topk_group=g"`` when the model's config (or a sub-config) or the
    router says a token chooses among only ``g < G`` expert groups; ``None`` otherwise."""
    places = [(type(c).__name__, c) for c in _configs(getattr(model, "config", None))]
    places.append((type(router).__name__, router))
    for where, obj in places:
        limit = getattr(obj, "topk_group", None)
        for name in GROUP_NAMES:
            groups = getattr(obj, name, None)
            if isinstance(groups, int) and isinstance(limit, int) and 1 <= limit < groups:
                return f"{where}.{name}={groups} with topk_group={limit}"
    return None


def aux_loss_on(model: nn.Module) -> str | None:
    """``"router_aux_loss_coef=c with output_router_logits=True"`` when the model adds its own router
    auxiliary loss (transformers computes it only with ``output_router_logits``); else ``None``."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "output_router_logits", False):
        return None
    coefs = [getattr(m, "router_aux_loss_coef", 0) for m in model.modules()] + [getattr(config, "router_aux_loss_coef", 0)]
    coef = next((c for c in coefs if isinstance(c, (int, float)) and c), None)
    return None if coef is None else f"router_aux_loss_coef={coef:g} with output_router_logits=True"


def check_aux_loss(model: nn.Module) -> None:
    """Raise ``ValueError`` when :func:`aux_loss_on` (Megatron-LM: QB needs an aux coefficient of 0)."""
    if (why := aux_loss_on(model)) is not None:
        raise ValueError(
            f"{_REFUSED} needs no auxiliary loss (Megatron-LM's guard), but the model's config has {why}: "
            "keep disable_aux_loss=True, or set model.config.output_router_logits=False"
        )


def _selection_scores(router: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(s [T, E], finite [T])`` of one eval-mode, no-grad call of the router's own forward on
    ``args, kwargs`` (its counters untouched); ``None`` when it made no choice."""
    num_experts, top_k, added = router._moebalance_choice
    bias = None if added is None else getattr(router, added)
    own = router._moebalance_slot.tensor() if added is None else None
    got = []
    modes = {m: m.training for m in router.modules()}
    try:
        router.eval()
        with torch.no_grad(), SelectionMode(num_experts, top_k, bias, lambda i, f, sc: got.append((sc[0], f)), True, own):
            router._moebalance_inner_forward(*args, **kwargs)
    finally:
        for m, training in modes.items():
            m.training = training
    if not got:
        return None
    scores, finite = got[-1]
    return scores.reshape(-1, num_experts), finite.reshape(-1)


def _router_inputs(model: nn.Module, inputs: dict, routers: list[nn.Module]) -> dict:
    """``{router: (args, kwargs)}`` of each router's first call in one probe forward (see
    :func:`~.probe._probe_counts`: counters and modes restored)."""
    captured: dict = {}
    hooks = [r.register_forward_pre_hook(lambda m, a, k: captured.setdefault(m, (a, k)), with_kwargs=True)
             for r in routers]
    try:
        _probe_counts(model, inputs, routers)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _check_router(name: str, router: nn.Module, args: tuple, kwargs: dict) -> None:
    """The ``-inf`` and additivity checks of one router (see the module docstring)."""
    first = _selection_scores(router, args, kwargs)
    if first is None:
        return
    scores, finite = first
    if not bool(scores[finite].isfinite().all()):
        raise ValueError(
            f"{_REFUSED}: {name} ({type(router).__name__}) masks experts with -inf before its top-K (group-limited "
            "routing?), so its choice is not the top-K of s + b that Quantile Balancing's quantiles assume"
        )
    slot = router._moebalance_slot
    if not slot.own:
        return  # the added bias: moebalance adds it itself, s is the top-K input
    bias = slot.tensor()
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(SHIFT)
        shifted, _ = _selection_scores(router, args, kwargs)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    moved = float((shifted - scores)[finite].abs().max()) if bool(finite.any()) else 0.0
    if not moved <= SHIFT_TOLERANCE:
        raise ValueError(
            f"{_REFUSED}: {name} ({type(router).__name__}) does not choose on its scores plus its own bias "
            f"{slot.key}: adding {SHIFT:g} to that bias moved (top-K input - bias) by {moved:.3g}, not 0, so the "
            "unbiased scores Quantile Balancing needs cannot be read off its top-K"
        )


def check_scores(model: nn.Module, inputs: dict, routers: list[tuple[str, nn.Module]]) -> None:
    """Check that Quantile Balancing applies to every patched router (see the module docstring).

    Args:
        model: the patched model. inputs: probe inputs (:func:`~.discovery.probe_batch`).
        routers: ``(name, module)`` of its routers.

    Raises:
        ValueError: group-limited routing (the field named), ``-inf`` scores before the top-K, or
            an own bias that is not added to the scores (the router named).
    """
    for _, router in routers:
        if (where := group_limit(model, router)) is not None:
            raise ValueError(
                f"{_REFUSED} does not support group-limited routing ({where}): a token may only choose among "
                "topk_group of the expert groups, so its choice is not the top-K of s + b that Quantile "
                "Balancing's quantiles assume (Megatron-LM refuses it too); set topk_group equal to the number "
                "of groups, or n_group=1"
            )
    captured = _router_inputs(model, inputs, [r for _, r in routers])
    for name, router in routers:
        if router in captured:
            _check_router(name, router, *captured[router])


def set_recorders(routers: list[nn.Module], rule: BiasRule) -> None:
    """Give each router a fresh ``moebalance_score_recorder`` (``rule.recorder(K)``, a plain
    attribute) when ``rule`` needs scores; remove it otherwise."""
    for r in routers:
        if rule.needs_scores:
            r.moebalance_score_recorder = rule.recorder(r._moebalance_choice[1])
        else:
            r.__dict__.pop("moebalance_score_recorder", None)
