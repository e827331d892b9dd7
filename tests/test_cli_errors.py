"""The command line never shows a traceback: one line and a documented exit status per failure
(moebalance.cli), and the 13 cases of issue 14, each checked here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli  # noqa: E402  (tests/)
from moebalance import cli
from moebalance.train.checkpoint import (
    CheckpointDir,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
    write_json,
    write_text,
)
from moebalance.train.config import apply_overrides, get_preset


def latest_training_state(run_dir):
    from moebalance.train.resume import latest_training_state

    return latest_training_state(run_dir)


def preset_config(name, overrides):
    from moebalance.train.config import preset_config

    return preset_config(name, overrides)

TINY = [
    "data.bin_vocab_size=128",
    "model.d_model=32",
    "model.n_heads=2",
    "model.num_experts=4",
    "model.d_expert=32",
    "model.max_seq_len=32",
    "train.seq_len=32",
    "train.batch_size=4",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.eval_every=3",
    "train.eval_tokens=256",
    "train.threads=1",
    "train.tensorboard=false",
]


def error_lines(err: str) -> list[str]:
    """The stderr lines that are not argparse usage or log records."""
    return [ln for ln in err.splitlines() if ln.startswith("moebalance") and ": " in ln and not ln.startswith("usage")]


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tokens.bin"
    np.random.default_rng(0).integers(0, 128, size=20_000, dtype=np.uint16).tofile(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tokens, tmp_path_factory) -> Path:
    """A finished default run (no periodic checkpoints) of a tiny model on 128-token data."""
    from moebalance.train.loop import train

    out = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    train(apply_overrides(get_preset("smoke"), [f"data.path={tokens}", *TINY]), out, progress=False)
    torch.set_num_threads(threads)
    return out


# -- the one place: exit statuses -----------------------------------------------------------------


def test_exit_codes_are_documented_in_help_and_readme(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for status in cli.EXIT_CODES:
        assert f"  {status} " in out
        assert f"| {status} |" in readme, f"README's Command line section lacks exit status {status}"
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert "exit status" in out and "130" in out


def test_an_internal_error_is_one_line_with_status_1(monkeypatch, tmp_path, capsys):
    def boom(args, cfg):
        raise KeyError("surprise")

    monkeypatch.setitem(cli.COMMANDS, "train", boom)
    code, _, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    assert_one_line(err, "internal error", "KeyError", "MOEBALANCE_TRACEBACK")
    assert not (tmp_path / "o").exists()


def test_keyboard_interrupt_is_status_130_and_keeps_a_run_with_records(monkeypatch, tmp_path, capsys):
    def interrupted(args, cfg):
        Path(args.out_dir).mkdir(parents=True)
        (Path(args.out_dir) / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    code, _, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "o")], capsys)
    assert code == 130
    assert_one_line(err, "interrupted")
    assert (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_ctrl_c_during_training_then_resume(tokens, tmp_path):
    """A real SIGINT: status 130, one line that says how to continue, and the resume works."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    args = ["train", "--no-progress", "--preset", "smoke", "--out", str(tmp_path), f"data.path={tokens}", *TINY]
    args += ["train.max_steps=400", "train.checkpoint_every=2"]
    # A shell's background job inherits SIGINT ignored, and Python then installs no handler: reset it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "moebalance", *args], env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list((tmp_path / "checkpoints").glob("step_*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"moebalance train --resume {tmp_path}" in err
    step = latest_training_state(tmp_path)[1]["step"]
    done = subprocess.run(
        [sys.executable, "-m", "moebalance", "train", "--no-progress", "--resume", str(tmp_path), f"train.max_steps={step + 2}"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == step + 2


def test_train_refuses_a_folder_that_holds_a_run(tiny_run, tokens, tmp_path, capsys):
    """``train --out RUN`` over a finished run: exit 2, the run untouched, the way out named;
    ``--overwrite`` removes what the old run wrote (the user's own files stay) and trains anew;
    ``--overwrite`` with ``--resume`` is refused."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    argv = ["train", "--no-progress", "--preset", "smoke", "--out", str(run), f"data.path={tokens}", *TINY]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "already holds a run", f"moebalance train --resume {run}", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    for extra in ([], ["train.max_steps=1"]):  # the conflict is named even where the override is also bad
        code, _, err = run_cli(["train", "--no-progress", "--resume", str(run), "--overwrite", *extra], capsys)
        assert code == 2
        assert_one_line(err, "--overwrite cannot be combined with --resume")
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "step_00099999.pt").write_bytes(b"an old run's checkpoint")
    old_summary = (run / "summary.json").stat().st_mtime_ns
    code, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "checkpoints" / "step_00099999.pt").exists()
    assert (run / "summary.json").stat().st_mtime_ns != old_summary


@pytest.mark.parametrize("overwrite", [False, True])
def test_train_never_clears_a_folder_whose_config_json_is_not_a_run(tokens, tmp_path, capsys, overwrite):
    """``train --out DIR [--overwrite]`` where ``DIR/config.json`` is another tool's file (``--out .``
    in a project folder, ``--out ~``): exit 2 naming the file, and nothing in DIR is touched."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"name": "my-app", "version": 3}')
    (project / "checkpoint.pt").write_bytes(b"someone else's")
    (project / "src.py").write_text("print(1)")
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    argv = ["train", "--no-progress", "--preset", "smoke", "--out", str(project), f"data.path={tokens}", *TINY]
    code, _, err = run_cli(argv + ["--overwrite"] * overwrite, capsys)
    assert code == 2
    assert_one_line(err, "config.json", "is not a moebalance run config", "not touched")
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before


def test_overwrite_removes_only_the_run_and_never_follows_a_symlink(tiny_run, tmp_path):
    """``clear_run_folder`` (what ``--overwrite`` does): the run's files go; in ``checkpoints/``
    and ``tb/`` only the run's own files; a symlinked ``checkpoints`` is unlinked without emptying
    its target; the user's files (also ones named like temporary files) and the folder stay."""
    from moebalance.train.checkpoint import RUN_FILES, RUN_FOLDERS, clear_run_folder

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.pt").write_bytes(b"x")
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    (run / ".summary.json.a1b2c3d4.tmp").write_text("half")  # a killed atomic write of ours
    (run / ".config.json.backup.tmp").write_text("mine")  # not mkstemp's name: the user's
    (run / "tb").mkdir(exist_ok=True)
    (run / "tb" / "events.out.tfevents.1764000000.host.1.0").write_bytes(b"ours")
    (run / "tb" / "mylog").write_text("mine")
    (run / "notes.txt").write_text("mine")
    clear_run_folder(run)
    assert sorted(p.name for p in run.iterdir()) == [".config.json.backup.tmp", "notes.txt", "tb"]
    assert [p.name for p in (run / "tb").iterdir()] == ["mylog"]
    assert (elsewhere / "keep.pt").is_file()
    assert {"config.json", "metrics.jsonl", "summary.json"} <= set(RUN_FILES) and set(RUN_FOLDERS) == {"checkpoints", "tb"}


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda run: (run / "checkpoints").write_text("mine"), "is a file where a run writes a folder"),
        (lambda run: (run / "summary.json").unlink() or (run / "summary.json").mkdir(), "is a folder where a run writes a file"),
        (lambda run: (run / "config.json").write_text('{"model": {}, "balance": {}, "data": {}, "train": {}}'), "is not a moebalance run config"),
        (lambda run: (run / "config.json").write_text("null"), "is not a moebalance run config"),
        (lambda run: (run / "config.json").unlink(), "holds checkpoint.pt, metrics.jsonl, summary.json but no config.json"),
        (lambda run: (run / "checkpoints").mkdir(exist_ok=True) or (run / "checkpoints" / "step_00000004.pt").mkdir(), "step_00000004.pt' is a folder where a run writes a file"),
    ],
)
def test_overwrite_refuses_a_folder_a_run_cannot_be_cleared_into(tiny_run, tokens, tmp_path, capsys, damage, needle):
    """A run's name taken by the other kind of entry, or a config.json with the sections but none
    of a run's fields: exit 2 before anything is removed (the old run used to go first, then the
    new run failed with exit 4)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    damage(run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    argv = ["train", "--no-progress", "--preset", "smoke", "--out", str(run), "--overwrite", f"data.path={tokens}", *TINY]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, needle)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_a_clear_that_fails_part_way_leaves_a_recognisable_run(tiny_run, tmp_path, monkeypatch):
    """``config.json`` is removed last: when another file cannot be removed, the folder still
    holds the run's config, so it is still refused without ``--overwrite`` (never trained over)."""
    from moebalance.train import checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    unlink = Path.unlink

    def failing_unlink(self, missing_ok=False):
        if self.name == "metrics.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.raises(PermissionError):
        checkpoint.clear_run_folder(run)
    assert (run / "config.json").is_file()


