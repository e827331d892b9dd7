"""The biases as a file of their own, written into every Trainer checkpoint and PEFT adapter
folder, and read back when ``Trainer.train(resume_from_checkpoint=...)`` resumes.

Shape legend: E routed experts, L MoE layers.

Why a file of their own: a PEFT (LoRA) checkpoint holds only the adapter, and transformers 5.25
restores none of Mixtral's MoE weights when the Trainer resumes (an upstream fault), so in both
cases the biases would restart from whatever the model holds. ``moebalance_biases.safetensors`` holds one float32
``[E]`` tensor per router, keyed ``<router path>.<bias name>``; it is read back by layer number
(:func:`~moebalance.integrations.transformers.checkpoint.read_biases`), which every renaming keeps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("moebalance.integrations.transformers")

#: File name of the biases in a checkpoint or adapter folder.
BIAS_FILE = "moebalance_biases.safetensors"


def save_bias_file(handle, folder: str | Path) -> Path:
    """Write ``handle``'s biases (float32, one ``[E]`` tensor per router) to ``folder/BIAS_FILE``.

    The file's metadata records the update rule, rate, the optimizer steps taken and the
    format, as strings (safetensors metadata is ``str -> str``).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: ``folder`` is not an existing folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder={str(folder)!r}: no such folder to write {BIAS_FILE} into")
    tensors = {
        r._moebalance_slot.key: b.detach().to("cpu", torch.float32).contiguous().clone()
        for r, b in zip(handle.routers, handle.bias_tensors())
    }
    meta = {
        "format": "moebalance_biases",
        "version": "1",
        "paper": "arXiv 2408.15664",
        "bias_update": handle.balancer.update,
        "bias_update_rate": repr(handle.balancer.update_rate),
        "steps": str(handle.steps),
    }
    path = folder / BIAS_FILE
    save_file(tensors, str(path), metadata=meta)
    return path


def _checkpoint_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_folder(args, state) -> Path | None:
    """The checkpoint folder a resumed ``Trainer.train`` started from, seen from a callback.

    ``Trainer.train(resume_from_checkpoint=...)`` hands the path to no callback, but it loads that
    checkpoint's ``trainer_state.json``, so at ``on_train_begin`` ``state.global_step`` is its step
    (0 in a train that does not resume). Candidates, first match wins: ``args.resume_from_checkpoint``
    (a path), then ``<output_dir>/checkpoint-<global_step>`` (where the Trainer writes it and where
    ``resume_from_checkpoint=True`` looks); a candidate must be a folder whose ``trainer_state.json``
    records that step.

    Returns:
        The folder, or ``None`` when not resuming or no candidate matches.
    """
    step = getattr(state, "global_step", 0) or 0
    if step <= 0:
        return None
    candidates = []
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(Path(args.resume_from_checkpoint))
    if getattr(args, "output_dir", None):
        candidates.append(Path(args.output_dir) / f"checkpoint-{step}")
    for folder in candidates:
        if folder.is_dir() and _checkpoint_step(folder) == step:
            return folder
    return None


def restore_on_resume(handle, args, state) -> int:
    """At ``on_train_begin`` of a resumed train: read the biases back from the checkpoint.

    Reads ``BIAS_FILE`` of :func:`resume_folder`; a checkpoint written without it (before this
    callback saved one) falls back to the bias tensors of its weight files. Warns (``log.warning``)
    when resuming and nothing is found, naming the step and what was searched: the biases then go
    on from the values the model holds, which is not the trained state.

    Returns:
        The number of routers restored (0: not resuming, or nothing found).

    Raises:
        ValueError: the checkpoint's biases belong to another model (see ``read_biases``).
    """
    from moebalance.integrations.transformers.checkpoint import read_biases

    step = getattr(state, "global_step", 0) or 0
    if step <= 0:
        return 0
    folder = resume_folder(args, state)
    n = 0
    if folder is not None:
        pattern = BIAS_FILE if (folder / BIAS_FILE).is_file() else "*.safetensors"
        if any(folder.glob(pattern)):
            n = read_biases(handle, folder, pattern=pattern)
    if n:
        log.info("resumed at step %d: Loss-Free biases of %d routers restored from %s", step, n, folder / pattern)
    else:
        searched = folder if folder is not None else f"{getattr(args, 'output_dir', None)}/checkpoint-{step}"
        log.warning(
            "resuming at step %d but no Loss-Free biases found in the checkpoint (%s): the biases go on "
            "from the values the model holds now, not the trained ones. Restore them with "
            "balancing.load_biases(<checkpoint folder>) before train(), or pass "
            "TrainingArguments(resume_from_checkpoint=<folder>)", step, searched,
        )
    return n
