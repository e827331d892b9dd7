"""moebalance benchmark suite: one command, ratios measured side by side in one run.

    python benchmarks/run.py            # the issue's default shapes (T=8192, D=512, F=1024, E=16/64, K=2/6)
    python benchmarks/run.py --quick    # tiny shapes, one repeat: a smoke test, not a measurement

Every case builds its competitors with identical weights and inputs and times forward+backward
(upstream gradient a fixed dense random tensor, parameter gradients reset to ``None`` before each
run) round-robin: repeat ``r`` of every competitor runs before repeat ``r+1`` of any, so a burst of
load from other processes hits all of them alike. Each figure is the median over ``--repeats``
after one warm-up run; ratios are ratios of medians measured in the same run.

This file is the runner (command line, machine record, report files); each section is one module
of ``benchmarks/sections/``, all timed by ``benchmarks/timing.py``, with the pieces they share in
``benchmarks/pieces.py`` and the transformers blocks in ``benchmarks/peers.py``:
  kernels      the expert kernel: grouped_mm against the per-expert loop
  1 ceiling    our layer (uniform routing) against dense SwiGLU GEMMs of the same active FLOPs
  2 imbalance  the same with skewed routing, beside a padded batched-matmul layer
  3 peers      our full layer against transformers' Mixtral (eager / batched_mm / grouped_mm) and
               Qwen2-MoE blocks with the same weights
  6 memory     memory per token of one forward of the same blocks
  4 balancing  a training step of the small LM with loss_free / none / aux_loss, the bias update
               alone (64 layers x 256 experts), and training tokens/s against the dense ceiling
  5 scaling    time per token as E grows at fixed active FLOPs
  7 trainer    tokens/s of `moebalance train` (default preset) against a dense model of the same
               active parameters

On CUDA the same script runs unchanged (``--device cuda``, the default when a GPU is present):
times are synchronised and memory is the peak of ``torch.cuda.max_memory_allocated`` over one
forward. On CPU, which has no allocator peak counter, memory is the bytes one forward keeps for
its backward (saved tensors plus output, distinct storages, parameters excluded), measured with
``torch.autograd.graph.saved_tensors_hooks``.

Writes ``<out-dir>/bench_<tag>.json`` (every raw median, settings, machine) and
``<out-dir>/bench_<tag>.md`` (the tables); the tag defaults to the device type.

Allocator (CPU): by default (``--malloc reuse``) the script asks glibc to keep freed memory for
reuse (``mallopt``: no ``mmap`` below 2 GiB, no trimming), as jemalloc or tcmalloc do and as
PyTorch's CPU performance-tuning guide recommends. With glibc's defaults every tensor above 32 MiB
(the ``[T*K, F]`` activations and ``[E, F, D]`` weight gradients here) is a fresh ``mmap`` whose
pages the kernel faults in and zeroes on every step; in the two scaling runs of
docs/benchmarks.md (separate runs, so only roughly) a forward+backward took 1.4-2.0x as long
under glibc's defaults, more the more and larger tensors a competitor allocates.
``--malloc system`` measures glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import peers  # noqa: E402
from pieces import DTYPES  # noqa: E402
from sections import SECTIONS  # noqa: E402
from timing import Timer  # noqa: E402

from moebalance.train.host import keep_freed_memory  # noqa: E402  (re-exported: the runner sets it for its process)

# ---------------------------------------------------------------- command line


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--tag", default=None, help="output name: bench_<tag>.json/.md (default: the device type)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", default="16,64")
    p.add_argument("--topk", default="2,6")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--peer-dtypes", default=None, help="dtypes of sections 2, 3 and 6: imbalance, peers, memory (default: --dtypes)")
    p.add_argument("--mixtral-impls", default=",".join(peers.MIXTRAL_IMPLEMENTATIONS))
    p.add_argument("--max-gather-gb", type=float, default=2.0, help="skip Mixtral batched_mm above this gathered-weight size")
    p.add_argument("--max-padded-gb", type=float, default=12.0,
                   help="skip the padded layer of section 2 when its activations would exceed this")
    p.add_argument("--lm-batch", type=int, default=16, help="sequences per training step in section 4")
    p.add_argument("--trainer-steps", type=int, default=20, help="optimizer steps per timed call in section 7")
    p.add_argument("--scaling-experts", default="8,16,32,64,128,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--malloc", choices=("reuse", "system"), default="reuse",
                   help="CPU: keep freed memory for reuse (glibc mallopt; default) or glibc's defaults")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))


def _ints(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        p.error(f"{flag} must be comma-separated integers >= 1, got {text!r}")
    if min(values) < 1:
        p.error(f"{flag} must be integers >= 1, got {text!r}")
    return values


def _check_numbers(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for flag in ("tokens", "d_model", "d_ff", "repeats", "lm_batch", "trainer_steps"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.threads < 0:
        p.error(f"--threads must be >= 0 (0: torch's default), got {a.threads}")
    for flag in ("max_gather_gb", "max_padded_gb"):
        if not 0 <= getattr(a, flag) < math.inf:
            p.error(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(a, flag)}")
    if max(a.topk) > min(a.experts):
        p.error(f"--topk {max(a.topk)} exceeds the smallest of --experts, {min(a.experts)}")
    if a.topk[0] > min(a.scaling_experts):  # section 5 runs the first top-K
        p.error(f"--topk {a.topk[0]} exceeds the smallest of --scaling-experts, {min(a.scaling_experts)}")


def _check_names(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    # Checked here, not when a section reaches them: a bad value must not cost a long run.
    for flag, names in (("--dtypes", a.dtypes), ("--peer-dtypes", a.peer_dtypes)):
        for d in names:
            if d not in DTYPES:
                p.error(f"{flag}: dtype must be one of {sorted(DTYPES)}, got {d!r}")
    unknown = [name for name in a.sections if name not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    bad_impls = [v for v in a.mixtral_impls if v not in peers.MIXTRAL_IMPLEMENTATIONS]
    if bad_impls:
        p.error(f"--mixtral-impls: unknown {bad_impls}; choose from {list(peers.MIXTRAL_IMPLEMENTATIONS)}")
    if a.tag is not None and (not a.tag or any(c in a.tag for c in "/\\") or a.tag in (".", "..")):
        p.error(f"--tag must be a plain name (it becomes bench_<tag>.json), got {a.tag!r}")


def _check_places(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    try:
        device = torch.device(a.device)
    except RuntimeError as exc:
        p.error(f"--device: {exc}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device must be cpu, or cuda where torch sees a GPU (it sees {torch.cuda.device_count()}), got {a.device!r}")
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        p.error(f"--out-dir {out} is a file, not a folder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a bad value exits with one line naming the flag (before any work)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.d_model, a.d_ff, a.repeats = 128, 32, 64, 1
        a.experts, a.topk, a.scaling_experts, a.trainer_steps = "4,8", "2", "4,8,16", 2
    a.experts = _ints(p, "--experts", a.experts)
    a.topk = _ints(p, "--topk", a.topk)
    a.scaling_experts = _ints(p, "--scaling-experts", a.scaling_experts)
    _check_numbers(p, a)
    a.dtypes = a.dtypes.split(",")
    a.peer_dtypes = a.peer_dtypes.split(",") if a.peer_dtypes else a.dtypes
    a.mixtral_impls = [v for v in a.mixtral_impls.split(",") if v]
    a.sections = a.sections.split(",")
    _check_names(p, a)
    _check_places(p, a)
    # The small LM of section 4: the default preset's model (quick: a tiny one).
    a.lm = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4, d_expert=32) if a.quick else dict(vocab_size=8192)
    a.lm_batch, a.lm_seq = (2, 32) if a.quick else (a.lm_batch, 128)
    a.bias_calls = 5 if a.quick else 200
    return a


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and :func:`run` the benchmarks."""
    return run(parse_args(argv))


