"""Biases in and out of ``save_pretrained`` folders: reading them back, recording in the model's
config that it was trained with Loss-Free Balancing, and exporting them for inference engines.

A model whose ``config.json`` holds that record gets its biases back or a loud warning, never a
silent zero: ``apply_loss_free_balancing`` reads them from ``model.name_or_path`` when it is a
local folder, but a model loaded by Hub repo id has its files in the local Hugging Face cache, and
one re-saved by plain transformers has lost the ``expert_bias`` keys while keeping the record;
:func:`check_recorded_biases` handles both.

Shape legend: E routed experts, L MoE layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("moebalance.integrations.transformers")

#: Key of the record in ``model.config`` (saved to ``config.json`` by ``save_pretrained``).
CONFIG_KEY = "moebalance_loss_free"


def layer_key(name: str) -> tuple[int, ...]:
    """The numeric parts of a module path (``model.layers.3.mlp.gate`` -> ``(3,)``)."""
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _saved_biases(files: list[Path], suffixes: set[str]) -> dict[tuple[int, ...], tuple[str, torch.Tensor]]:
    """Every saved bias in ``files`` (keys ending in one of ``suffixes``), by layer numbers.

    Raises:
        ValueError: a file is not a readable safetensors file (the message names it).
    """
    from safetensors import safe_open

    found: dict[tuple[int, ...], tuple[str, torch.Tensor]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if any(key.endswith(sfx) for sfx in suffixes):
                        found[layer_key(key)] = (key, st.get_tensor(key))
        except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError)
            raise ValueError(f"{f}: not a readable safetensors file ({exc})") from exc
    return found


def read_biases(handle, path: str | Path, pattern: str = "*.safetensors") -> int:
    """Read the biases of a ``save_pretrained`` folder (``*.safetensors``) into ``handle``'s routers.

    ``pattern`` selects the files of the folder to read (default: every safetensors file; a PEFT
    adapter folder or a Trainer checkpoint also holds ``moebalance_biases.safetensors``).

    ``save_pretrained`` may rename modules on the way out (Mixtral's ``mlp`` is written as
    ``block_sparse_moe``), so a saved bias is matched to its router by the layer numbers in its
    name, which every renaming keeps.

    Returns:
        The number of routers whose bias was found (0 when the folder holds none).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no safetensors file.
        ValueError: the folder holds biases for some routers but not all, for more routers than the
            model has, or of another size; or a file is not a readable safetensors file.
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(f"load_biases_from={str(path)!r}: no such folder")
    files = sorted(Path(path).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} file in {str(path)!r}")
    wanted = {layer_key(name): r for name, r in zip(handle.router_names, handle.routers)}
    if len(wanted) != len(handle.routers):
        raise ValueError("router names do not identify their layers; cannot match saved biases")
    found = _saved_biases(files, {"." + r._moebalance_slot.name for r in handle.routers})
    if not found:
        return 0
    if found.keys() != wanted.keys():
        # Fewer saved biases than routers, or more (a checkpoint of a deeper model): not this model's.
        extra = sorted(name for key, (name, _) in found.items() if key not in wanted)
        raise ValueError(
            f"{path}: holds the biases of {len(found)} routers, the model has {len(wanted)}"
            + (f" (no router for {extra[:3]})" if extra else "")
        )
    with torch.no_grad():
        for key, router in wanted.items():
            bias = router._moebalance_slot.tensor()
            saved = found[key][1].reshape(-1) if found[key][1].numel() == bias.numel() else found[key][1]
            if saved.shape != bias.shape:
                raise ValueError(
                    f"{path}: bias of layer {key} has shape {tuple(saved.shape)}, expected {tuple(bias.shape)}"
                )
            bias.copy_(saved)
    return len(found)


def saved_keys(model, keys: list[str]) -> list[str]:
    """The names ``save_pretrained`` writes the state-dict ``keys`` under (transformers 5 renames
    some modules on the way out: Mixtral's ``mlp`` is saved as ``block_sparse_moe``), through
    transformers' own ``revert_weight_conversion``; the keys unchanged where it has none or fails."""
    try:
        from transformers.modeling_utils import revert_weight_conversion

        probe = {k: torch.zeros(1) for k in keys}
        renamed = list(revert_weight_conversion(model, dict(probe)))
    except Exception:  # an older transformers, or a model that is no PreTrainedModel
        return list(keys)
    return renamed if len(renamed) == len(keys) else list(keys)


