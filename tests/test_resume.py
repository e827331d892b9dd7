"""Exact resume, crash-safe checkpoints and SIGKILL recovery (moebalance.train.checkpoint, moebalance.train.resume).

Every run here is the smoke preset shrunk further, on random tokens in a ``.bin`` file, one thread.
The reference is a run that was never interrupted; a stopped-and-resumed run must match it bit for
bit: final weights, expert biases, optimizer state and every logged loss.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moebalance.train.loop as train_mod
from moebalance.train.checkpoint import FAULT_ENV, CheckpointDir, load_checkpoint, save_checkpoint
from moebalance.train.config import apply_overrides, get_preset
from moebalance.train.loop import train
from moebalance.train.resume import STATE_VERSION, latest_training_state

STEPS, EVERY = 12, 4
TINY = [
    "data.bin_vocab_size=128",
    "model.d_model=32",
    "model.n_heads=2",
    "model.num_experts=4",
    "model.d_expert=32",
    "model.max_seq_len=32",
    "train.seq_len=32",
    "train.batch_size=4",
    f"train.max_steps={STEPS}",
    "train.warmup_steps=2",
    "train.eval_every=6",
    "train.eval_tokens=256",
    "train.threads=1",
    f"train.checkpoint_every={EVERY}",
    "train.keep_checkpoints=2",
    "train.tensorboard=false",
]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tokens.bin"
    np.random.default_rng(0).integers(0, 128, size=20_000, dtype=np.uint16).tofile(path)
    return path


def tiny_cfg(tokens: Path, *extra: str):
    return apply_overrides(get_preset("smoke"), [f"data.path={tokens}", *TINY, *extra])


def run_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (which no two runs share)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("tokens_per_s", None)
    return recs


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), f"{k} differs"
    assert any("expert_bias" in k for k in sa["model"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), f"optimizer state {k} differs"
    assert sa["scheduler"] == sb["scheduler"]
    assert torch.equal(sa["rng"]["data"], sb["rng"]["data"])
    ra, rb = run_records(a), run_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert ra == rb  # losses, loads, biases, lr, grad norms, evaluations: exactly equal


@pytest.fixture(scope="module")
def straight(tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    train(tiny_cfg(tokens), out, progress=False)
    return out


class Crash(Exception):
    pass


def crash_at_batch(monkeypatch, n: int) -> None:
    """Make the ``n``-th training batch draw raise, as if the process died there."""
    calls = {"n": 0}
    real = train_mod.sample_batch

    def sample(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"batch {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "sample_batch", sample)


@pytest.mark.parametrize("crash_step", [5, 8, 11])
def test_resume_is_bit_identical(tokens, straight, tmp_path, monkeypatch, crash_step):
    cfg = tiny_cfg(tokens)
    crash_at_batch(monkeypatch, crash_step)  # dies while drawing the batch of step `crash_step`
    with pytest.raises(Crash):
        train(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    steps = CheckpointDir(tmp_path / "checkpoints").steps()
    assert steps[-1] == (crash_step - 1) // EVERY * EVERY  # lost: only the steps after it
    train(tiny_cfg(tokens), tmp_path, progress=False, resume=True)
    assert_same_run(straight, tmp_path)


def test_resume_with_grad_accum_aux_loss_and_recompute(tokens, tmp_path, monkeypatch):
    extra = [
        "train.grad_accum=2",
        "balance.strategy=aux_loss",
        "balance.z_loss_coeff=1e-3",
        "model.activation_checkpointing=true",
        "train.tensorboard=true",
    ]
    ref = tmp_path / "ref"
    train(tiny_cfg(tokens, *extra), ref, progress=False)
    crash_at_batch(monkeypatch, 2 * 6 + 1)  # first micro-batch of step 7
    with pytest.raises(Crash):
        train(tiny_cfg(tokens, *extra), tmp_path / "run", progress=False)
    monkeypatch.undo()
    train(tiny_cfg(tokens, *extra), tmp_path / "run", progress=False, resume=True)
    assert_same_run(ref, tmp_path / "run")
    assert len(list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))) == 2  # TensorBoard continues


def test_a_finished_run_keeps_one_copy_of_its_final_state(straight):
    # Issue 22: checkpoints/step_<max_steps>.pt was a byte-identical copy of checkpoint.pt.
    assert CheckpointDir(straight / "checkpoints").steps() == [EVERY, 2 * EVERY]
    assert latest_training_state(straight)[0] == straight / "checkpoint.pt"


def test_resume_a_finished_run_with_more_steps(tokens, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    result = train(tiny_cfg(tokens, "train.max_steps=16"), run, progress=False, resume=True)
    assert result.steps == 16
    steps = [r["step"] for r in run_records(run) if r["kind"] == "train"]
    assert steps == list(range(1, 17))
    assert run_records(run)[: len(run_records(straight))] == run_records(straight)


def test_resume_falls_back_past_a_corrupt_checkpoint(tokens, straight, tmp_path, monkeypatch, caplog):
    crash_at_batch(monkeypatch, 10)
    with pytest.raises(Crash):
        train(tiny_cfg(tokens), tmp_path, progress=False)
    monkeypatch.undo()
    newest = CheckpointDir(tmp_path / "checkpoints").path_for(8)
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one flipped bit that torch.load alone would not notice
    newest.write_bytes(bytes(blob))
    train(tiny_cfg(tokens), tmp_path, progress=False, resume=True)
    assert f"checkpoint {newest} is corrupt" in caplog.text
    assert_same_run(straight, tmp_path)


def test_resume_refuses_other_config_other_data_and_no_checkpoint(tokens, straight, tmp_path):
    saved_config = (straight / "config.json").read_text()
    with pytest.raises(ValueError, match=r"model.d_expert"):
        train(tiny_cfg(tokens, "model.d_expert=16"), straight, progress=False, resume=True)
    other = tmp_path / "other.bin"
    np.random.default_rng(1).integers(0, 128, size=20_000, dtype=np.uint16).tofile(other)
    cfg = tiny_cfg(tokens)
    cfg.data.path = str(other)
    with pytest.raises(ValueError, match="fingerprint"):
        train(cfg, straight, progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_cfg(tokens), tmp_path / "empty", progress=False, resume=True)
    with pytest.raises(ValueError, match="train.max_steps=2 is below step"):
        train(tiny_cfg(tokens, "train.max_steps=2"), straight, progress=False, resume=True)
    assert (straight / "config.json").read_text() == saved_config  # a refused resume changes nothing


# --- checkpoint files -------------------------------------------------------------------------


def test_checkpoint_roundtrip_truncation_and_corruption(tmp_path):
    path = tmp_path / "c.pt"
    state = {"w": torch.randn(50), "step": 3}
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3
    blob = path.read_bytes()
    for n in (10, 60, len(blob) - 1):
        path.write_bytes(blob[:n])
        with pytest.raises(ValueError, match=rf"checkpoint {path} is truncated"):
            load_checkpoint(path)
    flipped = bytearray(blob)
    flipped[-40] ^= 0x80
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=rf"checkpoint {path} is corrupt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_plain_torch_save_files_still_load(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt")
    assert torch.equal(load_checkpoint(tmp_path / "old.pt")["a"], torch.ones(2))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


class _RunsCode:
    """Unpickling this object calls ``Path.touch`` on a marker: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    """Checkpoints are read with ``weights_only=True``: a pickled object other than tensors and
    plain data is refused (with a verified digest too), and its code never runs."""
    marker = tmp_path / "ran"
    for path, write in ((tmp_path / "ours.pt", save_checkpoint), (tmp_path / "plain.pt", lambda p, s: torch.save(s, p))):
        write(path, {"model": {}, "payload": _RunsCode(marker)})
        with pytest.raises(ValueError, match=rf"checkpoint {path} holds objects other than tensors and plain data \(the first: \S+\); refused"):
            load_checkpoint(path)
        assert not marker.exists()


