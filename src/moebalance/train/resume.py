"""Training state for exact resume: what a checkpoint holds and how a run picks it back up.

A run stopped after step ``k`` and resumed from its checkpoint of step ``k`` continues
bit-identically on CPU: the checkpoint holds everything the next step reads.

* the model ``state_dict`` (the Loss-Free expert biases are persistent buffers, so included) and
  each router's load counter (zero between steps, saved anyway so nothing is assumed);
* the optimizer and LR-scheduler state;
* every RNG state: torch CPU (and CUDA when initialised), Python ``random``, NumPy, and the data
  generator, whose state *is* the data position (batches are random windows drawn from it);
* the step and the running statistics the final summary needs (MaxVio_batch history, skipped
  steps, last evaluation, training time);
* the config and the data fingerprint, checked on resume (resuming on other data or another model
  would be a silent wrong result).

The trainer calls :func:`capture_state` / :func:`restore_state`; :func:`continue_metrics` cuts
``metrics.jsonl`` back to the checkpoint's step so the resumed run appends the same records an
uninterrupted run would have written.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moebalance.train.checkpoint import (
    RUN_FOLDERS,
    CheckpointDir,
    atomic_write_bytes,
    load_checkpoint,
    run_folder_problem,
    short_reason,
)
from moebalance.train.runfiles import RunFileError, entry_kind, metric_lines

__all__ = [
    "RESUMABLE_KEYS",
    "capture_state",
    "check_resumable_folder",
    "continue_metrics",
    "latest_training_state",
    "restore_state",
]

STATE_VERSION = 1

# Config keys a resumed run may change: they decide how long the run goes on and what it logs or
# saves, not what one training step computes (``train.max_steps`` does move the cosine schedule:
# extending a run is a deliberate choice, not bit-identical to a longer run from scratch).
RESUMABLE_KEYS = frozenset(
    {
        "train.max_steps",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.eval_every",
        "train.eval_tokens",
        "train.log_every",
        "train.threads",
        "train.malloc",
        "train.tensorboard",
        "train.device",
        "train.on_nonfinite",
        "data.cache_dir",
    }
)


def _numpy_state() -> dict[str, Any]:
    """NumPy's global RNG state in plain Python types (its key array as a list), so a checkpoint
    holds nothing that ``torch.load(weights_only=True)`` refuses."""
    state = np.random.get_state(legacy=False)
    state["state"] = {**state["state"], "key": state["state"]["key"].tolist()}
    return state


def _set_numpy_state(state: dict[str, Any]) -> None:
    """The inverse of :func:`_numpy_state`."""
    inner = {**state["state"], "key": np.asarray(state["state"]["key"], dtype=np.uint32)}
    np.random.set_state({**state, "state": inner})


def _rng_states(data_gen: torch.Generator) -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "data": data_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def capture_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_gen: torch.Generator,
    config: dict[str, Any],
    data_fingerprint: str,
    step: int,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to continue a run after ``step`` completed loop iterations.

    Args:
        model: the model (its routers' ``load_counts`` are saved besides the ``state_dict``).
        optimizer, scheduler: their ``state_dict`` is saved.
        data_gen: the generator that draws the training batches.
        config: ``RunConfig.to_dict()`` of the run.
        data_fingerprint: ``TokenData.fingerprint``.
        step: loop iterations done (optimizer steps plus skipped steps).
        stats: running statistics (``skipped``, ``maxvio_history``, ``last_eval``, ``train_time``).

    Returns:
        a dict for :func:`~moebalance.train.checkpoint.save_checkpoint` (tensors are copied to CPU).
    """
    from moebalance.balancing import find_routers

    return {
        "version": STATE_VERSION,
        "step": step,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "load_counts": [r.load_counts.detach().cpu().clone() for r in find_routers(model)],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_states(data_gen),
        "config": config,
        "data_fingerprint": data_fingerprint,
        "stats": dict(stats),
    }


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two ``RunConfig.to_dict()`` results."""
    keys = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                keys.append(f"{section}.{name}")
    return keys


def restore_state(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_gen: torch.Generator,
    config: dict[str, Any],
    data_fingerprint: str,
    source: str = "checkpoint",
) -> tuple[int, dict[str, Any]]:
    """Load a :func:`capture_state` dict into freshly built training objects.

    Returns:
        ``(step, stats)``: loop iterations already done and the running statistics.

    Raises:
        ValueError: the checkpoint is of another format version, was made on other data, or with a
            config that differs in a key outside :data:`RESUMABLE_KEYS` (the message lists them),
            or holds weights or optimizer state that do not fit the freshly built objects.
    """
    missing = sorted({"config", "data_fingerprint", "model", "load_counts", "optimizer", "scheduler", "stats"} - state.keys())
    if state.get("version") != STATE_VERSION or "rng" not in state or missing or not isinstance(state["config"], dict):
        raise ValueError(f"{source} is not a resumable training state (version {state.get('version')!r})")
    try:  # a crafted or foreign state: any field of the wrong type or shape is one error naming the file
        return _restore(state, model, optimizer, scheduler, data_gen, config, data_fingerprint, source)
    except _StateMismatch:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{source} does not fit this run's model, optimizer and state: {exc.__class__.__name__}: {short_reason(exc)}") from exc


class _StateMismatch(ValueError):
    """A well-formed state that this run cannot continue (other data, config or length)."""


def _restore(state, model, optimizer, scheduler, data_gen, config, data_fingerprint, source) -> tuple[int, dict[str, Any]]:
    """The body of :func:`restore_state`, after its format check."""
    from moebalance.balancing import find_routers

    if state["data_fingerprint"] != data_fingerprint:
        raise _StateMismatch(
            f"{source} was made on data with fingerprint {state['data_fingerprint']}, "
            f"but this run's data has {data_fingerprint}: resume on the same data"
        )
    changed = [k for k in config_differences(state["config"], config) if k not in RESUMABLE_KEYS]
    if changed:
        raise _StateMismatch(f"{source} was made with a different config in {changed}; only {sorted(RESUMABLE_KEYS)} may change on resume")
    if config["train"]["max_steps"] < int(state["step"]):
        raise _StateMismatch(
            f"train.max_steps={config['train']['max_steps']} is below step {state['step']}, which {source} already "
            "reached; a resumed run cannot go back (start a new run, or raise train.max_steps)"
        )
    model.load_state_dict(state["model"])
    routers = find_routers(model)
    with torch.no_grad():
        for router, counts in zip(routers, state["load_counts"], strict=True):
            router.load_counts.copy_(counts)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stats = dict(state["stats"])
    absent = sorted(fresh_stats().keys() - stats.keys())  # what the loop reads
    if absent:
        raise KeyError(f"stats without {absent}")
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    _set_numpy_state(rng["numpy"])
    data_gen.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), stats


def fresh_stats() -> dict[str, Any]:
    """The running statistics of a run at step 0 (restored from a checkpoint on resume)."""
    return {"skipped": 0, "maxvio_history": [], "last_eval": None, "train_time": 0.0}


def _check_resumable(state: Any, path: Path) -> dict[str, Any]:
    if not (isinstance(state, dict) and state.get("version") == STATE_VERSION and "rng" in state and isinstance(state.get("step"), int)):
        raise ValueError(f"checkpoint {path} is not a resumable moebalance training state")
    return state


def latest_training_state(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest verified training state of the run in ``run_dir``, to resume or extend it.

    Candidates are the periodic checkpoints ``run_dir/checkpoints/step_*.pt`` (written with
    ``train.checkpoint_every > 0``) and the final ``run_dir/checkpoint.pt`` (every finished run has
    one); the one of the latest step wins, and a truncated, corrupt or foreign file is skipped with
    a warning, as in :meth:`~moebalance.train.checkpoint.CheckpointDir.load_latest`. So a finished
    run can be extended (``train.max_steps`` raised) and an interrupted one resumed.

    Returns:
        ``(path, state)`` of :func:`capture_state`'s format.

    Raises:
        FileNotFoundError: neither kind of checkpoint exists.
        ValueError: none of them verifies (the message names each file and its fault).
    """
    import logging

    run_dir = Path(run_dir)
    final, periodic = run_dir / "checkpoint.pt", CheckpointDir(run_dir / "checkpoints")
    faults: list[str] = []
    best: tuple[Path, dict[str, Any]] | None = None
    if os.path.lexists(final):  # one that is not a regular file is refused by name, not passed over
        try:
            best = final, _check_resumable(load_checkpoint(final), final)
        except ValueError as exc:
            faults.append(str(exc))
    for step in reversed(periodic.steps()):
        if best is not None and best[1]["step"] >= step:
            break
        path = periodic.path_for(step)
        try:
            best = path, _check_resumable(load_checkpoint(path), path)
            break
        except ValueError as exc:
            faults.append(str(exc))
    for fault in faults:
        logging.getLogger(__name__).warning("%s; skipped", fault)
    if best is not None:
        return best
    if not faults:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: neither checkpoint.pt nor checkpoints/step_*.pt")
    raise ValueError(f"no usable checkpoint in {run_dir}: " + "; ".join(faults))


