"""The local Hugging Face cache folder of a model loaded by Hub repo id (nothing downloaded).

``apply_loss_free_balancing`` reads the biases from ``model.name_or_path`` when that is a local
folder; a model loaded by repo id (``"org/name"``) has its files in the local cache instead, where
:func:`hub_snapshot` finds them for
:func:`~moebalance.integrations.transformers.checkpoint.check_recorded_biases`.
"""

from __future__ import annotations

from pathlib import Path


def hub_snapshot(model) -> Path | None:
    """The local Hugging Face cache folder of a model loaded by Hub repo id, else ``None``.

    ``model.name_or_path`` is the repo id; the snapshot is looked up with
    ``huggingface_hub.snapshot_download(..., local_files_only=True)`` (``HF_HUB_CACHE`` /
    ``HF_HOME``, the revision ``main`` points to), so nothing is downloaded. A model loaded
    with its own ``cache_dir=`` is not found (``None``); one loaded with another ``revision=``
    gets ``main``'s folder, which the caller must check against the model's weights.
    """
    name = getattr(model, "name_or_path", "") or ""
    if not name or Path(name).is_dir() or name.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not a repo id, not cached, or huggingface_hub missing: nothing to read
        return None