class _CallsSystem:
    """The classic malicious pickle: ``os.system`` (a module torch blocks with another message)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refusals_and_damage_are_named_without_torchs_advice_to_load_unsafely(tmp_path):
    """``os.system`` is named as a disallowed global (not called corrupt); an empty file and a raw
    pickle get a reason; no message repeats torch's 'weights_only set to False' advice."""
    import pickle

    marker = tmp_path / "ran"
    save_checkpoint(tmp_path / "evil.pt", {"x": _CallsSystem(marker)})
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    expected = {"evil.pt": r"holds objects other than tensors and plain data \(the first: \w+\.system\); refused",
                "empty.pt": r"is truncated or corrupt: \S", "raw.pt": r"is truncated or corrupt: \S"}
    for name, pattern in expected.items():
        with pytest.raises(ValueError, match=pattern) as info:
            load_checkpoint(tmp_path / name)
        assert "False" not in str(info.value) and len(str(info.value)) < 300
    assert not marker.exists()


def test_a_state_that_does_not_fit_the_model_is_a_clear_error(tmp_path):
    """A crafted checkpoint with the right version and keys but foreign weights: ``ValueError``
    naming the checkpoint (one line from ``train --resume``), not an internal ``RuntimeError``."""
    from moebalance.train.resume import restore_state

    model = torch.nn.Linear(2, 2)
    config = {"train": {"max_steps": 5}}
    state = {"version": STATE_VERSION, "rng": {}, "step": 1, "config": config, "data_fingerprint": "f",
             "model": {"bogus": 1}, "load_counts": [], "optimizer": {}, "scheduler": {}, "stats": {}}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match="crafted.pt does not fit this run's model, optimizer and state: RuntimeError"):
        restore_state(state, model=model, optimizer=opt, scheduler=scheduler, data_gen=torch.Generator(),
                      config=config, data_fingerprint="f", source="crafted.pt")