def record_in_config(handle) -> None:
    """Write what a reader of the checkpoint must know into ``model.config`` (``config.json``).

    The record (key :data:`CONFIG_KEY`) says: trained with Loss-Free Balancing (arXiv 2408.15664),
    the update rule and rate, whether the biases were centred, the buffer name and the state-dict
    keys that hold the biases, and whether an unpatched ``transformers`` uses them. A model without
    ``config`` (a bare module) gets nothing.

    The first call for a handle whose config already held a record (read from ``config.json``)
    also restores or warns about lost biases
    (:func:`check_recorded_biases`).
    """
    config = getattr(handle.model, "config", None)
    if config is None:
        return
    first, handle._config_recorded = not getattr(handle, "_config_recorded", False), True
    previous = getattr(config, CONFIG_KEY, None)
    slots = [r._moebalance_slot for r in handle.routers]
    name = slots[0].name
    native = all(s.own for s in slots)
    setattr(config, CONFIG_KEY, {
        "strategy": "loss_free",
        "paper": "arXiv 2408.15664",
        "bias_update_rate": handle.balancer.update_rate,
        "bias_update": handle.balancer.update,
        "bias_rule": repr(handle.balancer.rule),  # with its options (QuantileRule(estimator=..., ema=...))
        "bias_center": handle.balancer.center,
        "bias_name": name,
        "bias_keys": saved_keys(handle.model, [s.key for s in slots]),
        "used_by_plain_transformers": native,
        "note": (
            "the biases are the model's own e_score_correction_bias; plain transformers routes with them"
            if native
            else "plain transformers ignores these expert_bias keys (its load report lists them as "
            "UNEXPECTED) and routes without them, so its outputs differ; load with moebalance's "
            "apply_loss_free_balancing, or add the bias to the router scores before the top-K"
        ),
    })
    if first and previous is not None:  # the record config.json came with: trained biases to find
        check_recorded_biases(handle, previous)


def saved_bias_count(handle, folder: Path) -> int:
    """How many routers' bias tensors the ``*.safetensors`` files of ``folder`` hold (keys ending
    in the handle's bias name); 0 for a folder without such files or with unreadable ones."""
    files = sorted(folder.glob("*.safetensors"))
    try:
        return len(_saved_biases(files, {"." + r._moebalance_slot.name for r in handle.routers}))
    except ValueError:
        return 0


def _router_weight_matches(handle, folder: Path) -> bool:
    """Whether the first router's weight saved in ``folder`` (the key beside its saved bias) equals
    the model's, i.e. the folder holds the checkpoint the model was loaded from. True when the
    folder has no such key (nothing to compare)."""
    from safetensors import safe_open

    bias_name = handle.routers[0]._moebalance_slot.name
    files = sorted(folder.glob("*.safetensors"))
    found = _saved_biases(files, {"." + bias_name})
    first = min(found)
    router = {layer_key(n): r for n, r in zip(handle.router_names, handle.routers)}.get(first)
    weight_key = found[first][0][: -len(bias_name)] + "weight"
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            mine = getattr(router, "weight", None)
            if weight_key in st.keys() and isinstance(mine, torch.Tensor):
                saved = st.get_tensor(weight_key)
                mine = mine.detach().cpu()
                return saved.shape == mine.shape and torch.equal(saved.to(mine.dtype), mine)
    return True


def _read_hub_biases(handle, folder: Path, name: str) -> int:
    """Read the biases of a Hub cache snapshot, if it is the checkpoint the model was loaded from."""
    if not _router_weight_matches(handle, folder):
        log.warning(
            "%s: the Hugging Face cache snapshot %s holds other router weights than the loaded model (another "
            "revision?), so its Loss-Free biases are NOT read and every router starts from a ZERO bias; call "
            "balancing.load_biases(<folder of the revision loaded>)", name, folder,
        )
        return 0
    n = read_biases(handle, folder)
    log.info("%s: Loss-Free biases of %d routers read from the Hugging Face cache (%s)", name, n, folder)
    return n


