"""Damaged run folders for the tests (tests/test_run_files.py, tests/test_cli_fuzz.py): one tiny
finished run, the ways a file of a run can be damaged, and a checksum of a folder that never
opens a FIFO or a device.

Each damage is ``name -> (apply, refused_by)``: ``apply(run)`` damages the run folder ``run`` in
place; ``refused_by`` names the commands that must refuse it (exit 2, naming the file):
``resume`` (``train --resume RUN``), ``plot`` and ``replay`` (``RUN``), ``compare`` (a finished
run it would read back), ``leakage`` (``--checkpoint RUN/checkpoint.pt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from moebalance import cli


def make_finished_run(out: Path) -> Path:
    """A finished 2-step smoke run in ``out`` (about 10 s on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    try:
        argv = ["train", "--preset", "smoke", "train.max_steps=2", "train.threads=1", "--out", str(out), "--no-progress"]
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    make(path)


def _folder(path: Path) -> None:
    _replace(path, lambda p: p.mkdir())


def _fifo(path: Path) -> None:
    _replace(path, os.mkfifo)


def _link(target: str) -> Callable[[Path], None]:
    return lambda path: _replace(path, lambda p: p.symlink_to(target))


def _content(path: Path) -> bytes:
    """What a regular file holds (nothing when an earlier damage made it something else)."""
    return path.read_bytes() if path.is_file() and not path.is_symlink() else b""


def _text(text: str | bytes, append: bool = False, prepend: bool = False) -> Callable[[Path], None]:
    data = text.encode() if isinstance(text, str) else text

    def apply(path: Path) -> None:
        old = _content(path)
        new = (old if append else b"") + data + (old if prepend else b"")
        _replace(path, lambda p: p.write_bytes(new))

    return apply


def _half(path: Path) -> None:
    data = _content(path)
    _replace(path, lambda p: p.write_bytes(data[: len(data) // 2]))


def _record(**fields) -> bytes:
    return (json.dumps(fields) + "\n").encode()


def _on(name: str, change: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda run: change(run / name)


GARBAGE = bytes(range(256)) * 4  # not UTF-8, not JSON, not a checkpoint
ALL = {"resume", "plot", "replay", "compare"}

DAMAGES: dict[str, tuple[Callable[[Path], None], set[str]]] = {
    "summary_is_folder": (_on("summary.json", _folder), {"resume", "compare"}),
    "summary_is_fifo": (_on("summary.json", _fifo), {"resume", "compare"}),
    "summary_garbage": (_on("summary.json", _text(GARBAGE)), {"compare"}),
    "summary_wrong_field": (_on("summary.json", _text('{"val_loss": "low"}')), {"compare"}),
    "metrics_is_folder": (_on("metrics.jsonl", _folder), ALL),
    "metrics_is_fifo": (_on("metrics.jsonl", _fifo), ALL),
    "metrics_links_to_dev_zero": (_on("metrics.jsonl", _link("/dev/zero")), ALL),
    "metrics_dangling_link": (_on("metrics.jsonl", _link("nowhere")), ALL),
    "metrics_not_utf8": (_on("metrics.jsonl", _text(b"\xff\xfe\n", append=True)), ALL),
    "metrics_step_not_a_number": (_on("metrics.jsonl", _text(_record(kind="train", step="x"), append=True)), ALL),
    "metrics_step_bool": (_on("metrics.jsonl", _text(_record(kind="eval", step=True), append=True)), ALL),
    "metrics_line_not_object": (_on("metrics.jsonl", _text("[1, 2]\n", append=True)), ALL),
    "metrics_garbled_middle": (_on("metrics.jsonl", _text('{"kind": "tr\n', prepend=True)), ALL),
    "metrics_deep_nesting": (_on("metrics.jsonl", _text("[" * 100_000 + "\n", append=True)), ALL),
    "metrics_ragged_loads": (
        _on("metrics.jsonl", _text(_record(kind="train", step=3, maxvio_batch=0.1, loads=[[1, 2], [3]]), append=True)),
        ALL,
    ),
    "metrics_wrong_loads_shape": (
        _on("metrics.jsonl", _text(_record(kind="train", step=3, maxvio_batch=0.1, loads=[[1, 2]]), append=True)),
        ALL,
    ),
    "metrics_nan_maxvio": (_on("metrics.jsonl", _text(_record(kind="train", step=3, maxvio_batch="NaN"), append=True)), ALL),
    "metrics_empty": (_on("metrics.jsonl", _text("")), {"plot", "replay", "compare"}),  # resume continues
    "metrics_without_evaluation": (
        _on("metrics.jsonl", lambda p: p.write_bytes(b"".join(ln for ln in p.read_bytes().splitlines(True) if b'"eval"' not in ln))),
        {"compare"},
    ),
    "tb_is_file": (_on("tb", _text("not a folder")), {"resume"}),
    "tb_links_to_file": (_on("tb", _link("config.json")), {"resume"}),
    "tb_is_fifo": (_on("tb", _fifo), {"resume"}),
    "config_is_folder": (_on("config.json", _folder), {"resume"}),
    "config_is_fifo": (_on("config.json", _fifo), {"resume"}),
    "config_links_to_dev_urandom": (_on("config.json", _link("/dev/urandom")), {"resume"}),
    "config_garbage": (_on("config.json", _text(GARBAGE)), {"resume"}),
    "config_null": (_on("config.json", _text("null")), {"resume"}),
    "config_too_big": (_on("config.json", _text(" " * (2**20 + 1) + "{}")), {"resume"}),
    "checkpoint_is_fifo": (_on("checkpoint.pt", _fifo), {"resume", "leakage"}),
    "checkpoint_links_to_dev_zero": (_on("checkpoint.pt", _link("/dev/zero")), {"resume", "leakage"}),
    "checkpoint_truncated": (_on("checkpoint.pt", _half), {"resume", "leakage"}),
    "checkpoint_garbage": (_on("checkpoint.pt", _text(GARBAGE)), {"resume", "leakage"}),
    "checkpoint_is_folder": (_on("checkpoint.pt", _folder), {"resume", "leakage"}),
    "step_file_is_fifo": (lambda run: _folder(run / "checkpoints") or _fifo(run / "checkpoints" / "step_00000001.pt"), {"resume"}),
}


def damage(run: Path, name: str) -> None:
    """Apply the damage ``name`` of :data:`DAMAGES` to the run folder ``run``."""
    DAMAGES[name][0](run)


def checksums(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (``root`` itself included) -> its kind and content: the SHA-256
    of a regular file, the target of a symbolic link, and the kind of anything else (a FIFO or
    device is never opened). Symbolic links are not followed."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            path = Path(folder) / name if name else Path(folder)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                what = "link -> " + os.readlink(path)
            elif stat.S_ISREG(mode):
                what = "file " + hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = "folder" if stat.S_ISDIR(mode) else f"mode {stat.S_IFMT(mode):o}"
            found[str(path.relative_to(root))] = what
    return found
