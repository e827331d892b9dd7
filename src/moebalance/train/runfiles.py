"""The one reader of a run's files: ``config.json``, ``summary.json``, ``metrics.jsonl``,
``report.json``, ``bias_checksums.json`` and checkpoints.

Every command that reads a run folder (``train --resume``, ``compare`` / ``sweep`` reading a run
back, ``plot``, ``replay``, ``leakage --checkpoint``) reads its files through here, so that each file

* is a regular file (a symbolic link is followed): a folder, FIFO, socket or device, behind a link
  or not, is refused from its ``stat`` alone, before it is opened (a FIFO would block the reader,
  ``/dev/zero`` never ends);
* is at most its kind's size (:data:`SIZE_LIMITS`), and no more than that is ever read, even from a
  file that grows while it is read;
* decodes strictly (UTF-8, JSON) into the shape its reader promises.

Every refusal is a :class:`RunFileError` (a ``ValueError``) whose message names the file; a file
that does not exist is a ``FileNotFoundError`` naming it. Nothing here writes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_LIMIT",
    "DEFAULT_LIMIT",
    "SIZE_LIMITS",
    "RunFileError",
    "entry_kind",
    "limit_for",
    "metric_lines",
    "read_bytes",
    "read_json",
    "read_json_object",
    "read_metrics",
    "read_text",
    "read_typed_object",
]

_MiB = 2**20

#: The most bytes read from each kind of run file (by file name; :data:`CHECKPOINT_LIMIT` for
#: ``*.pt``, :data:`DEFAULT_LIMIT` for any other). A config is about 2 KB; a metrics record about
#: 100 bytes plus 8 per (layer, expert), so 2 GiB holds over 400,000 steps of 24 layers x 64 experts.
SIZE_LIMITS = {
    "config.json": 1 * _MiB,
    "summary.json": 64 * _MiB,
    "bias_checksums.json": 16 * _MiB,
    "report.json": 256 * _MiB,
    "metrics.jsonl": 2048 * _MiB,
}
#: A checkpoint holds the model and its optimizer state in memory anyway: 256 GiB.
CHECKPOINT_LIMIT = 256 * 1024 * _MiB
DEFAULT_LIMIT = 64 * _MiB

_CHUNK = 16 * _MiB


class RunFileError(ValueError):
    """A file of a run that cannot be read as what it should be; the message names the file.

    Attributes:
        path: the file, as given.
        reason: why, without the file name.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{str(path)!r} {reason}")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def entry_kind(path: str | Path) -> str | None:
    """What ``path`` is, following symbolic links: ``"file"`` (a regular file), ``"folder"``,
    ``None`` when nothing is there, else a phrase naming it (``"a FIFO (named pipe)"``,
    ``"a character device"``, ``"a symbolic link that leads nowhere (dangling, or a loop)"``, ...).
    Never opens ``path``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a symbolic link that leads nowhere (dangling, or a loop)" if os.path.islink(path) else None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, ENOTDIR, EACCES
        return f"unusable ({exc.strerror})"
    except ValueError:  # os.stat: "embedded null byte"
        return "unusable (the path contains a NUL byte)"
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else _kind(mode)


def limit_for(path: str | Path) -> int:
    """The size limit of a run file named like ``path`` (see :data:`SIZE_LIMITS`)."""
    name = Path(path).name
    return CHECKPOINT_LIMIT if name.endswith(".pt") else SIZE_LIMITS.get(name, DEFAULT_LIMIT)


def read_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (default :func:`limit_for`).

    Raises:
        FileNotFoundError: nothing at ``path`` (the message names it).
        RunFileError: ``path`` is not a regular file (checked before opening it: never blocks on a
            FIFO or reads a device), holds more than ``limit`` bytes, or cannot be read.
    """
    limit = limit_for(path) if limit is None else limit
    kind = entry_kind(path)
    if kind is None:
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if kind != "file":
        raise RunFileError(path, f"is {kind}, not a regular file" if kind != "folder" else "is a folder, not a file")
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, opening it cannot block.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise RunFileError(path, f"cannot be opened: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RunFileError(path, f"is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise RunFileError(path, f"holds {info.st_size:,} bytes, more than the {limit:,} a run's {Path(path).name} may hold")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise RunFileError(path, f"cannot be read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if total > limit:
        raise RunFileError(path, f"holds more than the {limit:,} bytes a run's {Path(path).name} may hold")
    return b"".join(chunks)


def read_text(path: str | Path, limit: int | None = None) -> str:
    """:func:`read_bytes` decoded as UTF-8 (strictly: a byte that is not UTF-8 is refused, with its
    line number, never replaced)."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RunFileError(path, f"line {line}: byte {data[exc.start]:#04x} is not UTF-8 text") from None


def _loads(text: str) -> Any:
    """``json.loads`` (raises ``ValueError``; a nesting too deep to parse is one too)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | Path, limit: int | None = None) -> Any:
    """The JSON value held by the file ``path`` (see :func:`read_text` for the checks)."""
    text = read_text(path, limit)
    try:
        return _loads(text)
    except ValueError as exc:
        raise RunFileError(path, f"is not valid JSON: {' '.join(str(exc).split())[:200]}") from None


def read_json_object(path: str | Path, limit: int | None = None) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object."""
    value = read_json(path, limit)
    if not isinstance(value, dict):
        raise RunFileError(path, f"holds a JSON {type(value).__name__}, not an object")
    return value


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _matrix_shape(x: Any) -> tuple[int, int] | None:
    """``(L, E)`` when ``x`` is a ``[L][E]`` list of finite numbers >= 0 (L, E >= 1), else ``None``."""
    if not (isinstance(x, list) and x and all(isinstance(row, list) and row for row in x)):
        return None
    if len({len(row) for row in x}) != 1:
        return None
    if not all(_number(v) and math.isfinite(v) and v >= 0 for row in x for v in row):
        return None
    return len(x), len(x[0])


#: Fields of a metrics record that are numbers when present (``metrics.jsonl``, see
#: :meth:`moebalance.train.loop._Run._log_step` and ``_evaluate``); ``loads`` is a ``[L][E]`` matrix.
_RECORD_NUMBERS = ("maxvio_batch", "loss", "lr", "val_loss", "val_ppl", "maxvio_global")


def _record_problem(rec: Any, shape: list[tuple[int, int]]) -> str | None:
    """Why a parsed metrics line is not a record of ours; ``shape`` holds the first ``loads`` shape."""
    if not isinstance(rec, dict):
        return f"is a JSON {type(rec).__name__}, not a record (object)"
    if rec.get("kind") not in ("train", "eval"):
        return f"has kind {rec.get('kind')!r}, not 'train' or 'eval'"
    step = rec.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        return f"has step {step!r}, not an integer >= 0"
    bad = [k for k in _RECORD_NUMBERS if k in rec and not _number(rec[k])]
    if bad:
        return f"holds {bad[0]}={rec[bad[0]]!r}, not a number"
    if "loads" in rec:
        found = _matrix_shape(rec["loads"])
        if found is None:
            return "holds 'loads' that are not a [layers][experts] matrix of finite counts >= 0"
        if shape and found != shape[0]:
            return f"holds 'loads' of shape {list(found)}, other records {list(shape[0])}"
        shape[:1] = [found]
    return None


def metric_lines(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for every record of a run's ``metrics.jsonl``, in file order.

    A last line without its newline that does not parse is dropped: it is the torn write of a
    killed process (the records are written line by line). Every other line must be a record the
    trainer writes: a JSON object with ``kind`` ``"train"`` or ``"eval"``, an integer ``step >= 0``,
    numbers where numbers belong and ``loads`` of one ``[layers][experts]`` shape in every record.

    Raises:
        FileNotFoundError: no such file.
        RunFileError: see :func:`read_text`; or a line that is not such a record (named by its number).
    """
    text = read_text(path)
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with its newline
    out, shape = [], []
    for number, line in enumerate(lines, start=1):
        try:
            rec = _loads(line)
        except ValueError as exc:
            raise RunFileError(path, f"line {number} is not JSON: {' '.join(str(exc).split())[:120]}") from None
        problem = _record_problem(rec, shape)
        if problem is not None:
            raise RunFileError(path, f"line {number} {problem}; not a moebalance metrics record")
        out.append((line, rec))
    if torn:
        try:
            rec = _loads(torn)
        except ValueError:
            return out  # the torn last write
        problem = _record_problem(rec, shape)
        if problem is not None:
            raise RunFileError(path, f"line {len(lines) + 1} {problem}; not a moebalance metrics record")
        out.append((torn, rec))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (see :func:`metric_lines` for the checks)."""
    return [rec for _, rec in metric_lines(path)]


def read_typed_object(path: str | Path, types: dict[str, str], what: str) -> dict[str, Any]:
    """:func:`read_json_object` of a file whose fields ``types`` (name -> annotation: ``"float"``,
    ``"int"``, ``"str"`` or ``"list[float]"``; other annotations are not checked) must be present
    with values of that type (a float field takes any number, never a bool).

    Raises:
        FileNotFoundError: no such file.
        RunFileError: see :func:`read_json`; or a field missing or of another type (named), as
            ``"... not a moebalance {what}"``.
    """
    value = read_json_object(path)
    checks = {
        "float": _number,
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "list[float]": lambda v: isinstance(v, list) and all(map(_number, v)),
    }
    for name, annotation in types.items():
        check = checks.get(annotation)
        if check is not None and not check(value.get(name)):
            got = "nothing" if name not in value else repr(value[name])[:60]
            raise RunFileError(path, f"holds {got} for {name!r}, not {annotation}; not a moebalance {what}")
    return value
