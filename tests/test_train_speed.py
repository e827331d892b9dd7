"""What makes the trainer faster must not change what it computes unless asked: the default AdamW is
PyTorch's own, the fused one an explicit choice, and ``train.malloc`` changes where memory comes
from, nothing else."""

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moebalance.train.config import ModelConfig, RunConfig, apply_overrides
from moebalance.train.loop import build_optimizer
from moebalance.train.model import MoETransformer

ROOT = Path(__file__).resolve().parents[1]


def _train_a_little(make_optimizer) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, d_expert=16))
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 64, (4, 17), generator=gen)
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_default_adamw_is_pytorchs_and_fused_rounds_differently():
    cfg = RunConfig()
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, d_expert=16))
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"] is None and opt.defaults["foreach"] is None  # PyTorch's own choice of kernels
    ours = _train_a_little(lambda m: build_optimizer(m, cfg))
    fused = _train_a_little(lambda m: build_optimizer(m, apply_overrides(cfg, ["train.adamw_impl=fused"])))
    diff = max((ours[k] - fused[k]).abs().max().item() for k in ours)
    assert 0 < diff < 1e-5  # why fused is an explicit choice: not the same bits, the same training


def test_fused_adamw_is_an_explicit_choice():
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, d_expert=16))
    fused = build_optimizer(model, apply_overrides(RunConfig(), ["train.adamw_impl=fused"]))
    assert fused.defaults["fused"] is True and not fused.defaults["foreach"]
    with pytest.raises(ValueError, match=r"train.adamw_impl must be one of \['default', 'fused'\]"):
        apply_overrides(RunConfig(), ["train.adamw_impl=loop"])


def test_malloc_field_is_checked():
    assert RunConfig().train.malloc == "reuse"
    assert apply_overrides(RunConfig(), ["train.malloc=system"]).train.malloc == "system"
    with pytest.raises(ValueError, match=r"train.malloc must be one of \['reuse', 'system'\]"):
        apply_overrides(RunConfig(), ["train.malloc=jemalloc"])


_MALLINFO = """
import ctypes, sys
from moebalance.train.host import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "reuse":
    print(keep_freed_memory())
import torch
x = torch.empty(64 << 20, dtype=torch.uint8)
print("mmapped" if libc.mallinfo2().hblkhd >= 64 << 20 else "heap")
"""


def _glibc_with_mallinfo2() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    # Process-wide and irreversible, so each arm runs in its own child process.
    def where(mode: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _MALLINFO, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.split("\n")

    assert where("system")[-2] == "mmapped"  # glibc's default: a fresh mmap for a 64 MiB tensor
    reuse = where("reuse")
    assert reuse[0].startswith("glibc mallopt: mmap threshold 2 GiB") and reuse[-2] == "heap"
