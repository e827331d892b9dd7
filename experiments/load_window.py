"""Does the sign rule do better on loads summed over the last W steps? (A variant, not the paper's.)

arXiv 2408.15664, Algorithm 1 updates each bias from the load of the current batch: with our
8 x 128-token batches the sign rule then balances each expert's *median* batch load, and the batch
load is skewed (docs/reproduction.md, "Where the floor comes from"). Summing the loads of the last
``W`` steps gives every update ``W`` times the tokens (less skew, as a ``W`` times larger batch
would) while keeping one update per step, at the price of feedback that lags by up to ``W - 1``
steps. ``W = 1`` is Algorithm 1 exactly.

This trains the default ``compare`` Loss-Free run (``moebalance compare``'s ``loss_free``) once per
seed with the windowed rule and records validation perplexity and MaxVio_global:

    python experiments/load_window.py --window 4 --seeds 1234,1235,1236 --out docs/results/issue11/load_window_w4.json

The window lives in this script only (it is not checkpointed), so a run is not resumed: its folder
under ``--runs`` (default ``runs/load_window``) must not hold a run unless ``--overwrite``.
Errors, as ``moebalance``: one line on stderr and status 2 for bad arguments or a folder that
holds a run (before any work), 4 when the work fails on its data or files, 130 on Ctrl-C (the
JSON is written once, atomically, at the end). An ``--out`` written with the same arguments is
read back instead of recomputed; one with other arguments is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

from moebalance.balancing import LossFreeBalancer, find_routers, pop_expert_loads
from moebalance.lab.compare import prepare_base, seed_configs
from moebalance.train.checkpoint import clear_run_folder, folder_problem, write_json
from moebalance.train.config import apply_overrides, get_preset
from moebalance.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_floor import stored_args  # noqa: E402  (the sibling script: how a result file records its arguments)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, required=True, help="steps whose loads each update sums (1: Algorithm 1)")
    p.add_argument("--seeds", default="1234", help="comma-separated train.seed values (default 1234)")
    p.add_argument("--runs", type=Path, default=Path("runs/load_window"), help="folder of the run folders")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace run folders and an --out of other arguments")
    a = p.parse_args(argv)
    if not 1 <= a.window <= 600:
        p.error(f"--window must be in [1, 600] (steps), got {a.window}")
    try:
        a.seed_list = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    for path in (a.out.parent, a.runs):
        problem = folder_problem(path)
        if problem is not None:
            p.error(f"{path}: {problem}")
    if a.out.exists() and not a.overwrite and stored_args(a.out) != _recorded_args(a):
        p.error(f"--out {str(a.out)!r} holds another result; not overwritten (--overwrite replaces it)")
    for seed in a.seed_list:
        if (a.runs / f"w{a.window}_seed{seed}" / "config.json").exists() and not a.overwrite and not a.out.exists():
            p.error(f"{a.runs / f'w{a.window}_seed{seed}'} holds a run; not overwritten (--overwrite replaces it)")
    return a


def _recorded_args(a: argparse.Namespace) -> dict:
    return {"window": a.window, "seeds": a.seed_list, "preset": "default"}


def windowed_step(window: int):
    """A ``LossFreeBalancer.step`` that updates from the loads summed over the last ``window``
    calls, and the deque that holds them (cleared between runs)."""
    history: collections.deque = collections.deque(maxlen=window)

    @torch.no_grad()
    def step(self: LossFreeBalancer, model, rate_scale: float = 1.0) -> torch.Tensor:
        routers = find_routers(model)
        loads_LE = pop_expert_loads(routers)  # one process: nothing to all-reduce
        history.append(loads_LE.clone())
        delta_LE = self.bias_delta(torch.stack(list(history)).sum(0), None, rate_scale)
        biases = [r.expert_bias for r in routers]
        torch._foreach_add_(biases, list(delta_LE.unbind(0)))
        return loads_LE

    return step, history


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; return the exit status (see the module docstring)."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    prog = Path(__file__).name
    if a.out.exists() and not a.overwrite:
        print(f"{a.out}: already written with these arguments; read back, nothing recomputed")
        print(a.out.read_text())
        return 0
    step, history = windowed_step(a.window)
    LossFreeBalancer.step = step  # this process only: the experiment's variant of the update
    try:
        data, base = prepare_base(get_preset("default"))
        results = {}
        for seed in a.seed_list:
            history.clear()
            cfg = seed_configs(apply_overrides(base, [f"train.seed={seed}"]), 1)["loss_free"]
            run_dir = a.runs / f"w{a.window}_seed{seed}"
            if run_dir.is_dir():
                clear_run_folder(run_dir)
            r = train(cfg, run_dir, data=data, progress=False).to_dict()
            results[str(seed)] = {k: r[k] for k in ("val_ppl", "maxvio_global", "maxvio_global_per_layer", "maxvio_batch_last")}
            print(json.dumps({"seed": seed, **results[str(seed)]}), flush=True)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: nothing written to {a.out}; run the same command with --overwrite to start over", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 4
    values = [v["maxvio_global"] for v in results.values()]
    write_json(a.out, {"args": _recorded_args(a), "runs": results, "maxvio_global_mean": sum(values) / len(values)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
