"""Crash-safe, verified checkpoint files and the rotating set a run resumes from.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then renamed
over the target (and the folder fsync'ed): a reader sees either the old file or the complete new
one, never a torn write.

File layout (version 1)::

    b"MOEBALANCE-CKPT\\n"   16 bytes, magic
    sha256                  32 bytes, digest of the payload
    length                   8 bytes, little-endian payload size
    payload                 torch.save(state) bytes

The digest is there because ``torch.load`` does not notice flipped bytes inside a tensor record: it
returns the damaged weights silently. A file without the magic is read as a plain ``torch.save``
file (unverified), so older checkpoints still load.

:class:`CheckpointDir` keeps the last N checkpoints of a run as ``step_00000010.pt`` files and
finds the newest one that verifies, falling back past truncated or corrupt ones.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import stat
import struct
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moebalance.train.runfiles import RunFileError, entry_kind, read_bytes, read_json

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointDir",
    "RUN_FILES",
    "RUN_FOLDERS",
    "STASH",
    "STASH_MARK",
    "atomic_write_bytes",
    "clear_run_folder",
    "drop_stash",
    "folder_problem",
    "foreign_config_problem",
    "run_folder_problem",
    "load_checkpoint",
    "put_back",
    "save_checkpoint",
    "short_reason",
    "stash_problem",
    "stash_run",
    "write_json",
    "write_text",
]

MAGIC = b"MOEBALANCE-CKPT\n"
_HEADER = struct.Struct("<16s32sQ")

# Fault injection for the crash tests only (tests/test_resume.py): when this variable holds a step
# number, the process SIGKILLs itself half-way through writing that step's checkpoint, after the
# first half of the bytes reached the disk. Nothing else reads it.
FAULT_ENV = "MOEBALANCE_TEST_KILL_IN_CHECKPOINT_WRITE"


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder this process writes into, or ``None`` if it can.

    Looks at ``path`` and its nearest existing ancestor only (nothing is created): a file where a
    folder is expected, a NUL byte or an over-long name, a symlink loop, a folder without write
    permission.
    """
    text = str(path)
    if "\0" in text:
        return "the path contains a NUL byte"
    probe = Path(path)
    try:
        while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
            probe = probe.parent
        if probe.is_symlink() and not probe.exists():
            return f"{str(probe)!r} is a symbolic link that leads nowhere (dangling, or a loop)"
        if not probe.is_dir():
            return f"{str(probe)!r} is a file, not a folder"
    except OSError as exc:  # e.g. a name longer than the file system allows
        return describe_os_error(exc)
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{str(probe)!r} is not writable"
    return None


#: What a training run writes in its folder (:mod:`moebalance.train.loop`, :mod:`moebalance.train.logs`,
#: ``moebalance plot``): the files, and the folders with the pattern of what a run writes in each.
#: :func:`clear_run_folder` removes these and nothing else.
RUN_FILES = (
    "config.json",
    "summary.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "bias_checksums.json",
    "maxvio_batch.png",
    "val_loss.png",
    "expert_load.png",
)
#: The names of :meth:`CheckpointDir.path_for` (group 1: the step).
_STEP_FILE = r"step_(\d{8,})\.pt"


def _tmp_of(names: str) -> str:
    """The pattern of the temporary files :func:`atomic_write_bytes` writes for the names matched
    by the pattern ``names`` (``.NAME.`` + ``mkstemp``'s 8 characters + ``.tmp``)."""
    return rf"\.(?:{names})\.\w{{8}}\.tmp"


RUN_FOLDERS = {
    "checkpoints": re.compile(rf"{_STEP_FILE}|{_tmp_of(_STEP_FILE)}"),
    "tb": re.compile(r"events\.out\.tfevents\..+"),
}
_RUN_TMP = re.compile(_tmp_of("|".join(map(re.escape, RUN_FILES))))

