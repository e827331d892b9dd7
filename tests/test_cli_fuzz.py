"""Property test of the command line (moebalance.cli): random options, config overrides and paths
never end in a traceback, always in a documented exit status, and never leave output behind.

Every generated command either has ``--print-config`` or contains a failure that is met before
any training (a data file with no text, or a value out of range), so each example takes
milliseconds and ``cli.main`` runs in this process, unmocked. The paths include files where
folders are expected, folders where files are expected, a symlink loop, a dangling symlink, a
name longer than the file system allows, a NUL byte, names with undecodable bytes, sizes at the
edge of int64 and of this machine's memory, and garbage, truncated and foreign
checkpoints and run folders (tests run as root, so permission bits cannot make a path
unreadable; these kinds of path are unusable for root as well), a FIFO and a link to /dev/zero,
and one finished run with a copy of it for every damage of tests/run_damage.py (run files that are
folders, FIFOs or links to devices, truncated, garbled, wrong-typed or over-long files): a command
that meets one must neither hang (an alarm fails the example after 30 s) nor change it.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebalance import cli
from moebalance.lab.sweeps import GRIDS
from moebalance.train.checkpoint import MAGIC, CheckpointDir, save_checkpoint
from moebalance.train.config import RunConfig, get_preset
from run_damage import DAMAGES, damage, make_finished_run

EXAMPLES = 1000
KEYS = sorted(f"{s}.{f}" for s, fields in RunConfig().to_dict().items() for f in fields)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder of unusable inputs (see the module docstring); the test runs inside it."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "afile").write_text("not a folder\n")
    (root / "empty.txt").write_text("")
    (root / "adir").mkdir()
    (root / "garbage.pt").write_bytes(os.urandom(256))
    (root / "truncated.pt").write_bytes(MAGIC + b"\x00" * 10)
    save_checkpoint(root / "notdict.pt", [1, 2, 3])
    save_checkpoint(root / "foreign.pt", {"model": {}, "config": {"model": {"d_model": "wide"}}})
    (root / "loop").symlink_to(root / "loop")
    (root / "dangling").symlink_to(root / "nowhere")
    bad_run = root / "bad_run"  # a run folder whose checkpoints are all damaged
    bad_run.mkdir()
    (bad_run / "config.json").write_text(cli.json.dumps(get_preset("smoke").to_dict()))
    CheckpointDir(bad_run / "checkpoints").folder.mkdir()
    (bad_run / "checkpoints" / "step_00000004.pt").write_bytes(b"torn")
    (bad_run / "checkpoint.pt").write_bytes(MAGIC)
    (root / "badjson_run").mkdir()
    (root / "badjson_run" / "config.json").write_text("{not json")
    for name, text in {
        "m_garbage": "\x00\xff garbage\n",
        "m_notdict": "3\n[1, 2]\n",
        "m_missing": '{"kind": "train"}\n',
        "m_badloads": '{"kind": "train", "step": 1, "maxvio_batch": 1.0, "loads": [[1], [2, 3]]}\n',
        "m_empty": "",
    }.items():
        (root / name).mkdir()
        (root / name / "metrics.jsonl").write_text(text)
    (root / "m_isdir" / "metrics.jsonl").mkdir(parents=True)
    os.mkfifo(root / "fifo")
    (root / "devzero").symlink_to("/dev/zero")
    make_finished_run(root / "finished")  # and a damaged copy of it for every damage of run_damage.py
    for name in DAMAGES:
        shutil.copytree(root / "finished", root / f"d_{name}", symlinks=True)
        damage(root / f"d_{name}", name)
    return root


PATHS = [
    "afile", "afile/sub", "afile/sub/deeper", "empty.txt", "adir", "adir/new", "new_out", "new/a/b",
    "garbage.pt", "truncated.pt", "notdict.pt", "foreign.pt", "loop", "loop/x", "dangling", "dangling/x",
    "bad_run", "badjson_run", "m_garbage", "m_notdict", "m_missing", "m_badloads", "m_empty", "m_isdir",
    "x" * 300, "adir/" + "y" * 300, "a\x00b", "", ".", "/", "fifo", "devzero",
    "finished", "finished/checkpoint.pt", "finished/metrics.jsonl",
    *(f"d_{name}" for name in DAMAGES),
    *(f"d_{name}/checkpoint.pt" for name in DAMAGES if name.startswith("checkpoint")),
    # issue 22: names that are not UTF-8 (undecodable bytes), an unknown user's home
    "bad\udcffname", "adir/\udcff", "~nosuchuser_zz/x.txt",
]
# issue 22: sizes at the edge of int64 and of memory (a typo in a size is the common way there)
SIZES = ["65536", "2147483648", str(2**31 - 1), str(2**63 - 1), str(2**63), str(10**30), "1e300", "1e-300"]
paths = st.sampled_from(PATHS)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
values = st.one_of(
    text,
    paths,
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(SIZES),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "none", "null", "loss_free", "aux_loss", "cuda", "cuda:7", "meta", "1e-3", "-0", "0x10"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(["model", "x.y", "model.bogus", "", "a.b.c", ".", "train."]), text)
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)
option = st.one_of(
    st.tuples(st.sampled_from(["--out", "--data", "--resume", "--checkpoint"]), paths),
    st.tuples(st.just("--preset"), st.sampled_from(["smoke", "default", "tiny"])),
    st.tuples(st.sampled_from(["--position", "--trials", "--nproc"]), st.sampled_from(["0", "-1", "1", "7", "10000", "x"])),
    st.tuples(st.just("--ranks"), st.sampled_from(["2,4", "0", "a,b", "", "3", "-2"])),
    st.tuples(st.sampled_from(["--no-progress", "--overwrite", "--bogus", "-x"]), st.none()),
)


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(["train", "compare", "sweep", "leakage", "plot", "replay", "verify"]))
    argv = [command]
    if command == "sweep":
        argv.append(draw(st.sampled_from([*GRIDS, "bogus"])))
    if command in ("plot", "replay", "verify"):
        argv += draw(st.lists(paths, min_size=1, max_size=3))
    for flag, value in draw(st.lists(option, max_size=4)):
        argv += [flag] if value is None else [flag, value]
    argv += draw(overrides)
    if command not in ("plot", "replay", "verify"):
        # Never train: print the config, or carry a failure met before the first step.
        argv += draw(st.sampled_from([["--print-config"], ["--data", "empty.txt"], ["model.top_k=0"]]))
    return argv


def hung(signum, frame):
    raise AssertionError("the command blocked for 30 s")


def tree(root: Path) -> set[tuple[str, int]]:
    """Every path under ``root`` (symlinks not followed) with its size: what a command left."""
    found = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            found.add((str(p.relative_to(root)), 0 if p.is_dir() or p.is_symlink() else p.stat().st_size))
    return found


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=command_lines())
def test_random_command_lines_fail_cleanly(sandbox, capsys, argv):
    before, cwd, threads = tree(sandbox), os.getcwd(), torch.get_num_threads()
    os.chdir(sandbox)  # default output folders (runs/...) land in the sandbox too
    old_handler = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)  # a command that blocks (a FIFO read) fails the example instead of the suite
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors and --help
        code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        os.chdir(cwd)
        torch.set_num_threads(threads)  # train.threads=N sets it before the data fails
    err = capsys.readouterr().err
    assert code in (cli.EXIT_OK, cli.EXIT_USAGE, cli.EXIT_INPUT), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("moebalance") and ": " in ln]
    assert len(lines) == (code != 0), (argv, err)
    if code != 0:  # a command that succeeds (e.g. plot of a run with records) writes its output
        assert tree(sandbox) == before, (argv, "left output behind", tree(sandbox) ^ before)
    else:
        shutil.rmtree(sandbox / "runs", ignore_errors=True)  # the next example starts from the same tree