@pytest.mark.parametrize(
    "field, value", [("rng", {}), ("rng", 7), ("stats", 5), ("stats", {}), ("model", {"foo.weight": torch.zeros(3)})]
)
def test_resume_from_a_crafted_state_is_one_error_naming_the_file(tiny_run, tmp_path, capsys, field, value):
    """A checkpoint with a valid header and every key, one field of the wrong type or shape: one
    error line naming the checkpoint, never ``internal error`` (exit 1)."""
    from moebalance.train.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = load_checkpoint(run / "checkpoint.pt")
    state[field] = value
    save_checkpoint(run / "checkpoint.pt", state)
    steps = state["config"]["train"]["max_steps"]
    code, _, err = run_cli(["train", "--no-progress", "--resume", str(run), f"train.max_steps={steps + 2}"], capsys)
    assert code in (2, 4), err
    assert "internal error" not in err and "checkpoint.pt" in error_lines(err)[-1]


def test_leakage_of_a_checkpoint_with_foreign_weights_is_one_error(tiny_run, tmp_path, capsys):
    """``leakage --checkpoint`` whose model weights do not fit its own config: one line, not exit 1."""
    from moebalance.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(tiny_run / "checkpoint.pt")
    state["model"] = {k: torch.zeros(3) for k in state["model"]}
    save_checkpoint(tmp_path / "c.pt", state)
    code, _, err = run_cli(["leakage", "--no-progress", "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "L"), "--trials", "1"], capsys)
    assert code in (2, 4), err
    assert_one_line(err, "model weights do not fit")


def test_nproc_with_bad_data_is_one_error_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    """``--nproc N`` checks the data in the launching process: one line, exit 4, and torchrun never
    runs (it used to start N workers whose peers then died with gloo errors, exit 1)."""
    (tmp_path / "empty.txt").write_text("")
    launched = []
    monkeypatch.setattr("moebalance.parallel.process.launch", lambda *a: launched.append(a) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--nproc", "3", "--preset", "smoke", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "empty.txt")]
    code, _, err = run_cli(argv, capsys)
    assert code == 4 and not launched
    assert_one_line(err, "the corpus is empty")
    assert not (tmp_path / "o").exists()


# -- items 1 and 2: a file where a folder is expected ------------------------------------------------


def test_1_out_below_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "afile" / "sub")], capsys)
    assert code == 2
    assert_one_line(err, "--out", "afile", "is a file, not a folder")


