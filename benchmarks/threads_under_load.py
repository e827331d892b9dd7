"""Training throughput against ``train.threads`` on a machine busy with other work.

Starts one pure-Python busy loop per CPU core (the competing load), then for each thread setting
trains the default preset (``moebalance train``, built-in corpus) until it has logged ``--steps``
training steps, stops it, and reads the per-step ``tokens_per_s`` from its ``metrics.jsonl``
(the first ``--skip`` steps are dropped as warm-up). Settings are interleaved over ``--rounds``
rounds so a change of the background load hits all of them alike. The busy loops are stopped at
the end (and on Ctrl-C).

    python benchmarks/threads_under_load.py --threads 1 2 0 --rounds 2 --steps 25

Prints one markdown row per setting: median tokens/s over its rounds, and each round's median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _busy() -> None:
    while True:
        pass


def _train_rate(threads: int, steps: int, skip: int, out: Path, timeout: float) -> float:
    """Median tokens/s of training steps ``skip+1..steps`` of the default preset with ``threads``."""
    cmd = [sys.executable, "-m", "moebalance", "train", "--out", str(out), "--no-progress", f"train.threads={threads}", "train.tensorboard=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, rates, start = out / "metrics.jsonl", [], time.time()
    try:
        while time.time() - start < timeout and proc.poll() is None:
            time.sleep(1.0)
            if metrics.exists():
                recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                rates = [r["tokens_per_s"] for r in recs if r.get("kind") == "train"]
                if len(rates) >= steps:
                    break
    finally:
        proc.terminate()
        proc.wait()
    if len(rates) <= skip:
        raise RuntimeError(f"threads={threads}: only {len(rates)} steps in {timeout:.0f} s")
    return statistics.median(rates[skip:steps])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--load", type=int, default=os.cpu_count(), help="busy-loop processes (default: one per core)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per training run")
    args = ap.parse_args()
    busy = [mp.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for p in busy:
        p.start()
    results: dict[int, list[float]] = {t: [] for t in args.threads}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for t in args.threads:
                    rate = _train_rate(t, args.steps, args.skip, Path(tmp) / f"t{t}_r{r}", args.timeout)
                    results[t].append(rate)
                    print(f"round {r + 1}: train.threads={t}: {rate:.0f} tokens/s", flush=True)
    finally:
        for p in busy:
            p.terminate()
            p.join()
    print(f"\n| train.threads | tokens/s (median of rounds) | rounds | with {args.load} busy loops on {os.cpu_count()} cores |")
    print("|---|---|---|---|")
    for t, rates in results.items():
        print(f"| {t} | {statistics.median(rates):.0f} | {', '.join(f'{x:.0f}' for x in rates)} | |")


if __name__ == "__main__":
    main()
