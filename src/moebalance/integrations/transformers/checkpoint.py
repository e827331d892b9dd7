"""Biases in and out of ``save_pretrained`` folders: reading them back, recording in the model's
config that it was trained with Loss-Free Balancing, and exporting them for inference engines.

Shape legend: E routed experts, L MoE layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def read_biases(handle, path: str | Path) -> int:
    """Read the biases of a ``save_pretrained`` folder (``*.safetensors``) into ``handle``'s routers.

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
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(path)!r}")
    wanted = {layer_key(name): r for name, r in zip(handle.router_names, handle.routers)}
    if len(wanted) != len(handle.routers):
        raise ValueError("router names do not identify their layers; cannot match saved biases")
    found = _saved_biases(files, {"." + r._moebalance_bias_name for r in handle.routers})
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
            bias = getattr(router, router._moebalance_bias_name)
            saved = found[key][1]
            if saved.shape != bias.shape:
                raise ValueError(
                    f"{path}: bias of layer {key} has shape {tuple(saved.shape)}, expected {tuple(bias.shape)}"
                )
            bias.copy_(saved)
    return len(found)


def record_in_config(handle) -> None:
    """Write what a reader of the checkpoint must know into ``model.config`` (``config.json``).

    The record (key :data:`CONFIG_KEY`) says: trained with Loss-Free Balancing (arXiv 2408.15664),
    the update rule and rate, whether the biases were centred, the buffer name and the state-dict
    keys that hold the biases, and whether an unpatched ``transformers`` uses them. A model without
    ``config`` (a bare module) gets nothing.
    """
    config = getattr(handle.model, "config", None)
    if config is None:
        return
    name = handle.routers[0]._moebalance_bias_name
    native = handle.routers[0]._moebalance_family.native_bias is not None
    setattr(config, CONFIG_KEY, {
        "strategy": "loss_free",
        "paper": "arXiv 2408.15664",
        "bias_update_rate": handle.balancer.update_rate,
        "bias_update": handle.balancer.update,
        "bias_center": handle.balancer.center,
        "bias_name": name,
        "bias_keys": [f"{n}.{name}" for n in handle.router_names],
        "used_by_plain_transformers": native,
        "note": (
            "the biases are the model's own e_score_correction_bias; plain transformers routes with them"
            if native
            else "plain transformers ignores these expert_bias keys (its load report lists them as "
            "UNEXPECTED) and routes without them, so its outputs differ; load with moebalance's "
            "apply_loss_free_balancing, or add the bias to the router scores before the top-K"
        ),
    })


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
    one per router, found by identity of storage among the model's buffers and parameters.

    Raises:
        ValueError: a bias is not a buffer or parameter of ``handle.model``.
    """
    named = {}
    for name, tensor in [*handle.model.named_parameters(remove_duplicate=False), *handle.model.named_buffers(remove_duplicate=False)]:
        named.setdefault((tensor.data_ptr(), tuple(tensor.shape)), name)
    keys = []
    for router_name, bias in zip(handle.router_names, handle.bias_tensors()):
        key = named.get((bias.data_ptr(), tuple(bias.shape)))
        if key is None:
            raise ValueError(f"the bias of router {router_name!r} is not a buffer or parameter of the model")
        keys.append(key)
    return keys


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
