"""The benchmark script runs end to end on tiny shapes (a smoke test: nothing here is timed)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_run_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_benchmark_writes_tables_and_json(tmp_path):
    bench = _load_run_module()
    args = bench.parse_args(["--quick", "--threads", "1", "--malloc", "system", "--out-dir", str(tmp_path)])
    args.experts, args.scaling_experts, args.peer_dtypes = [4], [4, 8], ["float32"]
    args.tokens, args.bias_calls = 32, 2
    res = bench.run(args)
    saved = json.loads((tmp_path / "bench_cpu.json").read_text())
    md = (tmp_path / "bench_cpu.md").read_text()
    for section, title in [("kernels", "Expert kernel"), ("ceiling", "1. Ceiling"), ("imbalance", "2. Imbalance"),
                           ("peers", "3. Peers"), ("memory", "6. Memory"), ("balancing", "4. The price"), ("scaling", "5. Scaling"),
                           ("trainer", "7. Trainer speed")]:
        assert section in saved and title in md
    assert len(res["ceiling"]) == 2  # float32 and bfloat16
    assert res["imbalance"][0]["maxvio"] > 0.3 and res["ceiling"][0]["maxvio"] == 0
    assert res["imbalance"][0]["skewed_over_uniform"] > 0 and "ours skewed / uniform" in md
    peer = res["peers"][0]
    assert peer["max_abs_diff_vs_mixtral"] < 1e-5  # same weights, same routing, same outputs
    assert all(math.isfinite(v) and v > 0 for k, v in peer.items() if k.startswith(("ms_", "speedup_")))
    mem = res["memory"][0]
    assert 0 < mem["bytes_per_token_ours"] < mem["bytes_per_token_ours_shared"]  # the shared expert keeps more
    b = res["balancing"]
    assert b["bias_update_us_64x256"] > 0 and b["tokens_per_s"] > 0
    assert 0 < b["bias_update_share_of_step"] < 1 and "its share of the step" in md
    rules = {r["rule"]: r for r in b["rules"]}  # every bias rule's update timed beside the sign rule
    assert set(rules) == {"sign", "error", "smebu", "proportional", "quantile_microbatch", "quantile_pooled", "quantile_histogram"}
    assert all(r["update_us"] > 0 for r in rules.values()) and rules["quantile_pooled"]["record_us"] > 0
    assert "4b. Each bias rule's update beside the sign rule" in md
    tr = res["trainer"]
    assert tr["preset"] == "smoke" and tr["malloc"] == "system"  # the test process keeps glibc's defaults
    for k in ("train", "train_in_loop", "moe", "dense", "train_malloc_reuse", "train_malloc_reuse_in_loop"):
        assert math.isfinite(tr[f"tokens_per_s_{k}"]) and tr[f"tokens_per_s_{k}"] > 0, k
    assert tr["malloc_reuse_over_system"] > 0 and "reuse / system" in md
    assert all(tr[f"ms_adamw_{k}"] > 0 for k in ("loop", "foreach", "fused")) and "foreach share" in md


def test_dense_twin_has_the_active_parameters_of_the_moe_model():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "src"))
    from types import SimpleNamespace

    from sections import trainer

    cfg = trainer.trainer_config(SimpleNamespace(quick=True, trainer_steps=3, device="cpu", dtypes=["float32"]))
    moe, dense = trainer.MoETransformer(cfg.model, cfg.balance), trainer.dense_twin(cfg)
    m = cfg.model
    assert not dense.routers and len(moe.routers) == m.n_layers
    # What the twin lacks is the routers' [E, D] weights; everything else a token uses is the same size.
    router_weights = m.n_layers * m.num_experts * m.d_model
    assert trainer.active_parameters(moe) - sum(p.numel() for p in dense.parameters()) == router_weights
    assert cfg.train.max_steps == 3 and cfg.model.vocab_size == cfg.data.vocab_size


def test_peer_blocks_match_our_layer():
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    ours = peers.ours_like_mixtral(16, 32, 4, 2)
    x = torch.randn(1, 6, 16)
    for impl in peers.MIXTRAL_IMPLEMENTATIONS:
        torch.testing.assert_close(peers.mixtral_block(ours, impl)(x), ours(x).output, rtol=1e-5, atol=1e-6)
    qwen = peers.ours_like_qwen2(16, 32, 4, 2)
    block = peers.qwen2_block(qwen)
    torch.nn.init.constant_(block.shared_expert_gate.weight, 0.0)  # sigmoid(0) = 1/2 on the shared expert
    routed_only = qwen(x).output - qwen.shared_experts(x)
    torch.testing.assert_close(block(x), routed_only + 0.5 * qwen.shared_experts(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="implementation"):
        peers.mixtral_block(ours, "sdpa")


def test_keep_freed_memory_sets_glibc_malloc_in_its_own_process():
    # Process-wide and irreversible, so it runs in a child process.
    import platform
    import subprocess
    import sys

    code = "import sys; sys.path.insert(0, 'benchmarks'); import run; print(run.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.strip().startswith("glibc mallopt: mmap threshold 2 GiB") if glibc else out.strip() == "system"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--tokens", "-3"], "--tokens must be >= 1"),
        (["--experts", "16,x"], "--experts must be comma-separated integers"),
        (["--experts", "0"], "--experts must be integers >= 1"),
        (["--topk", "32"], "--topk 32 exceeds the smallest of --experts, 16"),
        (["--scaling-experts", "1,8"], "--topk 2 exceeds the smallest of --scaling-experts, 1"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--max-padded-gb", "inf"], "--max-padded-gb must be a finite number >= 0"),
        (["--sections", "ceiling,bogus"], "--sections: unknown ['bogus']"),
        (["--mixtral-impls", "eager,nope"], "--mixtral-impls: unknown ['nope']"),
        (["--tag", "a/b"], "--tag must be a plain name"),
        (["--peer-dtypes", "float16"], "--peer-dtypes: dtype must be one of"),
        (["--device", "gpu"], "--device"),
        (["--device", "mps"], "--device must be cpu, or cuda where torch sees a GPU"),
        (["--out-dir", __file__], "is a file, not a folder"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    bench = _load_run_module()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