# ---------------------------------------------------------------- the process and the machine


def machine(device: torch.device, malloc: str) -> dict:
    """What the figures were measured on (the load average at the start included)."""
    from moebalance.experts import _cpu_has_native_bf16

    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "malloc": malloc,
    }


# ---------------------------------------------------------------- run and report


def to_markdown(res: dict) -> str:
    """The report's tables: a line on the machine and the method, then each section that ran, in
    the order of :data:`sections.SECTIONS`."""
    m = res["machine"]
    s = res["settings"]
    out = [
        f"Device: {m['device']} ({m['device_name']}), torch {m['torch']}, threads {m['threads']}, "
        f"native bf16 GEMM: {m['native_bf16']}, allocator: {m.get('malloc', 'system')}. Shapes: T={s['tokens']}, D={s['d_model']}, F={s['d_ff']}; "
        f"median of {s['repeats']} round-robin repeats after a warm-up; forward+backward "
        f"(sections 4 and 7 run the small LM; see their tables).\n",
    ]
    out += [module.markdown(res[name], res) for name, module in SECTIONS.items() if name in res]
    return "".join(out)


def run(args: argparse.Namespace) -> dict:
    """Run the selected sections and write the JSON and markdown files; returns the results."""
    device = torch.device(args.device)
    malloc = keep_freed_memory() if args.malloc == "reuse" and device.type == "cpu" else "system"
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(device, args.repeats)
    res: dict = {"machine": machine(device, malloc), "settings": {k: v for k, v in vars(args).items()}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # before the work: a folder that cannot be made fails now
    t_start = time.perf_counter()
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        res[name] = SECTIONS[name].run(args, timer, device)
        res.setdefault("seconds", {})[name] = time.perf_counter() - t0
    res["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["seconds"]["total"] = time.perf_counter() - t_start
    name = f"bench_{args.tag or device.type}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    (out / f"{name}.md").write_text(to_markdown(res))
    print(f"wrote {out / name}.json and .md ({res['seconds']['total']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