def check_recorded_biases(handle, record) -> int:
    """Restore or warn when ``config.json`` recorded trained biases (``record``, the
    ``moebalance_loss_free`` entry read from it) and the model's biases are all zero.

    * the weights folder (``name_or_path``, or the Hub cache snapshot of a repo id) holds bias
      tensors: a Hub snapshot's are read into the routers (a local folder's were read by
      ``apply_loss_free_balancing`` already, or were zero when saved);
    * otherwise ``log.warning`` names the model, its class, where it looked and what is lost.

    Returns:
        The number of routers restored from the Hub cache (0 otherwise).
    """
    from moebalance.integrations.transformers.hub import hub_snapshot

    if not isinstance(record, dict) or record.get("strategy") != "loss_free":
        return 0
    if any(bool(b.detach().ne(0).any()) for b in handle.bias_tensors()):
        return 0  # loaded from somewhere (a folder, load_biases_from, the model's own weights)
    name = getattr(handle.model, "name_or_path", "") or ""
    local = Path(name) if name and Path(name).is_dir() else None
    folder = local or hub_snapshot(handle.model)
    if folder is not None and saved_bias_count(handle, folder):
        if local is None and not handle.routers[0]._moebalance_slot.own:
            return _read_hub_biases(handle, folder, name)
        return 0
    bias_name = record.get("bias_name") or handle.routers[0]._moebalance_slot.name
    lost = (
        f"its weights in {folder} hold no {bias_name} tensors"
        if folder is not None
        else "moebalance found no local folder or Hub cache snapshot holding them"
    )
    log.warning(
        "%s (%s): config.json records biases trained with Loss-Free Balancing (moebalance_loss_free, "
        "bias_update_rate=%s, %d routers), but %s, so every router starts from a ZERO bias and routes "
        "differently from the trained model. A re-save by plain transformers drops the expert_bias keys; "
        "reload from the folder moebalance saved, or call balancing.load_biases(<that folder>)",
        name or "a model without name_or_path", type(handle.model).__name__, record.get("bias_update_rate"),
        len(record.get("bias_keys") or []), lost,
    )
    return 0


def centred(bias_E: torch.Tensor) -> torch.Tensor:
    """``bias_E`` minus its mean (float32 copy): the same top-K choice (see :func:`center_biases`)."""
    values = bias_E.detach().float()
    return values - values.mean()


def center_biases(handle) -> torch.Tensor:
    """Subtract each layer's mean bias, in place; returns the ``[L]`` float32 means removed.

    A top-K choice ignores a constant added to all of a layer's scores (and a group-limited one
    too: every group score moves by the same amount), so the routing is unchanged, up to float32
    rounding of near-ties (tests/test_transformers_verify.py measures 0 changed choices); the gate
    weights never contain the bias. It keeps the values near 0, where bfloat16 or float16 keep
    more of their resolution if an engine stores them so (see ``moebalance verify``). Call it
    before ``save_pretrained`` to save centred biases.
    """
    means = []
    with torch.no_grad():
        for bias in handle.bias_tensors():
            means.append(bias.detach().float().mean().cpu())
            bias.copy_(centred(bias))
    return torch.stack(means) if means else torch.zeros(0)


def bias_state_keys(handle) -> list[str]:
    """The state-dict names (in memory, before any renaming on save) of ``handle``'s bias tensors,
    one per router: where each router's bias slot lives (a ``[1, E]`` Parameter included)."""
    return [r._moebalance_slot.key for r in handle.routers]


def export_biases(handle, name: str = "e_score_correction_bias", *, center: bool = False) -> dict[str, torch.Tensor]:
    """The ``[E]`` float32 biases keyed for an inference engine.

    Each router's bias is written as ``<router path>.<name>``; the default is DeepSeek-V3's
    ``e_score_correction_bias`` naming (``model.layers.{i}.mlp.gate.e_score_correction_bias``),
    which engines that implement DeepSeek-V3 routing read and add to the sigmoid scores before the
    top-K. For a softmax family an engine needs the same rule (top-K on ``softmax + bias``, gates
    from the unbiased softmax); save the dict with ``safetensors.torch.save_file``.

    Args:
        handle: the :class:`~moebalance.integrations.transformers.LossFreeBalancing` handle.
        name: the key's last component.
        center: subtract each layer's mean from the exported copy (the routing is the same, see
            :func:`center_biases`; the handle's own biases are left as they are).

    Raises:
        ValueError: ``name`` is empty or holds a dot; ``center`` is not a bool.
    """
    if not name or not isinstance(name, str) or "." in name:
        raise ValueError(f"name must be a non-empty key without dots, got {name!r}")
    if not isinstance(center, bool):
        raise ValueError(f"center must be True or False, got {center!r}")
    out = {}
    for router_name, bias in zip(handle.router_names, handle.bias_tensors()):
        out[f"{router_name}.{name}"] = (centred(bias) if center else bias.detach().float()).cpu().clone()
    return out
