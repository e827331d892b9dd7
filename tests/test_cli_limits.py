"""Issue 22 ("Internal errors" and "Wrong status or silently ignored"): sizes at the edge of int64
and of memory, count options, paths that cannot be names, worker failures under --nproc, Ctrl-C
while torch imports, SIGTERM and a closed stdout pipe. Each test fails on the code before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli  # noqa: E402  (tests/)
from moebalance import cli
from moebalance.train.config import apply_overrides, cuda_assumed, get_preset
from moebalance.train.footprint import available_bytes, check_fits, describe, estimate

ROOT = Path(__file__).resolve().parents[1]
HUGE = str(10**30)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("moebalance") and not ln.startswith("usage")]
    assert len(lines) == 1, err
    return lines[0]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- sizes: refused from the config, before anything is built -------------------------------------


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.d_model=65536", "model.d_model"),
        ("model.num_experts=2147483648", "model.num_experts"),
        (f"model.n_layers={HUGE}", "model.n_layers"),
        (f"model.num_shared_experts={HUGE}", "model.num_shared_experts"),
        (f"model.max_seq_len={HUGE}", "model.max_seq_len"),
        (f"model.d_expert={2**63 - 1}", "model.d_expert"),
        (f"train.batch_size={HUGE}", "train.batch_size"),
    ],
)
@pytest.mark.parametrize("command", ["train", "compare", "leakage"])
def test_a_size_that_cannot_fit_is_status_2_naming_the_field(override, field, command, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, command, lambda args, cfg: pytest.fail("the work started"))
    start = time.perf_counter()
    code, _, err = run_cli([command, "--preset", "smoke", "--out", str(tmp_path / "o"), override], capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert "needs at least" in line and field in line and "this machine has" in line, line
    assert time.perf_counter() - start < 10  # model.n_layers=10**30 took 55 s to fail
    assert not (tmp_path / "o").exists()


def test_the_estimate_counts_the_presets_and_lets_them_through():
    with cuda_assumed():
        paper = {name: estimate(get_preset(name)) for name in ("paper-1b", "paper-3b")}
    # The parameter counts the presets' docstrings state (1.02e9 and 3.00e9).
    assert round(paper["paper-1b"].parameters / 1e9, 2) == 1.02
    assert round(paper["paper-3b"].parameters / 1e9, 2) == 3.00
    assert all(fp.total_bytes < 80e9 for fp in paper.values())  # they are sized for 80 GB GPUs
    for name in ("default", "smoke"):
        assert check_fits(get_preset(name)).total_bytes < 1e9
    assert available_bytes("cpu") > 0


def test_the_estimate_follows_expert_parallelism_and_ranks_on_the_cpu():
    cfg = apply_overrides(get_preset("smoke"), ["train.expert_parallel=true"])
    assert estimate(cfg, world_size=4).parameters < estimate(cfg, world_size=1).parameters
    have = available_bytes("cpu")
    per_rank = estimate(get_preset("smoke")).total_bytes
    ranks = have // per_rank + 1
    with pytest.raises(ValueError, match=rf"per rank, x{ranks} ranks"):
        check_fits(get_preset("smoke"), world_size=ranks)


def test_an_allocation_failure_at_work_is_status_4_with_the_estimate(tmp_path, monkeypatch, capsys):
    def allocate(args, cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 51539607552 bytes")

    monkeypatch.setitem(cli.COMMANDS, "train", allocate)
    code, _, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "o")], capsys)
    assert code == 4, err
    line = one_error_line(err)
    assert "out of memory" in line and describe(estimate(get_preset("smoke"))).split(" (")[0] in line
    assert not (tmp_path / "o").exists()


def test_an_other_runtime_error_is_still_an_internal_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args, cfg: (_ for _ in ()).throw(RuntimeError("a bug")))
    code, _, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "internal error" in one_error_line(err)


# -- count options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["leakage", "--preset", "smoke", "--trials", "99999999999999999999"], "--trials: must be in [1, 10000]"),
        (["leakage", "--preset", "smoke", "--position", "99999999999999999999"], "--position: must be in [0, 2147483648]"),
        (["train", "--preset", "smoke", "--nproc", "99999999999999999999"], "--nproc: must be in [1, 1024]"),
        (["train", "--preset", "smoke", "--nproc", "0"], "--nproc: must be in [1, 1024]"),
        (["replay", "RUN", "--ranks", "2,99999999999999999999"], "--ranks: each must be in [1, 1048576]"),
    ],
)
def test_every_count_option_has_a_range(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "config.json").write_text(json.dumps(get_preset("smoke").to_dict()))
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err


# -- paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [["data.path=~nosuchuser_zz/x.txt"], ["--data", "~nosuchuser_zz/x.txt"]])
def test_an_unknown_user_in_a_path_is_status_2_naming_it(how, tmp_path, capsys):
    code, _, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "o"), *how], capsys)
    assert code == 2, err
    assert "'~nosuchuser_zz/x.txt'" in one_error_line(err)


@pytest.mark.parametrize("flag", ["--out", "--data"])
def test_a_name_with_undecodable_bytes_is_status_2_naming_it(flag, tmp_path, capsys):
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xff")
    code, _, err = run_cli(["train", "--preset", "smoke", "train.max_steps=2", flag, name], capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert flag in line and "not valid UTF-8" in line and "r\\xff" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["train", "--preset", "smoke", "--data", ""], ["train", "--resume", ""], ["compare", "--out", " "]])
def test_an_empty_path_option_is_refused_not_ignored(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "is empty" in one_error_line(err)
    assert os.listdir(tmp_path) == []


# -- sweep: an override that contradicts a run's name ----------------------------------------------


@pytest.mark.parametrize(
    "override,run",
    [("model.score_func=softmax", "sign_additive_sigmoid"), ("balance.bias_update=error", "sign_additive_sigmoid"), ("balance.bias_mode=multiplicative", "sign_additive_sigmoid")],
)
def test_sweep_variants_refuses_an_override_its_run_names_contradict(override, run, tmp_path, monkeypatch, capsys):
    from moebalance.lab import compare

    monkeypatch.setattr(compare, "prepare_data", lambda cfg: pytest.fail("data prepared"))
    code, _, err = run_cli(["sweep", "variants", "--preset", "smoke", "--out", str(tmp_path / "s"), override], capsys)
    assert code == 2, err
    assert f"run {run!r} sets" in one_error_line(err)


def test_sweep_variants_runs_are_the_configs_they_were():
    from moebalance.lab.sweeps import grid_runs

    base = get_preset("smoke")
    runs = {name: apply_overrides(base, o) for name, o in grid_runs("variants", base).items()}
    assert runs["sign_additive_sigmoid"] == apply_overrides(base, ["balance.strategy=loss_free"])
    assert runs["softmax_gate"].model.score_func == "softmax" and runs["error_update"].balance.bias_update == "error"
    assert runs["multiplicative_bias"].balance.bias_mode == "multiplicative" and runs["multiplicative_bias"].model.score_func == "sigmoid"


# -- --nproc: checked before launch; a worker's failure is its status, without torchrun's report ---


def test_nproc_with_experts_that_do_not_divide_is_refused_before_launch(tmp_path, monkeypatch, capsys):
    from moebalance.parallel import process

    monkeypatch.setattr(process, "launch", lambda *a: pytest.fail("torchrun started"))
    code, _, err = run_cli(["train", "--nproc", "3", "--preset", "smoke", "train.expert_parallel=true", "--out", str(tmp_path / "o")], capsys)
    assert code == 2, err
    assert "model.num_experts=8 must be a multiple" in one_error_line(err)


@pytest.mark.distributed
def test_a_failing_worker_gives_its_status_without_torchrun_traceback(tmp_path):
    code = "import sys; from moebalance.parallel.process import launch; sys.exit(launch(2, ['train', '--no-such-option']))"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert "unrecognized arguments: --no-such-option" in proc.stderr


# -- signals and pipes -----------------------------------------------------------------------------


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, moebalance.cli, moebalance; assert 'torch' not in sys.modules; moebalance.TopKRouter; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=120)


def test_ctrl_c_while_torch_imports_is_status_130_without_traceback(tmp_path):
    # A finder that raises KeyboardInterrupt when torch is imported: the moment a user's Ctrl-C lands.
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from moebalance.cli import main\n"
        "sys.exit(main(['train', '--print-config']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "moebalance: interrupted: stopped by Ctrl-C"


def test_sigterm_stops_a_command_with_a_message(tmp_path, monkeypatch, capsys):
    def work(args, cfg):
        Path(args.out_dir).mkdir(parents=True)
        (Path(args.out_dir) / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM did not stop the command")

    monkeypatch.setitem(cli.COMMANDS, "train", work)
    code, _, err = run_cli(["train", "--preset", "smoke", "--out", str(tmp_path / "o")], capsys)
    assert code == 130, err
    assert "terminated (SIGTERM)" in one_error_line(err)
    assert (tmp_path / "o" / "metrics.jsonl").exists()  # complete files are kept
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_print_config_into_a_closed_pipe_exits_quietly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "moebalance", "train", "--print-config"],
        env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == "", err


def test_leakage_output_survives_a_closed_stdout_pipe(tmp_path):
    # `moebalance leakage ... | head -1`: the summary meets a closed pipe after the work is done;
    # the command exits quietly and keeps what it wrote (its folder holds no checkpoint).
    out = tmp_path / "L"
    argv = ["leakage", "--preset", "smoke", "--no-progress", "--trials", "1", "--out", str(out), "data.max_files=20",
            "model.d_model=32", "model.n_heads=2", "train.batch_size=2", "train.seq_len=32", "train.threads=1"]  # fmt: skip
    env = {**_env(), "MOEBALANCE_CACHE": os.environ["MOEBALANCE_CACHE"]}
    proc = subprocess.Popen([sys.executable, "-m", "moebalance", *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err, err
    assert (out / "leakage.json").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_nproc_2_trains_through_the_launcher(tmp_path):
    # The launcher now runs torchrun's code in this process (to report a worker's status without
    # its traceback): a job that succeeds still trains on both ranks with identical biases.
    argv = ["train", "--nproc", "2", "--preset", "smoke", "--no-progress", "--out", str(tmp_path / "dp2"), "train.max_steps=4",
            "train.warmup_steps=1", "train.eval_every=2", "train.threads=1", "train.tensorboard=false", "data.max_files=20"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "moebalance", *argv], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "dp2" / "bias_checksums.json").read_text())["identical"] is True
