"""One run of a multi-run experiment, resumed or read back instead of retrained or overwritten.

``compare`` and ``sweep`` call :func:`run_or_resume` for every run folder. What it does with the
folder depends on what is already there:

* nothing (or no ``config.json``): train from step 0;
* a ``config.json`` of the same config (keys of :data:`~moebalance.train.resume.RESUMABLE_KEYS`,
  such as ``train.threads``, may differ) and a ``summary.json``: the run is finished; its summary
  is read back, nothing is trained or written;
* the same config and checkpoints but no summary (a run that was interrupted or killed): training
  continues from the newest good checkpoint (:mod:`moebalance.train.resume`, bit-identical on CPU);
* the same config, no checkpoint and no summary (stopped before its first checkpoint): trained
  again from step 0, the only thing lost being that unfinished attempt;
* a ``config.json`` of another config, or a finished run that differs in a key of
  :data:`RECORD_KEYS` (its length or what it recorded): :class:`RunFolderError`, naming the keys,
  unless ``overwrite`` (then what the old run wrote is moved aside,
  :func:`~moebalance.train.checkpoint.stash_run`, the run trained from step 0, and the old run
  removed once it finishes or put back if it fails; a
  ``config.json`` that is not a moebalance run's is never cleared, :func:`clear_refusal`). A finished run
  is never retrained or overwritten without ``overwrite``, and a report never shows a run read back
  under a config that would have recorded it differently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moebalance.train.checkpoint import CheckpointDir, describe_os_error, run_folder_problem
from moebalance.train.config import RunConfig
from moebalance.train.resume import RESUMABLE_KEYS, check_resumable_folder, config_differences
from moebalance.train.runfiles import read_json

log = logging.getLogger(__name__)

__all__ = ["RECORD_KEYS", "RunFolderError", "clear_refusal", "damaged_run", "folder_conflict", "run_or_resume", "run_state"]


#: Keys of :data:`~moebalance.train.resume.RESUMABLE_KEYS` that an unfinished run may change on
#: resume but a finished run may not when it is read back: its length and what it recorded (the
#: evaluations and logged steps a report shows). The others (threads, device, checkpointing, ...)
#: leave a finished run's records as they are.
RECORD_KEYS = frozenset({"train.max_steps", "train.eval_every", "train.eval_tokens", "train.log_every"})


class RunFolderError(ValueError):
    """A run folder holds a run of another config; it is not overwritten without ``--overwrite``."""


def _assess(run_dir: Path, cfg: RunConfig) -> tuple[str, list[str]]:
    """``(run_state, keys)``: the state and, for ``"conflict"``, the keys that differ (empty when
    the saved ``config.json`` cannot be read)."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return "new", []
    try:
        saved = read_json(config_path)
    except (OSError, ValueError):
        return "conflict", []
    current = json.loads(json.dumps(cfg.to_dict()))
    changed = config_differences(saved, current) if isinstance(saved, dict) else ["config.json"]
    fixed = [k for k in changed if k not in RESUMABLE_KEYS]
    if fixed:
        return "conflict", fixed
    if (run_dir / "summary.json").is_file():  # finished: read back, unless it was recorded differently
        recorded = [k for k in changed if k in RECORD_KEYS]
        return ("conflict", recorded) if recorded else ("finished", [])
    resumable = CheckpointDir(run_dir / "checkpoints").steps() or (run_dir / "checkpoint.pt").is_file()
    return ("resume" if resumable else "restart"), []


def run_state(run_dir: Path, cfg: RunConfig) -> str:
    """What :func:`run_or_resume` would do with ``run_dir``: ``"new"``, ``"finished"``,
    ``"resume"``, ``"restart"`` or ``"conflict"`` (see the module docstring)."""
    return _assess(run_dir, cfg)[0]


