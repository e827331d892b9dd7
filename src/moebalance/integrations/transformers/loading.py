"""A model whose ``config.json`` says it was trained with Loss-Free Balancing gets its biases
back, or a loud warning: never a silent zero.

``apply_loss_free_balancing`` reads the biases from ``model.name_or_path`` when that is a local
folder. Two other ways of loading leave them at zero with no message: a model loaded by Hub repo
id (``name_or_path`` is ``"org/name"``; its files sit in the local Hugging Face cache), and a
model re-saved by plain transformers, which drops the ``expert_bias`` keys it does not know while
keeping the ``moebalance_loss_free`` record in ``config.json``. :func:`check_recorded_biases`
runs when the handle first records itself in the config (the record read from ``config.json`` is
still there): it reads the biases from the cached snapshot of a Hub id, and warns, naming the
model, when the weights hold no bias tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("moebalance.integrations.transformers")


def hub_snapshot(model) -> Path | None:
    """The local Hugging Face cache folder of a model loaded by Hub repo id, else ``None``.

    ``model.name_or_path`` is the repo id; the snapshot is looked up with
    ``huggingface_hub.snapshot_download(..., local_files_only=True)`` (``HF_HUB_CACHE`` /
    ``HF_HOME``, the revision ``main`` points to), so nothing is downloaded. A model loaded
    with its own ``cache_dir=`` or ``revision=`` is not found (``None``).
    """
    name = getattr(model, "name_or_path", "") or ""
    if not name or Path(name).is_dir() or name.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not a repo id, not cached, or huggingface_hub missing: nothing to read
        return None


def saved_bias_count(handle, folder: Path) -> int:
    """How many routers' bias tensors the ``*.safetensors`` files of ``folder`` hold (keys ending
    in the handle's bias name); 0 for a folder without such files or with unreadable ones."""
    from moebalance.integrations.transformers.checkpoint import _saved_biases

    files = sorted(folder.glob("*.safetensors"))
    try:
        return len(_saved_biases(files, {"." + r._moebalance_bias_name for r in handle.routers}))
    except ValueError:
        return 0


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
    from moebalance.integrations.transformers.checkpoint import read_biases

    if not isinstance(record, dict) or record.get("strategy") != "loss_free":
        return 0
    if any(bool(b.detach().ne(0).any()) for b in handle.bias_tensors()):
        return 0  # loaded from somewhere (a folder, load_biases_from, the model's own weights)
    name = getattr(handle.model, "name_or_path", "") or ""
    local = Path(name) if name and Path(name).is_dir() else None
    folder = local or hub_snapshot(handle.model)
    if folder is not None and saved_bias_count(handle, folder):
        if local is None and not getattr(handle.routers[0]._moebalance_family, "native_bias", None):
            n = read_biases(handle, folder)
            log.info("%s: Loss-Free biases of %d routers read from the Hugging Face cache (%s)", name, n, folder)
            return n
        return 0
    bias_name = record.get("bias_name") or handle.routers[0]._moebalance_bias_name
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