def test_checkpoint_dir_keeps_a_users_file_named_like_a_temporary_one(tmp_path):
    """``CheckpointDir.save`` removes only the temporary files of its own killed writes."""
    ckpts = CheckpointDir(tmp_path, keep=2)
    (tmp_path / ".step_mine.tmp").write_text("mine")
    (tmp_path / ".step_00000003.pt.a1b2c3d4.tmp").write_bytes(b"half")
    ckpts.save(5, {"step": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_mine.tmp", "step_00000005.pt"]


def test_numpy_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    """NumPy's RNG state is kept in plain types (its key as a list), loads with
    ``weights_only=True`` and restores the generator exactly (the resume tests above do the same
    for whole runs, bit for bit)."""
    from moebalance.train.resume import _numpy_state, _set_numpy_state

    np.random.seed(7)
    state = _numpy_state()
    save_checkpoint(tmp_path / "s.pt", {"numpy": state})
    expected = np.random.random(5)
    np.random.seed(0)
    _set_numpy_state(load_checkpoint(tmp_path / "s.pt")["numpy"])
    assert np.array_equal(np.random.random(5), expected)


def test_checkpoint_dir_keeps_last_n_and_falls_back(tmp_path, caplog):
    ckpts = CheckpointDir(tmp_path, keep=2)
    for step in (5, 10, 15):
        ckpts.save(step, {"step": step})
    assert ckpts.steps() == [10, 15]
    (tmp_path / ".step_00000020.pt.abc.tmp").write_bytes(b"half")  # a killed write
    assert ckpts.steps() == [10, 15]
    ckpts.path_for(15).write_bytes(ckpts.path_for(15).read_bytes()[:-7])
    path, state = ckpts.load_latest()
    assert path == ckpts.path_for(10) and state["step"] == 10
    assert "truncated" in caplog.text
    ckpts.path_for(10).write_bytes(b"")
    with pytest.raises(ValueError, match="no usable checkpoint"):
        ckpts.load_latest()
    with pytest.raises(ValueError, match="keep_checkpoints"):
        CheckpointDir(tmp_path, keep=0)


# --- real processes killed with SIGKILL --------------------------------------------------------


def cli(out: Path, tokens: Path, *extra: str, resume: bool = False, env_extra: dict | None = None):
    args = ["--resume", str(out)] if resume else ["--out", str(out), "--preset", "smoke", "--data", str(tokens), *TINY, *extra]
    env = {**os.environ, "PYTHONPATH": SRC, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "moebalance", "train", "--no-progress", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tokens, tmp_path):
    steps = 24
    ref = tmp_path / "ref"
    train(tiny_cfg(tokens, f"train.max_steps={steps}"), ref, progress=False)
    run = tmp_path / "run"
    proc = cli(run, tokens, f"train.max_steps={steps}")
    ckpts = CheckpointDir(run / "checkpoints")
    deadline = time.monotonic() + 120
    while not ckpts.steps() or ckpts.steps()[-1] < 8:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "checkpoint.pt").exists()  # really killed before the end
    last = ckpts.steps()[-1]
    assert last < steps
    resumed = cli(run, tokens, resume=True)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert f"resumed from {ckpts.path_for(last)} after step {last}" in resumed.stderr.read()
    assert_same_run(ref, run)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(tokens, straight, tmp_path):
    proc = cli(tmp_path, tokens, env_extra={FAULT_ENV: "8"})  # dies half-way through writing step 8
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read()
    ckpts = CheckpointDir(tmp_path / "checkpoints")
    assert ckpts.steps() == [4]
    torn = list((tmp_path / "checkpoints").glob(".step_00000008.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    resumed = cli(tmp_path, tokens, resume=True)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert ckpts.steps() == [4, 8]  # the final state (step 12) is checkpoint.pt only
    assert_same_run(straight, tmp_path)


def test_cli_resume_rejects_changed_keys_and_preset(tokens, straight, capsys):
    from moebalance.cli import main

    assert main(["train", "--resume", str(straight), "model.top_k=1"]) == 2
    assert "cannot change on resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(straight), "--preset", "smoke"]) == 2
    assert "--preset cannot be combined with --resume" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", "[]", '{"model": 3}', '{"train": {"lr": "fast"}}'])
def test_cli_resume_names_a_malformed_config_json(tmp_path, capsys, text):
    from moebalance.cli import main

    (tmp_path / "config.json").write_text(text)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"config.json'? is not (a moebalance run config|valid JSON)", err) and "Traceback" not in err