#: Fields of a run's ``config.json`` that every moebalance version has written (besides the sections).
_CONFIG_MARKERS = {"model": "num_experts", "balance": "strategy", "data": "path", "train": "max_steps"}


def foreign_config_problem(run_dir: str | Path) -> str | None:
    """Why ``run_dir/config.json`` is not a moebalance run's config (so that ``--overwrite`` must
    not clear the folder), or ``None`` when it is one or there is none.

    A run's config is a JSON object whose keys are the sections of ``RunConfig`` (``model``,
    ``balance``, ``data``, ``train``), each an object, with the fields every version has written:
    ``model.num_experts``, ``balance.strategy``, ``data.path`` and ``train.max_steps``;
    anything else (another tool's ``config.json``, an unreadable file) is named here. A file that
    vanishes while it is read (another rank clearing the folder) counts as none.
    """
    from moebalance.train.config import RunConfig  # the one place the sections' fields are defined

    path = Path(run_dir) / "config.json"
    if entry_kind(path) in (None, "folder"):  # a folder there is _run_entries' to name
        return None
    try:
        saved = read_json(path)
    except FileNotFoundError:
        return None
    except ValueError as exc:  # RunFileError: names the file and why
        return str(exc)
    fields = RunConfig().to_dict()
    if not (
        isinstance(saved, dict)
        and set(saved) == set(fields)
        and all(isinstance(v, dict) for v in saved.values())
        and all(marker in saved[k] for k, marker in _CONFIG_MARKERS.items())
    ):
        fields_named = ", ".join(f"{k}.{m}" for k, m in _CONFIG_MARKERS.items())
        return f"{str(path)!r} is not a moebalance run config (expected the sections {sorted(fields)} with {fields_named})"
    return None


def _what(path: Path) -> str:
    """``"a folder"``, ``"a file"``, ``"a FIFO (named pipe)"``, ...: what ``path`` is (see :func:`entry_kind`)."""
    kind = entry_kind(path)
    return {"file": "a file", "folder": "a folder"}.get(kind, kind or "nothing")


def _run_entries(folder: Path) -> tuple[list[Path], list[Path], str | None]:
    """``(files, folders, problem)``: what a run wrote in ``folder`` (the files to remove, the
    run's sub-folders to remove once empty) and why the folder cannot serve a run, if it cannot
    (a run's name taken by the other kind of entry, or an entry that cannot be removed)."""
    files, folders = [], []
    for name in RUN_FILES:
        path = folder / name
        if path.is_symlink() or path.is_file():
            files.append(path)
        elif path.exists():
            return [], [], f"{str(path)!r} is {_what(path)} where a run writes a file"
    for entry in folder.iterdir():
        if _RUN_TMP.fullmatch(entry.name) and (entry.is_file() or entry.is_symlink()):
            files.append(entry)
    for name, pattern in RUN_FOLDERS.items():
        path = folder / name
        if path.is_symlink():
            files.append(path)
        elif path.is_dir():
            ours = [e for e in path.iterdir() if pattern.fullmatch(e.name)]
            taken = [e for e in ours if not (e.is_file() or e.is_symlink())]
            if taken:
                return [], [], f"{str(taken[0])!r} is {_what(taken[0])} where a run writes a file"
            files.extend(ours)
            folders.append(path)
        elif path.exists():
            return [], [], f"{str(path)!r} is {_what(path)} where a run writes a folder"
    for parent in {f.parent for f in files}:
        if not os.access(parent, os.W_OK | os.X_OK):
            return [], [], f"{str(parent)!r} is not writable, so the old run's files in it cannot be removed"
    return files, folders, None


