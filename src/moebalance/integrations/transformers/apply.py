"""The entry point: :func:`apply_loss_free_balancing`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from moebalance.balancing import LossFreeBalancer, UpdateMode
from moebalance.integrations.transformers.checkpoint import read_biases, record_in_config
from moebalance.integrations.transformers.handle import LossFreeBalancing, check_mode, rule_setting, timed_all_reduce
from moebalance.integrations.transformers.patch import install, log
from moebalance.integrations.transformers.routers import install_mask_hooks
from moebalance.integrations.transformers.scores import check_aux_loss
from moebalance.routing import is_finite_number
from moebalance.rules import BiasRule


def _disable_aux_loss(model: nn.Module) -> list[str]:
    """Zero the auxiliary load-balancing loss of a transformers MoE model; returns what changed."""
    changed = []
    for name, module in model.named_modules():
        if hasattr(module, "router_aux_loss_coef") and module.router_aux_loss_coef:
            module.router_aux_loss_coef = 0.0
            changed.append(f"{name or type(module).__name__}.router_aux_loss_coef")
    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, "router_aux_loss_coef", 0):
            config.router_aux_loss_coef = 0.0
            changed.append("config.router_aux_loss_coef")
        if getattr(config, "output_router_logits", False):
            config.output_router_logits = False
            changed.append("config.output_router_logits")
    return changed


def _existing_handle(model: nn.Module, settings: dict, load_biases_from) -> LossFreeBalancing | None:
    """The handle of an earlier apply on this model's routers, if the settings match (see the
    Raises of :func:`apply_loss_free_balancing`)."""
    from moebalance.integrations.transformers.peft import active_routers

    patched = [(n, m) for n, m in model.named_modules() if m.__dict__.get("_moebalance_handle") is not None]
    handles = {id(m._moebalance_handle): m._moebalance_handle for _, m in patched}
    if not handles:
        return None
    handle = next(iter(handles.values()))
    handle.refresh_routers()  # follow PEFT copies made since the last forward
    in_use = [m for _, m in active_routers(model, patched)]  # PEFT modules_to_save: the copies forwards run
    if len(handles) > 1 or in_use != handle.routers:
        raise ValueError(
            "some of these routers were already given Loss-Free Balancing by another "
            "apply_loss_free_balancing call (on another part of the model); apply it once, to the whole model"
        )
    differ = [f"{k}={settings[k]!r} (was {handle.settings[k]!r})" for k in settings if settings[k] != handle.settings[k]]
    if differ:
        raise ValueError(
            "apply_loss_free_balancing was already called on this model with other settings: "
            + ", ".join(differ)
            + "; use the handle it returned (change handle.balancer for another rate)"
        )
    if load_biases_from not in ("auto", None):
        raise ValueError(
            "apply_loss_free_balancing was already called on this model; it does not reload biases "
            "over trained ones. Call handle.load_biases(path) to overwrite them on purpose"
        )
    return handle


def _check_args(update_rate, dist_timeout_s, load_biases_from, all_reduce, disable_aux_loss, model=None,
                probe_inputs=None) -> None:
    """The argument checks of :func:`apply_loss_free_balancing` that :class:`LossFreeBalancer` does
    not make (it checks ``update_rate``, ``update`` and ``center``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if probe_inputs is not None and not (isinstance(probe_inputs, dict) and all(isinstance(k, str) for k in probe_inputs)):
        raise TypeError(
            f"probe_inputs must be a dict of the model's keyword inputs (e.g. {{'input_ids': ids}}), "
            f"got {type(probe_inputs).__name__}"
        )
    if load_biases_from is not None and not isinstance(load_biases_from, (str, Path)):
        raise TypeError(
            f"load_biases_from must be a folder path (str or Path), 'auto' or None, got {type(load_biases_from).__name__}"
        )
    if load_biases_from not in ("auto", None) and not Path(load_biases_from).is_dir():
        raise FileNotFoundError(f"load_biases_from={str(load_biases_from)!r}: no such folder")
    if dist_timeout_s is not None and (not is_finite_number(dist_timeout_s) or dist_timeout_s <= 0):
        raise ValueError(f"dist_timeout_s must be a number > 0 and finite, or None, got {dist_timeout_s!r}")
    if not (all_reduce is None or all_reduce == "auto" or callable(all_reduce)):
        raise ValueError(f"all_reduce must be 'auto', None or a function summing a tensor in place, got {all_reduce!r}")
    if not isinstance(disable_aux_loss, bool):
        raise ValueError(f"disable_aux_loss must be True or False, got {disable_aux_loss!r}")
    LossFreeBalancer(update_rate)  # its ValueError names update_rate and the range


def _load_initial_biases(handle: LossFreeBalancing, load_biases_from) -> None:
    """Read the biases of the folder the model came from (``"auto"``) or of ``load_biases_from``.

    A model's own bias was loaded by ``from_pretrained`` already, but in the dtype it was loaded
    in (a family that does not keep it float32 rounds it to bf16 under ``dtype=torch.bfloat16``),
    so the float32 values of the files are read again; a folder whose bias tensors do not match
    the routers one to one (a checkpoint with extra MTP layers) keeps what ``from_pretrained`` loaded.
    """
    own = all(r._moebalance_slot.own for r in handle.routers)
    auto = load_biases_from == "auto"
    if auto:
        src = getattr(handle.model, "name_or_path", "") or ""
        load_biases_from = src if src and Path(src).is_dir() else None
    if load_biases_from is None:
        return
    try:
        n = read_biases(handle, load_biases_from)
    except ValueError as exc:
        if not (auto and own):
            raise
        log.info("kept the biases from_pretrained loaded: %s", exc)
        return
    if n:
        log.info("loaded the expert biases of %d routers from %s", n, load_biases_from)


def _new_handle(model: nn.Module, found, handle: LossFreeBalancing, load_biases_from, probe_inputs) -> LossFreeBalancing:
    """Wire a new handle to the model: padding-mask hooks, router back-references, initial
    biases, the record in ``model.config``."""
    handle._probe_inputs = probe_inputs
    handle.hooks = install_mask_hooks(model, found[0][1]._moebalance_mask)
    for _, router in found:
        router._moebalance_handle = handle
    _load_initial_biases(handle, load_biases_from)
    record_in_config(handle)
    return handle


def _patch(model: nn.Module, balancer: LossFreeBalancer, probe_inputs, disable_aux_loss: bool) -> list:
    """``(name, module)`` of the routers :func:`~.patch.install` patched (with the quantile rule's
    checks when it needs scores), the model's aux loss disabled when asked (refused beside the
    quantile rule otherwise)."""
    if balancer.rule.needs_scores and not disable_aux_loss:
        check_aux_loss(model)
    found = [(r.name, r.module) for r in install(model, probe_inputs, scores=balancer.rule.needs_scores)]
    if disable_aux_loss and (changed := _disable_aux_loss(model)):
        log.info("auxiliary load-balancing loss disabled: %s set to 0/False", ", ".join(changed))
    return found


def apply_loss_free_balancing(
    model: nn.Module,
    update_rate: float = 1e-3,
    disable_aux_loss: bool = True,
    *,
    update: UpdateMode | BiasRule = "sign",
    center: bool = False,
    all_reduce: Callable[[torch.Tensor], None] | Literal["auto"] | None = "auto",
    load_biases_from: str | Path | Literal["auto"] | None = "auto",
    dist_timeout_s: float | None = None,
    probe_inputs: dict | None = None,
    mode: str = "update",
    freeze_after_steps: int | None = None,
) -> LossFreeBalancing:
    """Give every MoE router of a transformers model a Loss-Free Balancing bias.

    Routers are found by what they do (the modules making a top-K choice over the experts in a
    probe forward, :mod:`.discovery`), not by class name. A router with a selection bias of its own
    (``e_score_correction_bias``, ``expert_bias``, ``moe_statics``; on the router or its MoE block)
    keeps it and the handle trains *that* slot; any other router gets a persistent float32
    ``expert_bias`` ``[E]`` buffer (zeros) that steers its top-K choice only (eq. 3 of the paper).
    Before returning, the probe (:mod:`.probe`) proves on a probe batch that the model's output and
    every router's choices are bit-identical to the unpatched model's at the current bias, and that
    a large bias steers every router; otherwise nothing stays patched. Loads exclude padding when
    the model is called with a ``[B, S]`` ``attention_mask``. ``model.config`` records the training
    (see :func:`~moebalance.integrations.transformers.checkpoint.record_in_config`).

    Calling it again on the same model returns the same handle when the settings match (the biases
    are not reloaded), and raises when they differ. A meta-device model is patched after
    ``to_empty`` (the probe needs one real forward; uninitialised weights are fine).

    Args:
        model: a transformers model (``...ForCausalLM``, base model, or any module holding the routers).
        update_rate: ``u > 0`` of Algorithm 1 (paper default 1e-3; the quantile rule has none).
        disable_aux_loss: set the model's (and its config's) ``router_aux_loss_coef`` to 0 and
            ``output_router_logits`` to False: that loss recounts the top-K without the bias.
        update: the bias rule (:mod:`moebalance.rules`), by name with its default options:
            ``"sign"`` (Algorithm 1), ``"error"``, ``"smebu"``, ``"proportional"``, ``"quantile"``
            (Quantile Balancing, from the routers' scores: :mod:`.scores`); or as a rule object with
            options, e.g. ``QuantileRule(estimator="histogram", ema=0.9, window=4)``.
        center: subtract each layer's mean bias after every update (see :class:`~moebalance.LossFreeBalancer`).
        all_reduce: in-place sum over data-parallel ranks of the ``[L, E]`` loads (and the quantile
            rule's records); ``"auto"``: ``torch.distributed``, when a group of over one rank runs.
        load_biases_from: a ``save_pretrained`` folder to read the biases from; ``"auto"``: the
            folder the model was loaded from (``model.name_or_path``) when it is a local folder.
        dist_timeout_s: seconds the ``"auto"`` all-reduce waits for the other ranks before raising
            (``None``: the process group's timeout).
        mode, freeze_after_steps: ``"update"`` or ``"frozen"``, and when to freeze an updating
            bias; see :class:`LossFreeBalancing`.
        probe_inputs: keyword inputs for the probe forward (default: ``[2, 11]`` random token ids
            of the model's vocabulary); give them for a model that needs more than ``input_ids``.

    Returns:
        The :class:`LossFreeBalancing` handle.

    Raises:
        ValueError: a meta-device model; no router in ``model``, or a router that cannot carry the
            bias (the message names the router class and why); a bad ``update_rate`` / ``update`` /
            ``center`` / ``dist_timeout_s`` / ``all_reduce`` / ``disable_aux_loss`` / ``mode``; a
            second call with other settings or an explicit ``load_biases_from``; for
            ``"quantile"``, group-limited routing, an own bias not added to the scores, or
            ``disable_aux_loss=False`` with the model's aux loss on (:func:`.scores.check_scores`).
        TypeError: ``model``, ``probe_inputs`` or ``load_biases_from`` of the wrong type.
        FileNotFoundError: ``load_biases_from`` names no folder of safetensors files.
        RuntimeError: the probe forward failed, or the probe found the routing changed or a router
            not following its bias (the message names the router class).
    """
    _check_args(update_rate, dist_timeout_s, load_biases_from, all_reduce, disable_aux_loss, model, probe_inputs)
    balancer = LossFreeBalancer(update_rate, update, center=center)
    check_mode(mode, freeze_after_steps)
    settings = dict(update_rate=float(update_rate), update=rule_setting(balancer), center=center, all_reduce=all_reduce,
                    dist_timeout_s=dist_timeout_s, mode=mode, freeze_after_steps=freeze_after_steps)
    if (existing := _existing_handle(model, settings, load_biases_from)) is not None:
        if disable_aux_loss:
            _disable_aux_loss(model)
        return existing
    found = _patch(model, balancer, probe_inputs, disable_aux_loss)
    reduce = timed_all_reduce(dist_timeout_s) if all_reduce == "auto" else all_reduce
    handle = LossFreeBalancing(model, found, balancer, reduce, settings, mode, freeze_after_steps)
    return _new_handle(model, found, handle, load_biases_from, probe_inputs)
