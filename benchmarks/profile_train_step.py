"""Where a training step of ``moebalance train`` spends its time: torch.profiler over ``train()``.

    python benchmarks/profile_train_step.py                  # default preset, 10 steps, 1 thread
    python benchmarks/profile_train_step.py --steps 5 --top 40 --trace /tmp/trace.json

Runs :func:`moebalance.train.loop.train` once to warm up, then once more under
``torch.profiler`` (CPU activities, plus CUDA on a GPU) on the random tokens of section 7
(``benchmarks/sections/trainer.py``), and prints the operators by self time. The per-call wall
time beside the sum of operator self times shows the Python and framework overhead between them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sections.trainer import random_tokens, trainer_config  # noqa: E402

from moebalance.train.loop import train  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--top", type=int, default=30, help="operators to print")
    p.add_argument("--trace", default=None, help="also write a Chrome trace here")
    a = p.parse_args(argv)
    if a.steps < 1 or a.threads < 1 or a.top < 1:
        p.error("--steps, --threads and --top must be >= 1")
    torch.set_num_threads(a.threads)
    cfg = trainer_config(SimpleNamespace(quick=False, trainer_steps=a.steps, device=a.device, dtypes=[a.dtype]))
    data = random_tokens(cfg)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if a.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "warm", data=data, progress=False)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            res = train(cfg, Path(tmp) / "run", data=data, progress=False)
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in averages) / 1e6
    print(f"{a.steps} steps, wall {wall:.2f} s under the profiler, the loop's own {res.tokens_per_s:.0f} tokens/s; "
          f"operator self time {self_total:.2f} s ({self_total / wall:.0%} of the wall)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=a.top))
    if a.trace:
        prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