def _plan(folder: Path, clearing: bool) -> tuple[list[Path], list[Path], str | None]:
    """:func:`_run_entries` with the checks of :func:`run_folder_problem` (nothing to remove when
    there is a problem)."""
    problem = foreign_config_problem(folder) if clearing else None
    if problem is None:
        problem = stash_problem(folder)
    if problem is not None or not folder.is_dir():
        return [], [], problem
    try:
        files, folders, problem = _run_entries(folder)
    except OSError as exc:
        return [], [], describe_os_error(exc)
    # A run writes its config.json before anything else: run files without one are not ours.
    named = sorted(f.name for f in files if f.parent == folder and f.name in RUN_FILES)
    if problem is None and named and not (folder / "config.json").is_file():
        problem = f"{str(folder)!r} holds {', '.join(named)} but no config.json, so not a moebalance run; not overwritten"
    return (files, folders, None) if problem is None else ([], [], problem)


def run_folder_problem(run_dir: str | Path, clearing: bool = False) -> str | None:
    """Why a run cannot be written into ``run_dir`` (with ``clearing``: after
    :func:`clear_run_folder`), or ``None``: a ``config.json`` that is not a run's
    (:func:`foreign_config_problem`; only when ``clearing``), a run's file name taken by a folder
    or a run's folder name by a file, an old run's file that cannot be removed, files with a run's
    names (``summary.json``, ...) but no ``config.json`` (not a run: never overwritten), a
    ``.replaced-run`` that is not a stash moebalance made (:func:`stash_problem`). Checks only."""
    return _plan(Path(run_dir), clearing)[2]


def clear_run_folder(run_dir: str | Path) -> None:
    """Remove what a run wrote in ``run_dir`` and nothing else: the files of :data:`RUN_FILES`,
    leftover temporary files of their atomic writes, in ``checkpoints/`` and ``tb/`` only the
    run's own files (:data:`RUN_FOLDERS`; each folder removed if that empties it). A symlink is
    unlinked, never followed. ``config.json`` goes last, so a clear that fails part-way still
    leaves a folder recognised as a run (another ``--overwrite`` finishes it).

    Raises:
        ValueError: :func:`run_folder_problem` names a problem; nothing is removed.
        OSError: a file cannot be removed (the message names its path).
    """
    folder = Path(run_dir)
    files, folders, problem = _plan(folder, clearing=True)
    if problem is not None:
        raise ValueError(f"{problem}; nothing removed")
    _remove(folder, files, folders)


def _remove(folder: Path, files: list[Path], folders: list[Path]) -> None:
    """Unlink ``files`` (``folder/config.json`` last), then remove each of ``folders`` that is empty."""
    for path in sorted(files, key=lambda p: p == folder / "config.json"):
        path.unlink(missing_ok=True)
    for path in folders:
        if not any(path.iterdir()):
            path.rmdir()


#: The hidden folder inside a run folder where ``--overwrite`` keeps the run it replaces (same
#: layout: ``config.json``, ``checkpoints/step_*.pt``, ...) until the new run completes
#: (:func:`stash_run`, :func:`put_back`, :func:`drop_stash`). No reader of run folders looks in it.
STASH = ".replaced-run"

#: The file :func:`stash_run` writes into a new stash before moving anything into it: a
#: ``.replaced-run`` without it (a user's folder or file, a symbolic link) is never filled, moved or removed.
STASH_MARK = ".moebalance-stash"


def _ours(stash: Path) -> bool:
    """Whether ``stash`` is a real folder (not a symbolic link) holding :data:`STASH_MARK` as a regular file."""
    try:
        return stat.S_ISDIR(os.lstat(stash).st_mode) and stat.S_ISREG(os.lstat(stash / STASH_MARK).st_mode)
    except OSError:
        return False


def stash_problem(run_dir: str | Path) -> str | None:
    """Why ``run_dir/.replaced-run`` cannot be used as the stash, or ``None`` (there is none, or
    it is a folder :func:`stash_run` made): a file, a symbolic link (even to a folder), or a folder
    without :data:`STASH_MARK`. Checks only; never raises."""
    stash = Path(run_dir) / STASH
    if not os.path.lexists(stash) or _ours(stash):
        return None
    what = "a symbolic link" if stash.is_symlink() else _what(stash)
    if what == "a folder":
        what = f"a folder moebalance did not make (no {STASH_MARK} in it)"
    return f"{str(stash)!r} is {what}, where --overwrite keeps the run it replaces; move it away (it is never used or removed)"