def continue_metrics(path: str | Path, step: int) -> int:
    """Cut a run's ``metrics.jsonl`` back to the records of steps ``<= step`` (atomically).

    Records of the steps after the checkpoint are dropped (the resumed run writes them again), and
    so is a torn last line left by a killed process.

    Returns:
        the number of records kept.

    Raises:
        RunFileError: a line other than a torn last one is not a metrics record, or the file is
            not a regular file (:func:`moebalance.train.runfiles.metric_lines`); nothing is written.
    """
    path = Path(path)
    if entry_kind(path) is None and not path.is_symlink():
        return 0
    kept = [line + "\n" for line, rec in metric_lines(path) if rec["step"] <= step]
    atomic_write_bytes(path, "".join(kept).encode())
    return len(kept)


def check_resumable_folder(run_dir: str | Path) -> None:
    """Check, before anything is written, that the run in ``run_dir`` can be continued in place:
    every name the run writes is free or of the right kind (:func:`run_folder_problem`: a file
    name not taken by a folder, FIFO or device, ``checkpoints`` and ``tb`` not files, even
    behind a symbolic link), its ``config.json`` is a JSON object, and every line of its
    ``metrics.jsonl`` is a record (:func:`moebalance.train.runfiles.metric_lines`: UTF-8, an
    integer step, ...), since the resumed run cuts it back and appends to it.

    Raises:
        ValueError: the first problem, naming the file (a :class:`RunFileError` for a file that
            cannot be read).
    """
    run_dir = Path(run_dir)
    problem = run_folder_problem(run_dir, clearing=True)  # clearing: config.json must be a run's too
    if problem is not None:
        raise ValueError(f"{problem}; not resumed")
    for name in RUN_FOLDERS:
        kind = entry_kind(run_dir / name)
        if kind not in (None, "folder"):
            raise RunFileError(run_dir / name, f"is {'a file' if kind == 'file' else kind} where a run writes a folder; not resumed")
    if os.path.lexists(run_dir / "metrics.jsonl"):
        metric_lines(run_dir / "metrics.jsonl")