@pytest.mark.parametrize("how", ["config", "env"])
def test_2_cache_dir_is_a_file(tmp_path, monkeypatch, capsys, how):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["train", "--preset", "smoke", "--out", str(tmp_path / "o"), "--no-progress", "train.threads=1"]
    if how == "config":
        argv.append(f"data.cache_dir={afile}")
    else:
        monkeypatch.setenv("MOEBALANCE_CACHE", str(afile))
    code, _, err = run_cli(argv, capsys)
    assert code == 4
    assert_one_line(err, "data.cache_dir" if how == "config" else "MOEBALANCE_CACHE", "is a file, not a folder")
    assert not (tmp_path / "o").exists()


# -- items 3 and 4: leakage of a checkpoint of another model ---------------------------------------


def test_3_leakage_rebuilds_the_model_of_the_checkpoint(tiny_run, tmp_path, capsys):
    # The command's preset (default) has another model, vocabulary and sequence length.
    code, out, err = run_cli(["leakage", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--out", str(tmp_path), "--trials", "1"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "leakage.json").read_text())
    trained = load_checkpoint(tiny_run / "checkpoint.pt")["config"]
    assert saved["config"]["model"] == {**trained["model"], "routing": "topk"}
    assert saved["seq_len"] == 32 and saved["loss_free"] == 0.0


def test_3_leakage_names_a_checkpoint_that_is_no_training_state(tmp_path, capsys):
    save_checkpoint(tmp_path / "other.pt", {"weights": torch.zeros(3)})
    code, _, err = run_cli(["leakage", "--checkpoint", str(tmp_path / "other.pt")], capsys)
    assert code == 2
    assert_one_line(err, "not a moebalance training checkpoint")


def test_4_leakage_refuses_overrides_the_checkpoint_would_ignore(tiny_run, capsys):
    ckpt = str(tiny_run / "checkpoint.pt")
    code, _, err = run_cli(["leakage", "--checkpoint", ckpt, "model.num_experts=16"], capsys)
    assert code == 2
    assert_one_line(err, "model.num_experts", "would be ignored")
    code, _, err = run_cli(["leakage", "--checkpoint", ckpt, "--preset", "smoke"], capsys)
    assert code == 2
    assert_one_line(err, "--preset cannot be combined with --checkpoint")
    code, out, _ = run_cli(["leakage", "--checkpoint", ckpt, "train.seq_len=16", "--print-config"], capsys)
    assert code == 0 and json.loads(out)["train"]["seq_len"] == 16  # a measurement setting may change


# -- item 5: replay a compare folder ----------------------------------------------------------------


def test_5_replay_accepts_a_compare_folder(tiny_run, tmp_path, capsys):
    for name in ("loss_free", "aux_loss"):
        (tmp_path / "cmp" / name).mkdir(parents=True)
        shutil.copy(tiny_run / "metrics.jsonl", tmp_path / "cmp" / name / "metrics.jsonl")
    code, out, err = run_cli(["replay", str(tmp_path / "cmp"), "--ranks", "2,4"], capsys)
    assert code == 0, err
    assert "| loss_free | 2 |" in out and "| aux_loss | 4 |" in out


# -- item 6: resume or extend a default run from its final checkpoint ----------------------------


def test_6_extend_a_finished_default_run(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "metrics.jsonl").read_text().splitlines()
    code, _, err = run_cli(["train", "--resume", str(run), "--no-progress", "train.max_steps=8"], capsys)
    assert code == 0, err
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before
    assert [json.loads(x)["step"] for x in after[len(before) :] if json.loads(x)["kind"] == "train"] == [7, 8]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 8


def test_6_resume_below_the_checkpoint_step_says_what_to_raise(tiny_run, capsys):
    code, _, err = run_cli(["train", "--resume", str(tiny_run), "train.max_steps=3"], capsys)
    assert code == 2
    assert_one_line(err, "train.max_steps=3 is below step 6", "train.max_steps=12")


def _state(step: int) -> dict:
    return {"version": 1, "step": step, "rng": {}, "config": {}}


def test_6_latest_state_takes_the_later_of_final_and_periodic(tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints")
    save_checkpoint(tmp_path / "checkpoint.pt", _state(30))  # a finished run, since extended ...
    ckpts.save(40, _state(40))  # ... and interrupted after step 40
    assert latest_training_state(tmp_path)[1]["step"] == 40
    ckpts.save(50, _state(50))
    (ckpts.path_for(50)).write_bytes(b"torn")  # the newest is damaged: the next newest wins
    path, state = latest_training_state(tmp_path)
    assert state["step"] == 40 and path == ckpts.path_for(40)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="no usable checkpoint"):
        latest_training_state(tmp_path)
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="neither checkpoint.pt nor"):
        latest_training_state(tmp_path)


# -- item 7: a data error leaves no folder behind ----------------------------------------------


def test_7_data_error_leaves_no_out_folder(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "new" / "run"
    code, _, err = run_cli(["train", "--preset", "smoke", "--data", str(empty), "--out", str(out), "train.threads=1"], capsys)
    assert code == 4
    assert_one_line(err, "corpus is empty")
    assert not (tmp_path / "new").exists()


def test_7_a_folder_that_existed_is_kept(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "mine").mkdir()
    code, _, _ = run_cli(["train", "--preset", "smoke", "--data", str(empty), "--out", str(tmp_path / "mine"), "train.threads=1"], capsys)
    assert code == 4 and (tmp_path / "mine").is_dir()


# -- item 8: the user's umask for every file ----------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_8_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.md", "x")
        save_checkpoint(tmp_path / "c.pt", {"x": 1})
        atomic_write_bytes(tmp_path / "d.png", b"png")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_8_a_run_writes_no_private_files(tiny_run):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tiny_run.iterdir() if p.is_file()}
    assert {"checkpoint.pt", "summary.json", "config.json", "metrics.jsonl"} <= set(modes)
    assert len(set(modes.values())) == 1, modes


# -- items 9 and 10: config errors -------------------------------------------------------------------


def test_9_config_error_prints_the_subcommand_usage(capsys):
    code, _, err = run_cli(["train", "--preset", "smoke", "model.top_k=0"], capsys)
    assert code == 2
    assert err.startswith("usage: moebalance train ")
    assert_one_line(err, "moebalance train: error: model.top_k")


def test_10_a_short_run_clamps_the_preset_warmup(capsys):
    code, out, err = run_cli(["train", "--preset", "smoke", "train.max_steps=2", "--print-config"], capsys)
    assert code == 0, err
    assert json.loads(out)["train"]["warmup_steps"] == 2
    assert preset_config("smoke", ["train.max_steps=20"]).train.warmup_steps == 5  # longer runs keep it
    code, _, err = run_cli(["train", "--preset", "smoke", "train.max_steps=2", "train.warmup_steps=5"], capsys)
    assert code == 2  # a warm-up given explicitly is checked as given
    assert_one_line(err, "train.warmup_steps")


# -- item 11: plot titles and tick labels ---------------------------------------------------------


def _fake_run(path: Path, steps: int, vio: float) -> Path:
    path.mkdir(parents=True)
    recs = [{"kind": "train", "step": s, "maxvio_batch": vio + 0.1 * s} for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("steps,note", [(5, None), (500, "moving average over 10 steps")])
def test_11_maxvio_plot_title_and_plain_tick_labels(tmp_path, monkeypatch, steps, note):
    from moebalance.lab import reporting

    seen = {}

    def capture(fig, path):
        fig.canvas.draw()
        ax = fig.axes[0]
        seen["title"] = ax.get_title()
        seen["labels"] = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]

    monkeypatch.setattr(reporting, "_save", capture)
    reporting.plot_maxvio_batch({"a": _fake_run(tmp_path / "a", steps, 2.5)}, tmp_path / "x.png")
    assert "1 steps" not in seen["title"]
    assert (note in seen["title"]) if note else ("moving average" not in seen["title"])
    assert seen["labels"], "no tick labels"
    assert all(label.replace(".", "", 1).isdigit() for label in seen["labels"]), seen["labels"]


# -- item 12: no FutureWarning from DDP ---------------------------------------------------------------


def test_12_data_parallel_wrapper_warns_nothing():
    import torch.distributed as dist

    from moebalance.parallel import DistContext, wrap_data_parallel
    from moebalance.train.model import MoETransformer

    cfg = apply_overrides(get_preset("smoke"), TINY[1:])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped = wrap_data_parallel(MoETransformer(cfg.model, cfg.balance), DistContext(world_size=2))
        assert type(wrapped).__name__ == "DistributedDataParallel"
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
        assert wrapped.forward_sync_buffers is False  # rank-local load counters are never overwritten
    finally:
        dist.destroy_process_group()


# -- compare --seeds: a command-line error, found before any data is prepared ---------------------


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--seeds", "0"], "--seeds must be an integer in [1, 1000], got 0"),
        (["--seeds", "-3"], "--seeds must be an integer in [1, 1000], got -3"),
        (["--seeds", "1000000000"], "--seeds must be an integer in [1, 1000], got 1000000000"),
        (["--seeds", "2", f"train.seed={2**63 - 1}"], "--seeds 2 from train.seed=9223372036854775807"),
    ],
)
def test_compare_bad_seeds_is_status_2_before_the_data(tmp_path, monkeypatch, capsys, extra, needle):
    from moebalance.lab import compare

    monkeypatch.setattr(compare, "prepare_data", lambda cfg: pytest.fail("data prepared before --seeds was checked"))
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", "--preset", "smoke", "--out", str(out), *extra], capsys)
    assert code == 2, err
    assert err.startswith("usage: moebalance compare ")
    assert_one_line(err, needle)
    assert not out.exists()


