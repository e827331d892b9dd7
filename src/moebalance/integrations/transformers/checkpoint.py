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

    The first call for a handle whose config already held a record (read from ``config.json``)
    also restores or warns about lost biases
    (:func:`~moebalance.integrations.transformers.loading.check_recorded_biases`).
    """
    config = getattr(handle.model, "config", None)
    if config is None:
        return
    first, handle._config_recorded = not getattr(handle, "_config_recorded", False), True
    previous = getattr(config, CONFIG_KEY, None)
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
    if first and previous is not None:  # the record config.json came with: trained biases to find
        from moebalance.integrations.transformers.loading import check_recorded_biases

        check_recorded_biases(handle, previous)


def export_biases(handle, name: str = "e_score_correction_bias") -> dict[str, torch.Tensor]:
    """The ``[E]`` float32 biases keyed for an inference engine.

    Each router's bias is written as ``<router path>.<name>``; the default is DeepSeek-V3's
    ``e_score_correction_bias`` naming (``model.layers.{i}.mlp.gate.e_score_correction_bias``),
    which engines that implement DeepSeek-V3 routing read and add to the sigmoid scores before the
    top-K. For a softmax family an engine needs the same rule (top-K on ``softmax + bias``, gates
    from the unbiased softmax); save the dict with ``safetensors.torch.save_file``.

    Raises:
        ValueError: ``name`` is empty or holds a dot.
    """
    if not name or "." in name:
        raise ValueError(f"name must be a non-empty key without dots, got {name!r}")
    return {f"{n}.{name}": b.detach().float().cpu().clone() for n, b in zip(handle.router_names, handle.bias_tensors())}
