"""A failed command never changes a finished run, and every file of a run is read through one
reader (moebalance.train.runfiles) that refuses, by name, what cannot serve: files that are
folders, FIFOs or links to devices (refused without blocking), over-long, not UTF-8, not JSON, or
records of the wrong shape.

One tiny finished run is trained once for the module; every test damages a copy of it
(tests/run_damage.py) and compares the checksums of all its files before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebalance import cli
from moebalance.lab.compare import check_run_folders
from moebalance.lab.runs import RunFolderError
from moebalance.train import runfiles
from moebalance.train.checkpoint import STASH, STASH_MARK, drop_stash, put_back, stash_run
from moebalance.train.config import RunConfig
from moebalance.train.runfiles import RunFileError
from run_damage import DAMAGES, GARBAGE, checksums, damage, make_finished_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return make_finished_run(tmp_path_factory.mktemp("finished") / "run")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad inputs of a command: empty and binary data, a file where the cache folder goes."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.txt").write_text("")
    (root / "garbage.txt").write_bytes(GARBAGE)
    (root / "afile").write_text("not a folder\n")
    return root


@contextmanager
def deadline(seconds: int = 20):
    """Fail (rather than hang the suite) when the body blocks, e.g. on a FIFO."""

    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def copy_run(finished: Path, where: Path, *damages: str) -> Path:
    run = where / "run"
    shutil.copytree(finished, run, symlinks=True)
    for name in damages:
        damage(run, name)
    return run


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    import torch

    threads = torch.get_num_threads()
    try:
        with deadline():
            code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("moebalance")]) == (code != 0), err
    return code, err


# --- the reader --------------------------------------------------------------------------------


def test_reader_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "folder").mkdir()
    with deadline(10):
        for name, kind in [("fifo", "FIFO"), ("zero", "character device"), ("dangling", "leads nowhere"), ("folder", "folder")]:
            with pytest.raises(RunFileError, match=kind) as info:
                runfiles.read_bytes(tmp_path / name)
            assert info.value.path == str(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing"):
        runfiles.read_bytes(tmp_path / "missing")
    with pytest.raises(RunFileError, match="NUL byte"):
        runfiles.read_bytes(f"{tmp_path}/a\x00b")
    with pytest.raises(RunFileError, match="Not a directory"):
        runfiles.read_bytes(tmp_path / "folder" / ".." / "zero" / "x")


def test_reader_bounds_what_it_reads(tmp_path):
    (tmp_path / "config.json").write_text(" " * (runfiles.SIZE_LIMITS["config.json"] + 1))
    with pytest.raises(RunFileError, match=r"config.json' holds 1,048,577 bytes, more than the 1,048,576"):
        runfiles.read_json(tmp_path / "config.json")
    (tmp_path / "small").write_bytes(b"x" * 11)
    with pytest.raises(RunFileError, match="more than the 10"):
        runfiles.read_bytes(tmp_path / "small", limit=10)
    assert runfiles.read_bytes(tmp_path / "small", limit=11) == b"x" * 11


def test_reader_decodes_strictly_and_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "train", "step": 1}\n\xff\n')
    with pytest.raises(RunFileError, match=r"metrics.jsonl' line 2: byte 0xff is not UTF-8"):
        runfiles.read_metrics(path)
    path.write_text("[" * 100_000)
    with pytest.raises(RunFileError, match="nested too deeply"):
        runfiles.read_json(path)


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"kind": "train", "step": "3"}', "has step '3', not an integer"),
        ('{"kind": "train", "step": -1}', "has step -1"),
        ('{"kind": "eval", "step": false}', "has step False"),
        ('{"kind": "other", "step": 1}', "has kind 'other'"),
        ('{"kind": "train", "step": 1, "loss": "low"}', "holds loss='low', not a number"),
        ('{"kind": "train", "step": 1, "loads": [[1, -2]]}', "'loads' that are not a"),
        ('{"kind": "train", "step": 1, "loads": [[1, 2], [3]]}', "'loads' that are not a"),
        ('{"kind": "eval", "step": 1, "loads": [[1, 2, 3]]}', r"'loads' of shape \[1, 3\], other records \[1, 2\]"),
        ("[1, 2]", "is a JSON list, not a record"),
        ('{"kind": "tr', "line 2 is not JSON"),
    ],
)
def test_metrics_lines_that_are_not_records_are_refused_by_number(tmp_path, line, reason):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"kind": "train", "step": 1, "loads": [[1, 2]]}}\n{line}\n{{"kind": "train", "step": 2}}\n')
    with pytest.raises(RunFileError, match=reason):
        runfiles.read_metrics(path)


def test_a_torn_last_metrics_line_is_the_only_one_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tr')  # a kill during the write
    assert runfiles.read_metrics(path) == [{"kind": "train", "step": 1}]
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "step": "x"}')  # complete, but wrong
    with pytest.raises(RunFileError, match="line 2 has step 'x'"):
        runfiles.read_metrics(path)


def test_summary_fields_are_checked(finished, tmp_path):
    from moebalance.train.loop import read_summary

    assert read_summary(finished / "summary.json")["steps"] == 2
    saved = json.loads((finished / "summary.json").read_text())
    for field, value in [("val_ppl", "489"), ("steps", 2.0), ("maxvio_global_per_layer", [0.1, None]), ("steps", None)]:
        (tmp_path / "summary.json").write_text(json.dumps(saved | {field: value}))
        with pytest.raises(RunFileError, match=f"for '{field}'"):
            read_summary(tmp_path / "summary.json")


# --- the commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [["--data", "{inputs}/empty.txt"], ["--data", "{inputs}/garbage.txt"], ["data.cache_dir={inputs}/afile"]])
def test_train_overwrite_with_bad_data_keeps_the_finished_run(finished, inputs, tmp_path, capsys, bad):
    """The old code removed the run's files, then failed on the data (exit 4)."""
    run = copy_run(finished, tmp_path)
    before = checksums(run)
    bad = [b.format(inputs=inputs) for b in bad]
    argv = ["train", "--preset", "smoke", "train.max_steps=2", "train.threads=1", "--out", run, "--overwrite", *bad]
    code, err = run_cli(argv, capsys)
    assert code == 4, err
    assert checksums(run) == before