# -- compare / sweep: an override that a run would replace is refused, not silently dropped -------


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["compare", "balance.strategy=loss_free"], "run 'aux_loss' sets balance.strategy=aux_loss"),
        (["sweep", "update-rate", "balance.bias_update_rate=0.5"], "run 'loss_free_u_1e-4' sets balance.bias_update_rate=1e-4"),
        (["sweep", "alpha", "balance.aux_loss_coeff=0.5"], "run 'aux_alpha_0' sets balance.aux_loss_coeff=0"),
        (["sweep", "variants", "model.score_func=softmax", "balance.strategy=aux_loss"], "balance.strategy=loss_free"),
    ],
)
def test_an_override_a_run_replaces_is_status_2(tmp_path, monkeypatch, capsys, argv, needle):
    from moebalance.lab import compare

    monkeypatch.setattr(compare, "prepare_data", lambda cfg: pytest.fail("data prepared before the overrides were checked"))
    out = tmp_path / "out"
    code, _, err = run_cli([*argv[:2 if argv[0] == "sweep" else 1], "--preset", "smoke", "--out", str(out), *argv[2 if argv[0] == "sweep" else 1 :]], capsys)
    assert code == 2, err
    assert_one_line(err, needle)
    assert not out.exists()


def test_an_override_a_run_sets_to_the_same_value_is_kept(tmp_path, monkeypatch, capsys):
    # strategies: loss_free_z_loss sets the z-loss to 1e-3; the same value on every run replaces nothing.
    code, out, err = run_cli(["sweep", "strategies", "--preset", "smoke", "--print-config", "balance.z_loss_coeff=1e-3"], capsys)
    assert code == 0, err
    assert json.loads(out)["balance"]["z_loss_coeff"] == 1e-3