def folder_conflict(run_dir: Path, cfg: RunConfig, name: str | None = None) -> RunFolderError | None:
    """The error to raise when ``run_dir`` holds a run that ``cfg`` cannot continue or read back
    (``name``: the run's name in the experiment, for the message), ``None`` when it can."""
    state, keys = _assess(run_dir, cfg)
    if state != "conflict":
        return None
    shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    what = f"differs in {shown}" if keys else "has an unreadable config.json"
    return RunFolderError(
        f"{run_dir} holds a run of a different config than {name or 'this run'!r} now has ({what}); "
        "not overwritten (use --overwrite to replace it, or choose another --out)"
    )


def damaged_run(run_dir: Path, cfg: RunConfig) -> RunFolderError | None:
    """The error to raise when ``run_dir`` holds a run of ``cfg`` that would be read back or
    resumed (:func:`run_state` ``"finished"`` or ``"resume"``) but one of its files cannot serve:
    a finished run's ``summary.json`` (:func:`~moebalance.train.loop.read_summary`) or
    ``metrics.jsonl`` (the report's plots and replay read its training and evaluation records:
    :func:`~moebalance.lab.reporting.plot_inputs`, :func:`~moebalance.lab.replay.replay_inputs`), or anything a resumed run reads or writes
    (:func:`~moebalance.train.resume.check_resumable_folder`). ``None`` when nothing is damaged."""
    from moebalance.lab.replay import replay_inputs
    from moebalance.lab.reporting import plot_inputs
    from moebalance.train.loop import read_summary

    state = run_state(run_dir, cfg)
    try:
        if state == "finished":  # what the report reads back: the summary, the plots' and the replay's records
            read_summary(run_dir / "summary.json")
            if not plot_inputs([run_dir])[1]:
                raise ValueError(f"{str(run_dir / 'metrics.jsonl')!r} holds no evaluation record")
            replay_inputs([run_dir])
        elif state == "resume":
            check_resumable_folder(run_dir)
    except (OSError, ValueError) as exc:
        reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        return RunFolderError(f"{reason}; the run in {run_dir} is not read back or continued (repair or remove it, or choose another --out)")
    return None


def clear_refusal(run_dir: Path) -> RunFolderError | None:
    """The error to raise when ``run_dir`` cannot be cleared for a new run even with ``overwrite``
    (:func:`~moebalance.train.checkpoint.run_folder_problem`: a ``config.json`` that is not a
    moebalance run's, a run's name taken by the other kind of entry, a file that cannot be removed)."""
    problem = run_folder_problem(run_dir, clearing=True)
    if problem is None:
        return None
    return RunFolderError(f"{problem}; not cleared even with --overwrite (choose another --out)")


def run_or_resume(
    cfg: RunConfig, run_dir: str | Path, data, overwrite: bool = False, progress: bool = True, desc: str | None = None
) -> tuple[dict[str, Any], str]:
    """Train, resume or read back the run of ``cfg`` in ``run_dir``.

    Args:
        cfg: the run's config (``model.vocab_size`` already the tokenizer's).
        run_dir: the run's folder.
        data: the prepared :class:`~moebalance.train.data.TokenData`.
        overwrite: clear a folder that holds a run of another config instead of refusing.
        progress, desc: the progress bar.

    Returns:
        ``(summary, state)``: the run's ``summary.json`` content and what was done (the
        :func:`run_state` before the call; ``"overwritten"`` for a replaced conflicting folder).

    Raises:
        RunFolderError: ``run_dir`` holds a run of another config and ``overwrite`` is false, or
            its ``config.json`` is not a run's (:func:`clear_refusal`).
    """
    from moebalance.train.loop import read_summary, train

    run_dir = Path(run_dir)
    state = run_state(run_dir, cfg)
    if state == "finished":
        return read_summary(run_dir / "summary.json"), state
    if state == "conflict":
        if not overwrite:
            raise folder_conflict(run_dir, cfg, desc)
        refusal = clear_refusal(run_dir)
        if refusal is not None:
            raise refusal
        state = "overwritten"  # train() moves the old run aside once it is ready to write (stash_run)
    if state == "resume":
        log.info("%s: continuing from its last checkpoint", run_dir)
    overwritten = state == "overwritten"
    result = train(cfg, run_dir, data=data, progress=progress, desc=desc, resume=state == "resume", overwrite=overwritten)
    return result.to_dict(), state
