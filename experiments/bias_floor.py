"""How low can the Loss-Free bias bring MaxVio_global at a given batch size, with the weights frozen?

Takes a finished run (its ``checkpoint.pt``), freezes every weight and runs *only* the bias update
(arXiv 2408.15664, Algorithm 1, or its ``error`` ablation) on fresh training batches, scoring
MaxVio_global on the validation split every ``--eval-every`` updates. With nothing drifting, what
is left is the floor of the update rule itself at that batch size: its step jitter and, for the
sign rule, the gap between the median and the mean of an expert's per-batch load (the sign rule
settles where an expert is over-loaded in half of the batches; MaxVio_global measures the mean).

After the updates it measures, on ``--probe-batches`` more batches with the bias held, each
expert's per-batch relative load (load / mean load): its mean, median and skewness.

    python experiments/bias_floor.py RUN_DIR --update sign --rate 1e-3 --batch-size 8 --out floor.json
    python experiments/bias_floor.py RUN_DIR --method quantile_pooled --eval-tokens 131072 --out qb.json

``--method`` takes a rule with its settings in the batch-size study (``sweep batch-size``).

Output (``--out``): JSON with the arguments, the MaxVio_global curve, and the probe statistics
per layer. Used by docs/reproduction.md ("Where the floor comes from").

Errors, as ``moebalance`` (README, *Errors and exit status*): one line on stderr and status 2 for
bad arguments, a run folder whose checkpoint cannot be read, or an ``--out`` that cannot be
written (all found before the work starts); 4 when the work fails on its data or files; 130 on
Ctrl-C (nothing is written: the JSON is written once, atomically, at the end). A re-run never
overwrites: an ``--out`` written with the same arguments is read back, one with other arguments
is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from moebalance.balancing import LossFreeBalancer, find_routers, pop_expert_loads, rule_from_config
from moebalance.lab.batch_size import BIAS_METHODS, method_overrides
from moebalance.lab.floor import CheckpointMismatch, bias_only_updates, load_frozen
from moebalance.train.checkpoint import folder_problem, load_checkpoint, write_json
from moebalance.train.config import RunConfig, apply_overrides
from moebalance.train.data import sample_batch

#: Upper bounds of the size options (a larger one only hangs or runs out of memory).
LIMITS = {"batch_size": 65536, "steps": 1_000_000, "eval_every": 1_000_000, "probe_batches": 1_000_000, "eval_tokens": 10**9}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The arguments, checked; exits with status 2 (``SystemExit``) naming a bad one, an option
    out of its range (:data:`LIMITS`, ``--seed`` in ``[0, 2**63)``) or an ``--out`` that may not be
    written."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished `moebalance train` run (holds checkpoint.pt)")
    p.add_argument("--update", choices=("sign", "error", "smebu", "proportional", "quantile"), default="sign",
                   help="bias update rule (default sign; see moebalance.rules)")
    p.add_argument("--rate", type=float, default=1e-3, help="update rate u (default 1e-3)")
    p.add_argument("--method", choices=BIAS_METHODS, default=None,
                   help="a rule with its settings of the batch-size study (moebalance.lab.batch_size.STUDY_METHODS); "
                        "replaces --update and --rate")
    p.add_argument("--eval-tokens", type=int, default=0, help="validation tokens of each score (default 0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per update (default 8)")
    p.add_argument("--steps", type=int, default=1200, help="bias updates (default 1200)")
    p.add_argument("--eval-every", type=int, default=200, help="updates between validation scores (default 200)")
    p.add_argument("--probe-batches", type=int, default=600, help="batches for the load statistics (default 600)")
    p.add_argument("--seed", type=int, default=999, help="seed of the batch sampler (default 999)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out written with other arguments")
    a = p.parse_args(argv)
    if not 0 <= a.eval_tokens <= LIMITS["eval_tokens"]:
        p.error(f"--eval-tokens must be in [0, {LIMITS['eval_tokens']}] (0: all), got {a.eval_tokens}")
    if not 0 <= a.seed < 2**63:
        p.error(f"--seed must be in [0, 2**63), got {a.seed}")
    if not a.rate > 0:
        p.error(f"--rate must be > 0, got {a.rate}")
    for name in ("batch_size", "steps", "eval_every", "probe_batches"):
        if not 1 <= getattr(a, name) <= LIMITS[name]:
            p.error(f"--{name.replace('_', '-')} must be in [1, {LIMITS[name]}], got {getattr(a, name)}")
    try:
        balancer_of(a)
    except ValueError as exc:  # the biases are float32: inf, 1e39 and 1e-50 pass the check above
        p.error(f"--rate: {exc}")
    check_run_and_out(p, a)
    return a


def balancer_of(a: argparse.Namespace, cfg: RunConfig | None = None) -> LossFreeBalancer:
    """The balancer of the arguments: ``--method``'s rule and rate for the run's config ``cfg``
    (default: the default config), else ``--update`` at ``--rate`` (raises ``ValueError`` for a
    rate the float32 bias cannot take)."""
    if a.method is None:
        return LossFreeBalancer(a.rate, a.update)
    cfg = RunConfig() if cfg is None else cfg
    balance = apply_overrides(cfg, method_overrides(a.method, cfg)).balance
    return LossFreeBalancer(balance.bias_update_rate, rule_from_config(balance))


def check_run_and_out(p: argparse.ArgumentParser, a: argparse.Namespace, needs: tuple[str, ...] = ("probe",)) -> None:
    """``p.error`` (``SystemExit`` 2) unless ``a.run_dir`` is a finished run and ``a.out`` a JSON
    file that may be written: a new file, or one holding a result of the same arguments (with the
    keys ``needs``, which a re-run reads back), or ``--overwrite``."""
    if not (a.run_dir / "checkpoint.pt").is_file():
        p.error(f"{a.run_dir} holds no checkpoint.pt (a finished run of `moebalance train`)")
    if a.out.is_dir():
        p.error(f"--out {str(a.out)!r} is a folder; name the JSON file to write")
    problem = folder_problem(a.out.parent)
    if problem is not None:
        p.error(f"--out {str(a.out)!r}: {problem}")
    if a.out.exists() and not a.overwrite and stored_args(a.out, needs) != recorded_args(a):
        p.error(f"--out {str(a.out)!r} holds another result (other arguments, or not one of ours); not overwritten (--overwrite replaces it)")


def recorded_args(a: argparse.Namespace) -> dict:
    """The arguments as the result file records them (``--overwrite`` left out)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "overwrite"}


