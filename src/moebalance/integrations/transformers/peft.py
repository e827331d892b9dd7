"""PEFT (``peft`` >= 0.17) and the patched routers: which copy of a router the forward uses, and
the biases in an adapter folder.

``get_peft_model(model, LoraConfig(modules_to_save=["gate"]))`` wraps each router in a
``ModulesToSaveWrapper`` that keeps the frozen ``original_module`` and a trainable deep copy per
adapter (``modules_to_save.<adapter>``); the forward runs the active adapter's copy. The handle
must update and count *that* copy, once per layer:

* moebalance applied first: the copies are made after the patch, so they carry the bias, the
  patched forward and a reference to the handle (``LossFreeBalancing.__deepcopy__`` keeps the
  same handle); the handle then follows them (:func:`follow_copies`) instead of the originals,
  which no forward reaches any more.
* moebalance applied after: ``apply_loss_free_balancing`` finds both the original and the copy
  of each router; :func:`active_routers` keeps the copy the forward uses.

A LoRA adapter holds no router state, so ``PeftModel.save_pretrained`` would drop the biases:
:func:`bind_save` makes that model's ``save_pretrained`` also write them
(:func:`~moebalance.integrations.transformers.resume.save_bias_file`, ``moebalance_biases.safetensors``
in the adapter folder). Nothing here imports ``peft``: the wrapper and model classes are
recognised by name, so the module works (and does nothing) without it.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

from torch import nn

log = logging.getLogger("moebalance.integrations.transformers")

_WRAPPER_SLOTS = ("original_module", "modules_to_save")


def _class_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` (any task subclass), recognised without importing ``peft``."""
    return "PeftModel" in _class_names(model)


def wraps(peft_model: nn.Module, model: nn.Module) -> bool:
    """True when ``model`` is ``peft_model`` or one of its submodules (the base model it wraps)."""
    return any(m is model for m in peft_model.modules())


def _is_wrapper(module: nn.Module) -> bool:
    return "ModulesToSaveWrapper" in _class_names(module) and "original_module" in module._modules


def _active_copy(wrapper: nn.Module) -> nn.Module:
    """The module a ``ModulesToSaveWrapper``'s forward runs (PEFT 0.17-0.21 ``forward``): the
    active adapter's copy, or the original when the adapters are disabled or the active adapter
    has no copy here."""
    copies = wrapper._modules["modules_to_save"]
    active = list(getattr(wrapper, "active_adapters", []) or [])
    if getattr(wrapper, "disable_adapters", False) or not active or active[0] not in copies:
        return wrapper._modules["original_module"]
    return copies[active[0]]


def active_routers(model: nn.Module, routers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``routers`` (``(qualified name, module)`` pairs found in ``model``) without the copies no
    forward runs: of each PEFT ``ModulesToSaveWrapper`` only the copy its forward uses is kept,
    under the wrapper's own name (``...mlp.gate``), so names keep their layer numbers and match
    a model without PEFT. Without wrappers the list comes back unchanged.
    """
    dead: set[int] = set()
    renamed: dict[int, str] = {}
    for name, module in model.named_modules():
        if not _is_wrapper(module):
            continue
        used = _active_copy(module)
        for slot in _WRAPPER_SLOTS:
            inner = module._modules[slot]
            for candidate in [inner] if slot == "original_module" else list(inner.values()):
                if candidate is not used:
                    dead.add(id(candidate))
        renamed[id(used)] = name
    return [(renamed.get(id(r), n), r) for n, r in routers if id(r) not in dead]


def follow_copies(handle) -> list[tuple[str, nn.Module]]:
    """The routers of ``handle.model`` that carry ``handle`` (originals and PEFT copies made of
    them), reduced by :func:`active_routers` to those a forward runs, in module order.

    A copy made by deep-copying a patched router gets the originals' padding mask back (the deep
    copy made it its own, which no mask hook fills); its load counters are the original's at the
    copy plus what its own forwards counted since, so no token is lost or counted twice.
    """
    mask = handle._routers[0]._moebalance_mask if handle._routers else None
    mine = [
        (name, m)
        for name, m in handle.model.named_modules()
        if "_moebalance_slot" in m.__dict__ and m.__dict__.get("_moebalance_handle") is handle
    ]
    found = active_routers(handle.model, mine)
    known = {id(r) for r in handle._routers}
    for _, router in found:
        if id(router) not in known and mask is not None:
            router._moebalance_mask = mask
    return found


def save_pretrained(self, save_directory, *args, **kwargs):
    """``PeftModel.save_pretrained`` (the class's), then the biases of the handle bound by
    :func:`bind_save` into each adapter folder written, on the main process only."""
    from moebalance.integrations.transformers.resume import save_bias_file

    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    # PEFT's signature: (save_directory, safe_serialization, selected_adapters, save_embedding_layers,
    # is_main_process, ...), any of them by keyword.
    if kwargs.get("is_main_process", args[3] if len(args) > 3 else True):
        selected = kwargs.get("selected_adapters", args[1] if len(args) > 1 else None)
        for adapter in selected or list(getattr(self, "peft_config", {}) or ["default"]):
            folder = Path(save_directory) if adapter == "default" else Path(save_directory) / adapter
            if folder.is_dir():
                save_bias_file(self._moebalance_bias_handle, folder)
    return out


def bind_save(handle, peft_model) -> None:
    """Make ``peft_model.save_pretrained(folder, ...)`` also write ``handle``'s biases into the
    adapter folder (``moebalance_biases.safetensors``, float32), on the main process only.

    Bound on this instance only (the class is untouched), as a method, so a deep copy of the model
    saves itself with its own handle; binding again re-points it to ``handle``. With
    ``selected_adapters`` other than ``"default"`` PEFT writes ``folder/<adapter>``: the biases go
    into each such folder.
    """
    first = "_moebalance_bias_handle" not in peft_model.__dict__
    peft_model._moebalance_bias_handle = handle
    peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)
    if first:
        log.info("%s.save_pretrained now also writes the Loss-Free biases (moebalance_biases.safetensors)",
                 type(peft_model).__name__)