def _make_stash(folder: Path) -> None:
    """Create ``folder/STASH`` with :data:`STASH_MARK` in it, atomically (made as a temporary
    folder, renamed into place): a stash folder without its mark never exists.

    Raises:
        OSError: the folder cannot be created, or something appeared at its name meanwhile.
    """
    tmp = Path(tempfile.mkdtemp(prefix=STASH + ".", suffix=".tmp", dir=folder))
    try:
        tmp.chmod(0o777 & ~current_umask())  # as a plain mkdir makes it (mkdtemp: 0700)
        (tmp / STASH_MARK).write_bytes(b"moebalance: the run an --overwrite replaced\n")
        if os.path.lexists(folder / STASH):
            raise FileExistsError(errno.EEXIST, "appeared while the stash was made", str(folder / STASH))
        os.rename(tmp, folder / STASH)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done: a Ctrl-C cannot leave a run half moved."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _move(folder: Path, files: list[Path], folders: list[Path], to: Path, config_last: bool) -> None:
    """Rename ``files`` and create ``folders`` (paths under ``folder``) at the same relative paths
    under ``to``; ``folder/config.json`` moves last (``config_last``) or first."""
    config = folder / "config.json"
    for path in folders:
        (to / path.relative_to(folder)).mkdir(parents=True, exist_ok=True)
    for path in sorted(files, key=lambda p: (p == config) == config_last):
        target = to / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)


def _stashed(stash: Path) -> tuple[list[Path], list[Path]]:
    """``(files, folders)`` in ``stash``, folders parents first (a symbolic link counts as a file)."""
    files, folders = [], []
    for parent, dirs, names in os.walk(stash):  # never into a symbolic link
        for name in dirs + names:
            path = Path(parent) / name
            if path != stash / STASH_MARK:
                (folders if path.is_dir() and not path.is_symlink() else files).append(path)
    return files, folders


def _unstash(folder: Path) -> None:
    """Move everything in ``folder/STASH`` back into ``folder`` (``config.json`` first: a stash that
    holds one is complete) and remove the stash's emptied folders, and the stash with its mark once
    nothing else is in it.

    Raises:
        OSError: an entry cannot be moved back (the mark stays: the stash is still ours).
    """
    stash = folder / STASH
    files, folders = _stashed(stash)
    _move(stash, files, folders, folder, config_last=False)
    for path in reversed(folders):
        with contextlib.suppress(OSError):  # emptied; anything else in it stays
            path.rmdir()
    if not any(p.name != STASH_MARK for p in stash.iterdir()):
        (stash / STASH_MARK).unlink()
        stash.rmdir()


def stash_run(run_dir: str | Path) -> bool:
    """Move what the run in ``run_dir`` wrote (what :func:`clear_run_folder` would remove) into
    ``run_dir/.replaced-run`` (:data:`STASH`), by renames in the same layout, ``config.json`` last: a
    stash that holds a ``config.json`` is complete. SIGINT and SIGTERM wait until the moves are done.

    A complete stash already there (an ``--overwrite`` killed with SIGKILL) holds the run that one
    replaced, and is kept: the unfinished run beside it is removed instead. A run beside it that
    finished (its ``summary.json``) is the newer finished run: it replaces the stash. An incomplete
    stash (a kill during the moves) is completed. A new stash is made with its mark
    (:data:`STASH_MARK`) before anything moves; a ``.replaced-run`` without it is refused.

    Returns:
        whether the stash now holds a run for :func:`put_back` (only then may it be called).

    Raises:
        ValueError: :func:`run_folder_problem` names a problem (also a ``.replaced-run`` that is
            not ours, :func:`stash_problem`); nothing is moved.
        OSError: an entry cannot be moved (the message names it); what was moved is moved back.
    """
    folder = Path(run_dir)
    stash = folder / STASH
    files, folders, problem = _plan(folder, clearing=True)
    if problem is not None:
        raise ValueError(f"{problem}; nothing moved")
    with _signals_held():
        if (stash / "config.json").is_file():
            if not (folder / "summary.json").is_file():
                log.warning("%s holds the run an interrupted --overwrite replaced: kept; the unfinished run beside it removed", stash)
                _remove(folder, files, folders)
                return True
            shutil.rmtree(stash)
        if not files and not _ours(stash):
            return False
        if not _ours(stash):
            _make_stash(folder)
        try:
            _move(folder, files, folders, stash, config_last=True)
        except BaseException:
            _unstash(folder)
            raise
        _remove(folder, [], folders)
    return True