@pytest.mark.parametrize("name", sorted(n for n, (_, by) in DAMAGES.items() if "resume" in by))
def test_resume_refuses_a_damaged_run_before_writing(finished, tmp_path, capsys, name):
    """The old code rewrote config.json (and, with some damages, trained and wrote) before failing."""
    run = copy_run(finished, tmp_path, name)
    before = checksums(run)
    code, err = run_cli(["train", "--resume", run, "train.max_steps=4", "train.threads=1", "--no-progress"], capsys)
    assert code == 2, err
    assert str(run) in err
    assert checksums(run) == before


def test_resume_of_a_torn_last_metrics_line_continues(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    code, err = run_cli(["train", "--resume", run, "train.max_steps=3", "train.threads=1", "--no-progress"], capsys)
    assert code == 0, err
    assert [r["step"] for r in runfiles.read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.parametrize("command", ["plot", "replay"])
@pytest.mark.parametrize("name", sorted(n for n, (_, by) in DAMAGES.items() if "plot" in by))
def test_plot_and_replay_refuse_damaged_metrics_with_status_2(finished, tmp_path, capsys, command, name):
    """README: a corrupt run folder named on the command line is status 2 (it was 4, 1 or a hang)."""
    run = copy_run(finished, tmp_path, name)
    before = checksums(run)
    code, err = run_cli([command, run] + (["--out", tmp_path / "plots"] if command == "plot" else []), capsys)
    assert code == 2, err
    assert "metrics.jsonl" in err
    assert checksums(run) == before and not (tmp_path / "plots").exists()


@pytest.mark.parametrize("command", ["plot", "replay"])
def test_plot_and_replay_of_an_empty_metrics_file_is_status_2(finished, tmp_path, capsys, command):
    run = copy_run(finished, tmp_path)
    (run / "metrics.jsonl").write_text("")
    code, err = run_cli([command, run] + (["--out", tmp_path / "plots"] if command == "plot" else []), capsys)
    assert code == 2, err


@pytest.mark.parametrize("name", sorted(n for n, (_, by) in DAMAGES.items() if "leakage" in by))
def test_leakage_refuses_a_damaged_checkpoint_by_name(finished, tmp_path, capsys, name):
    run = copy_run(finished, tmp_path, name)
    code, err = run_cli(["leakage", "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "leak"], capsys)
    assert code == 2, err
    assert "checkpoint.pt" in err and not (tmp_path / "leak").exists()


@pytest.mark.parametrize("name", sorted(n for n, (_, by) in DAMAGES.items() if "compare" in by))
def test_compare_refuses_a_damaged_run_it_would_read_back(finished, tmp_path, name):
    """compare / sweep check every run folder before the first run trains: a finished run whose
    summary or metrics cannot be read is refused by name (it was read back at the end: exit 1 or 4)."""
    cfg = RunConfig.from_dict(json.loads((finished / "config.json").read_text()))
    run = copy_run(finished, tmp_path, name)
    before = checksums(run)
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match=str(run)):
            check_run_folders({"run": (cfg, run)}, overwrite)
    assert checksums(run) == before


# --- --overwrite puts the finished run back when the new one fails --------------------------------

SMOKE = ["--preset", "smoke", "train.max_steps=2", "train.threads=1", "--no-progress"]
#: train.lr=1e30 makes the gradient norm NaN at step 2; with stop, the run ends with exit 3.
DIVERGES = ["train.on_nonfinite=stop", "train.lr=1e30"]


def _raise_in_training(monkeypatch, exc_of_step) -> None:
    """Make the loop raise ``exc_of_step(step)`` right after it logged step 1 (metrics, tb and a
    periodic checkpoint of the new run are then on disk); ``None``: no exception at that step."""
    from moebalance.train import loop

    log_step = loop._Run._log_step

    def failing(self, step, *args):
        rec = log_step(self, step, *args)
        exc = exc_of_step(step)
        if exc is not None:
            raise exc
        return rec

    monkeypatch.setattr(loop._Run, "_log_step", failing)


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device", "checkpoint.pt")


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises Terminated at the next bytecode


FAILURES = {
    "diverged": (DIVERGES, None, 3, "train.on_nonfinite=stop"),
    "disk_full": ([], lambda mp: mp.setattr("moebalance.train.loop.save_checkpoint", _no_space), 4, "No space left"),
    "ctrl_c": ([], lambda mp: _raise_in_training(mp, lambda s: KeyboardInterrupt() if s == 1 else None), 130, "interrupted"),
    "sigterm": ([], lambda mp: _raise_in_training(mp, lambda s: _sigterm() if s == 1 else None), 130, "terminated (SIGTERM)"),
    "bug": ([], lambda mp: _raise_in_training(mp, lambda s: RuntimeError("boom") if s == 1 else None), 1, "boom"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_overwrite_that_fails_while_training_puts_the_finished_run_back(finished, tmp_path, capsys, monkeypatch, failure):
    """Issue 22: the old run was removed before training; a divergence, a full disk, Ctrl-C,
    SIGTERM or a bug then lost it. Now the new run's files go, the old run is back byte for byte
    (the user's own files untouched), the exit status is the failure's, and the line says so."""
    extra, patch, status, needle = FAILURES[failure]
    run = copy_run(finished, tmp_path)
    (run / "tb" / "mine.txt").write_text("the user's")
    before = checksums(run)
    if patch is not None:
        patch(monkeypatch)
    code, err = run_cli(["train", *SMOKE, "train.checkpoint_every=1", "--out", run, "--overwrite", *extra], capsys)
    assert code == status, err
    assert needle in err and f"the earlier run in {str(run)!r} was put back as it was" in err, err
    assert checksums(run) == before
    if status == 130:  # never a --resume of the new run, which is gone
        assert "--resume" not in err and "the same command with --overwrite starts over" in err, err


def test_a_completed_overwrite_leaves_no_stash(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    code, err = run_cli(["train", *SMOKE, "train.max_steps=3", "--out", run, "--overwrite"], capsys)
    assert code == 0, err
    assert not os.path.lexists(run / STASH)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def _killed_overwrite(finished: Path, where: Path, monkeypatch, capsys) -> Path:
    """A run folder as an ``--overwrite`` killed with SIGKILL leaves it: the new run's files up to
    its checkpoint of step 2 (of 4) beside the finished run in ``.replaced-run`` (put_back never runs)."""
    from moebalance.train import loop

    run = copy_run(finished, where)
    with monkeypatch.context() as mp:
        mp.setattr(loop, "put_back", lambda run_dir: "killed: nothing put back")
        _raise_in_training(mp, lambda s: KeyboardInterrupt() if s == 2 else None)
        argv = ["train", *SMOKE, "train.max_steps=4", "train.checkpoint_every=2", "--out", run, "--overwrite"]
        code, err = run_cli(argv, capsys)
    assert code == 130 and (run / "checkpoints" / "step_00000002.pt").is_file() and (run / STASH / "summary.json").is_file(), err
    assert checksums(run / STASH) == {**checksums(finished), STASH_MARK: checksums(run / STASH)[STASH_MARK]}
    return run


def test_after_a_killed_overwrite_resume_continues_the_new_run(finished, tmp_path, capsys, monkeypatch):
    run = _killed_overwrite(finished, tmp_path, monkeypatch, capsys)
    code, err = run_cli(["train", *SMOKE, "--out", run], capsys)  # plain --out: refused, the stash named
    assert code == 2 and "already holds a run" in err and f"{str(run / STASH)!r} holds the earlier run" in err, err
    code, err = run_cli(["train", "--resume", run, "train.max_steps=4", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert not os.path.lexists(run / STASH)  # the run that replaced it completed


def test_after_a_killed_overwrite_another_overwrite_keeps_the_finished_stash(finished, tmp_path, capsys, monkeypatch):
    """The stash holds the last finished run: a second --overwrite that fails puts that one back
    (not the unfinished run beside it); one that completes removes it."""
    run = _killed_overwrite(finished, tmp_path, monkeypatch, capsys)
    code, err = run_cli(["train", *SMOKE, "--out", run, "--overwrite", *DIVERGES], capsys)
    assert code == 3 and "was put back as it was" in err, err
    assert checksums(run) == checksums(finished)
    run = _killed_overwrite(finished, tmp_path / "again", monkeypatch, capsys)
    code, err = run_cli(["train", *SMOKE, "--out", run, "--overwrite"], capsys)
    assert code == 0, err
    assert not os.path.lexists(run / STASH) and json.loads((run / "summary.json").read_text())["steps"] == 2


def test_stash_and_put_back_keep_the_layout_and_the_users_files(finished, tmp_path):
    """stash_run moves exactly what clear_run_folder would remove (a symlinked ``checkpoints`` as
    the link, a killed write's temporary file), config.json last; an incomplete stash (a kill
    during the moves) is completed; put_back restores every byte; readers skip the stash."""
    from moebalance.lab.reporting import find_run_dirs

    run = copy_run(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step_00000001.pt").write_bytes(b"x")
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    (run / ".summary.json.a1b2c3d4.tmp").write_text("half")
    (run / "tb" / "mine.txt").write_text("the user's")
    (run / "notes.txt").write_text("the user's")
    before = checksums(run)
    (run / STASH).mkdir()  # a kill after the first move (the mark comes before any move)
    (run / STASH / STASH_MARK).write_text("")
    os.rename(run / "metrics.jsonl", run / STASH / "metrics.jsonl")
    assert stash_run(run) is True
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if STASH not in p.parts) == ["notes.txt", "tb", "tb/mine.txt"]
    assert (run / STASH / "checkpoints").is_symlink() and (run / STASH / ".summary.json.a1b2c3d4.tmp").is_file()
    with pytest.raises(FileNotFoundError, match="holds no metrics.jsonl"):
        find_run_dirs([run])  # the stash is not a run inside it
    (run / "metrics.jsonl").write_text("")  # a new run's partial files
    (run / "config.json").write_text((run / STASH / "config.json").read_text())
    assert put_back(run) == f"the earlier run in {str(run)!r} was put back as it was"
    assert checksums(run) == before and (elsewhere / "step_00000001.pt").is_file()



def _not_our_stash(kind: str, run: Path, other: Path) -> None:
    """Put at ``run/.replaced-run`` what moebalance never made: a file, a symlink to another run, a user's folder."""
    stash = run / STASH
    if kind == "file":
        stash.write_text("the user's")
    elif kind == "symlink":
        stash.symlink_to(other, target_is_directory=True)
    else:
        stash.mkdir()
        (stash / "notes.txt").write_text("the user's")


@pytest.mark.parametrize("kind", ["file", "symlink", "folder"])
def test_overwrite_refuses_a_replaced_run_that_is_not_our_stash(finished, tmp_path, capsys, kind):
    """A ``.replaced-run`` moebalance did not make is refused (exit 2, the path named) before
    anything moves or trains; put_back and drop_stash leave it and the run alone."""
    run = copy_run(finished, tmp_path)
    other = copy_run(finished, tmp_path / "other")
    _not_our_stash(kind, run, other)
    before, before_other = checksums(run), checksums(other)
    for argv in (["train", *SMOKE, "--out", run, "--overwrite"], ["train", *SMOKE, "--out", run]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and f"{str(run / STASH)!r} is a" in err and "move it away" in err, err
    with pytest.raises(ValueError, match="move it away"):
        stash_run(run)
    assert "could not be put back" in put_back(run)
    drop_stash(run)
    assert checksums(run) == before and checksums(other) == before_other
    assert os.path.islink(run / STASH) == (kind == "symlink")


def test_a_stash_that_fails_is_never_put_back(finished, tmp_path, capsys, monkeypatch):
    """A move into the stash that fails: stash_run moves everything back and raises; train()'s
    failure path then never calls put_back (the run stays as it was, no stash left)."""
    from moebalance.train import checkpoint, loop

    run = copy_run(finished, tmp_path)
    before = checksums(run)
    calls = []
    rename = os.rename

    def failing_rename(src, dst):
        if Path(dst).parent.name == STASH and Path(src).name == "summary.json":
            raise OSError(28, "No space left on device", str(src))
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", failing_rename)
    monkeypatch.setattr(loop, "put_back", lambda run_dir: calls.append(run_dir) or "put back")
    code, err = run_cli(["train", *SMOKE, "--out", run, "--overwrite"], capsys)
    assert code == 4 and "No space left on device" in err and calls == [], err
    assert checksums(run) == before and not os.path.lexists(run / STASH)

    def stash_then_fail(run_dir):  # leaves a .replaced-run behind: its name alone never means "put back"
        (Path(run_dir) / STASH).mkdir()
        (Path(run_dir) / STASH / STASH_MARK).write_text("")
        raise OSError(28, "No space left on device", str(run_dir))

    monkeypatch.setattr(loop, "stash_run", stash_then_fail)
    code, err = run_cli(["train", *SMOKE, "--out", run, "--overwrite"], capsys)
    assert code == 4 and calls == [], err


# --- the property ------------------------------------------------------------------------------

#: Damages that leave a finished run resumable (none of those of DAMAGES: each is refused by
#: --resume or concerns a file --resume writes over); --resume then fails on an override.
RESUME_POISON = ["model.top_k=1", "train.max_steps=1", "train.bogus=1"]


@st.composite
def failing_commands(draw) -> tuple[list[str], list[str], set[int]]:
    """``(argv, damages, allowed exit codes)``; in ``argv``, ``{run}`` is the run folder, ``{parent}``
    the folder holding it (named ``loss_free``, as in a compare folder), ``{inputs}`` the bad inputs'."""
    # One damage per file (the name's first word): a second one could repair the first.
    damages = draw(st.lists(st.sampled_from(sorted(DAMAGES)), max_size=3, unique_by=lambda name: name.split("_")[0]))
    kind = draw(st.sampled_from(["resume", "overwrite", "diverge", "out", "plot", "replay", "leakage", "compare"]))
    bad_data = draw(st.sampled_from([["--data", "{inputs}/empty.txt"], ["--data", "{inputs}/garbage.txt"], ["data.cache_dir={inputs}/afile"]]))
    smoke = ["--preset", "smoke", "train.max_steps=2", "train.threads=1", "--no-progress"]
    if kind == "resume":
        refused = any("resume" in DAMAGES[d][1] for d in damages)
        poison = [] if refused else [draw(st.sampled_from(RESUME_POISON))]
        return ["train", "--resume", "{run}", "train.max_steps=4", "train.threads=1", *poison], damages, {2}
    if kind == "diverge":  # an --overwrite that fails while training (2: a damage it refuses first)
        return ["train", *smoke, "--out", "{run}", "--overwrite", *DIVERGES], damages, {2, 3}
    if kind in ("overwrite", "out"):
        return ["train", *smoke, "--out", "{run}", *(["--overwrite"] if kind == "overwrite" else []), *bad_data], damages, {2, 4}
    if kind == "plot":
        return ["plot", "{run}", "--out", "{where}/plots"], damages, {0, 2}
    if kind == "replay":
        return ["replay", "{run}"], damages, {0, 2}
    if kind == "leakage":
        return ["leakage", "--checkpoint", "{run}/checkpoint.pt", "--trials", "0", "--out", "{where}/leak"], damages, {2}
    overwrite = draw(st.booleans())
    return ["compare", *smoke, "--out", "{parent}", *(["--overwrite"] if overwrite else []), *bad_data], damages, {2, 4}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=failing_commands())
def test_failing_commands_never_change_a_finished_run(finished, inputs, capsys, command):
    template, damages, allowed = command
    where = Path(tempfile.mkdtemp())
    try:
        run = copy_run(finished, where / "parent", *damages).rename(where / "parent" / "loss_free")
        argv = [a.format(run=run, parent=run.parent, inputs=inputs, where=where) for a in template]
        before = checksums(run.parent)
        code, err = run_cli(argv, capsys)
        assert code in allowed, (argv, damages, err)
        assert checksums(run.parent) == before, (argv, damages, err)
    finally:
        shutil.rmtree(where, ignore_errors=True)