def stored_args(path: Path, needs: tuple[str, ...] = ()) -> dict | None:
    """The ``args`` of an earlier result in ``path``, or ``None`` if it holds none (unreadable, not
    a JSON object, or without one of the keys ``needs``). Raises nothing."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not all(k in stored for k in needs):
        return None
    return stored.get("args")


def probe_stats(rel: np.ndarray, val_loads: list) -> dict:
    """Per-layer statistics of ``rel`` ``[batches, L, E]`` (per-batch load / mean load)."""
    mean, median = rel.mean(0), np.median(rel, 0)
    skew = ((rel - mean) ** 3).mean(0) / np.maximum(rel.std(0), 1e-12) ** 3
    val = np.asarray(val_loads, dtype=np.float64)
    val = val / val.mean(-1, keepdims=True)
    return {
        "max_mean_minus_1": (mean.max(-1) - 1).round(4).tolist(),
        "max_abs_median_minus_1": np.abs(median - 1).max(-1).round(4).tolist(),
        "val_max_minus_1": (val.max(-1) - 1).round(4).tolist(),
        "mean_abs_relative_error": round(float(np.abs(rel - 1).mean()), 4),
        "mean_skewness": round(float(skew.mean()), 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; return the exit status (see the module docstring)."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    prog = Path(__file__).name
    if a.out.exists() and not a.overwrite:  # parse_args checked that it holds these arguments' result
        print(f"{a.out}: already written with these arguments; read back, nothing recomputed")
        print(json.dumps(json.loads(a.out.read_text())["probe"]))
        return 0
    try:
        state = load_checkpoint(a.run_dir / "checkpoint.pt")
        if not (isinstance(state, dict) and {"config", "model"} <= state.keys()):
            raise ValueError("checkpoint.pt is not the training state of a `moebalance train` run (no config and model)")
        RunConfig.from_dict(state["config"])
    except (ValueError, OSError, TypeError) as exc:
        print(f"{prog}: error: {a.run_dir}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        return run(a, state)
    except CheckpointMismatch as exc:  # found on loading, before any work
        print(f"{prog}: error: {a.run_dir}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: nothing written to {a.out}; run the same command again to start over", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 4


def run(a: argparse.Namespace, state: dict) -> int:
    """The bias-only updates (:func:`moebalance.lab.floor.bias_only_updates`), the probe and the
    result file of :func:`main`."""
    torch.set_num_threads(1)
    model, cfg, data = load_frozen(a.run_dir, state)
    balancer = balancer_of(a, cfg)
    score_at = {0, a.steps} | set(range(a.eval_every, a.steps + 1, a.eval_every))
    show = lambda rec: print(json.dumps({k: rec[k] for k in ("step", "maxvio_global", "per_layer")}), flush=True)  # noqa: E731
    gen = torch.Generator().manual_seed(a.seed)  # the probe's batches follow the updates'
    curve = bias_only_updates(model, data, cfg, balancer, a.batch_size, a.steps, score_at, eval_tokens=a.eval_tokens, on_score=show, generator=gen)
    routers = find_routers(model)
    for router in routers:  # the probe below reads loads only
        router.score_recorder = None
    rel = []
    for _ in range(a.probe_batches):
        model.train()  # the routers count loads in training mode only
        x, _ = sample_batch(data.train, a.batch_size, cfg.train.seq_len, gen)
        model(x)
        loads = pop_expert_loads(routers)
        rel.append((loads / loads.mean(-1, keepdim=True)).numpy())
    stats = probe_stats(np.stack(rel), curve[-1]["loads"])
    result = {
        "args": recorded_args(a),
        "curve": [{k: v for k, v in r.items() if k != "loads"} for r in curve],
        "maxvio_global_last_half_mean": float(np.mean([r["maxvio_global"] for r in curve[len(curve) // 2 :]])),
        "probe": stats,
    }
    write_json(a.out, result)
    print(json.dumps(result["probe"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