def put_back(run_dir: str | Path) -> str:
    """Undo :func:`stash_run` after the new run failed: remove what the new run wrote (the entries
    :func:`clear_run_folder` would remove), move the stash's entries back, ``config.json`` first,
    and remove the stash. SIGINT and SIGTERM wait until it is done.

    Only a stash :func:`stash_run` made (:func:`stash_problem`) is put back; otherwise nothing
    is removed or moved.

    Returns:
        the sentence for the error message: the earlier run was put back, or why not and where
        its files are (never raises for the folder).
    """
    folder = Path(run_dir)
    if not _ours(folder / STASH):
        reason = stash_problem(folder) or f"{str(folder / STASH)!r} is not there"
        return f"the earlier run could not be put back ({reason}); nothing was removed"
    try:
        with _signals_held():
            files, folders, problem = _run_entries(folder)
            if problem is not None:
                raise ValueError(problem)
            _remove(folder, files, folders)
            _unstash(folder)
    except (OSError, ValueError) as exc:
        reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        return f"the earlier run could not be put back ({reason}); its files are in {str(folder / STASH)!r}"
    return f"the earlier run in {str(folder)!r} was put back as it was"


def drop_stash(run_dir: str | Path) -> None:
    """Remove ``run_dir/.replaced-run`` once the run that replaced it completed, only if
    :func:`stash_run` made it (:func:`stash_problem`: else it is left, with a warning); a failure
    is logged, never raised."""
    stash = Path(run_dir) / STASH
    problem = stash_problem(run_dir)
    if problem is not None:
        log.warning("%s", problem)
    elif os.path.lexists(stash):
        try:
            shutil.rmtree(stash)
        except OSError as exc:
            log.warning("the replaced run in %s could not be removed (%s); remove it by hand", stash, describe_os_error(exc))


def describe_os_error(exc: OSError) -> str:
    """``"No such file or directory: 'x'"`` rather than ``"[Errno 2] No such file or directory: 'x'"``."""
    if exc.strerror is None:
        return str(exc)
    names = [repr(str(n)) for n in (exc.filename, exc.filename2) if n is not None]
    return exc.strerror + (": " + " -> ".join(names) if names else "")


def atomic_write_bytes(path: str | Path, data: bytes, _kill_midway: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder).

    The file gets the permissions of a plain ``open(path, "w")``: ``0o666`` minus the umask
    (``mkstemp`` alone would leave ``0o600``).

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            if _kill_midway:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _encode(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return _HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload)) + payload


def save_checkpoint(path: str | Path, state: dict[str, Any], _kill_midway: bool = False) -> None:
    """``torch.save`` ``state`` to ``path`` atomically, with a SHA-256 of the payload (format above)."""
    atomic_write_bytes(path, _encode(state), _kill_midway=_kill_midway)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a regular file or is over the size limit
            (:func:`moebalance.train.runfiles.read_bytes`: a FIFO, device or folder is refused
            without being read), is truncated or corrupt (wrong length, SHA-256 mismatch, unreadable
            payload), or holds pickled objects other than tensors and plain data (refused by
            ``torch.load(weights_only=True)``, never run); the message names the file.
    """
    path = Path(path)
    try:
        blob = read_bytes(path)  # a regular file only, bounded (never blocks on a FIFO)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except RunFileError as exc:
        raise ValueError(f"checkpoint {exc}") from None
    if blob[: len(MAGIC)] == MAGIC:
        if len(blob) < _HEADER.size:
            raise ValueError(f"checkpoint {path} is truncated: {len(blob)} bytes, shorter than its header")
        _, digest, length = _HEADER.unpack_from(blob)
        payload = blob[_HEADER.size :]
        if len(payload) != length:
            raise ValueError(f"checkpoint {path} is truncated: payload of {len(payload)} bytes, expected {length}")
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError(f"checkpoint {path} is corrupt: SHA-256 of the payload does not match its header")
    else:
        payload = blob  # a plain torch.save file (no digest to check)
    try:
        # weights_only: tensors and plain Python containers only, so a file from elsewhere cannot
        # run code when it is unpickled (a checkpoint of ours holds nothing else).
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the reason below says enough
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # "Unsupported global: GLOBAL x.y", or "unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # a damaged pickle stream: torch's own reason, never its advice to load unsafely
            inner = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", str(exc), re.S)
            reason = short_reason(inner.group(1)) if inner else "not a readable torch.save stream"
            raise ValueError(f"checkpoint {path} is truncated or corrupt: {reason or 'unreadable pickle'}") from exc
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors and plain data (the first: "
            f"{found.group(1)}); refused, because "
            "unpickling them could run code (a moebalance checkpoint holds only tensors and plain data)"
        ) from exc
    except Exception as exc:  # torch raises several types for a damaged zip / pickle
        reason = short_reason(exc)
        if "weights_only" in reason:
            reason = "not a readable torch.save stream"
        raise ValueError(f"checkpoint {path} is truncated or corrupt: {exc.__class__.__name__}" + (f": {reason}" if reason else "")) from exc


def short_reason(what: BaseException | str) -> str:
    """The first 200 characters of an exception's message (or a text) on one line: the reason
    part of an error message that quotes another library's."""
    return " ".join(str(what).split())[:200]


class CheckpointDir:
    """The rotating checkpoints of one run: ``<folder>/step_%08d.pt``, the last ``keep`` kept.

    Args:
        folder: where the files live (created on the first save).
        keep: how many checkpoints to keep (>= 1); older ones are deleted only after a newer one
            is safely on disk.

    Raises:
        ValueError: ``keep < 1``.
    """

    _NAME = re.compile(rf"^{_STEP_FILE}$")

    def __init__(self, folder: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, oldest first (temporary files excluded)."""
        if not self.folder.is_dir():
            return []
        found = (self._NAME.match(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep``.

        Leftover temporary files of an earlier killed write are removed too.
        """
        path = self.path_for(step)
        kill = os.environ.get(FAULT_ENV) == str(step)
        save_checkpoint(path, state, _kill_midway=kill)
        for old in self.steps()[: -self.keep]:
            self.path_for(old).unlink(missing_ok=True)
        for tmp in self.folder.glob(".step_*.tmp"):
            if RUN_FOLDERS["checkpoints"].fullmatch(tmp.name):  # a killed write of ours, not a user's file
                tmp.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[Path, dict[str, Any]]:
        """The newest checkpoint that verifies, skipping (with a warning) truncated or corrupt ones.

        Returns:
            ``(path, state)``.

        Raises:
            FileNotFoundError: the folder holds no checkpoint.
            ValueError: no checkpoint verifies (the message names each file and its fault).
        """
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint (step_*.pt) in {self.folder}")
        faults = []
        for step in reversed(steps):
            path = self.path_for(step)
            try:
                return path, load_checkpoint(path)
            except ValueError as exc:
                log.warning("%s; falling back to an older checkpoint", exc)
                faults.append(str(exc))
        raise ValueError(f"no usable checkpoint in {self.folder}: " + "; ".join(faults))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())
