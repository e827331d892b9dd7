"""What expert parallelism would cost with a run's measured expert loads: a replay, not a measurement.

Shape legend: S recorded training steps, L MoE layers, E experts, R expert-parallel ranks.

Under expert parallelism (EP) each rank owns ``E / R`` experts and computes the tokens routed to
them; the ranks of a layer then wait for the slowest one before the next exchange. This module
replays the per-step, per-layer loads a run recorded in ``metrics.jsonl`` (the global batch's
``loads``, summed over micro-batches and data-parallel ranks) onto ``R`` ranks with experts
assigned contiguously (rank ``r`` owns experts ``[r*E/R, (r+1)*E/R)``, as Megatron-Core and
torchtitan place them) and assumes expert compute time proportional to tokens:

    time of layer l at step s  ~  max_r load[s, l, r]           (everyone waits for the busiest rank)
    ideal time                 ~  mean_r load[s, l, r]          (perfect balance)
    step-time factor           =  sum_{s,l} max / sum_{s,l} mean    (>= 1)
    fraction lost to waiting   =  1 - 1 / factor              (rank-time spent idle)

Honest limits: it ignores communication and non-expert compute (so the factor bounds the MoE
part only), and it replays loads summed over a whole optimizer step, which smooths the imbalance
of each micro-batch (real EP waits per micro-batch), so it *understates* the cost. It cannot
replay onto more ranks than the run has experts: splitting one expert's tokens over several
ranks is not what EP does, so such rank counts are reported as not replayable, never invented.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_RANKS", "ReplayResult", "not_replayable_note", "rank_loads", "replay_inputs", "replay_loads",
           "replay_markdown", "replay_runs"]

DEFAULT_RANKS = (2, 4, 8, 16, 64, 256)


@dataclass
class ReplayResult:
    """The replay of one run onto ``num_ranks`` EP ranks.

    Attributes:
        num_ranks: ``R``. experts_per_rank: ``E / R``.
        step_time_factor: ``sum max / sum mean`` over all recorded steps and layers.
        waiting_fraction: ``1 - 1 / step_time_factor``.
        step_time_factor_last_half: the same over the second half of the steps (after the
            Loss-Free bias has had time to settle).
        worst_step_factor: the largest per-step factor.
        steps: ``S``.
    """

    num_ranks: int
    experts_per_rank: int
    step_time_factor: float
    waiting_fraction: float
    step_time_factor_last_half: float
    worst_step_factor: float
    steps: int


def rank_loads(loads_SLE: np.ndarray, num_ranks: int) -> np.ndarray:
    """Sum contiguous expert loads per rank: ``[..., E]`` -> ``[..., R]``.

    Raises:
        ValueError: ``num_ranks < 1`` or ``E`` not a multiple of ``num_ranks`` (in particular
            more ranks than experts).
    """
    loads = np.asarray(loads_SLE, dtype=np.float64)
    num_experts = loads.shape[-1]
    if num_ranks < 1 or num_experts % num_ranks != 0:
        raise ValueError(
            f"num_ranks must be >= 1 and divide the {num_experts} experts (contiguous assignment), got {num_ranks}"
        )
    return loads.reshape(*loads.shape[:-1], num_ranks, num_experts // num_ranks).sum(-1)


def replay_loads(loads_SLE: np.ndarray, num_ranks: int) -> ReplayResult:
    """Replay ``[S, L, E]`` loads onto ``num_ranks`` ranks (a pure function; see the module doc).

    Raises:
        ValueError: no steps, loads not 3-D, negative loads, or ``num_ranks`` not dividing ``E``.
    """
    loads = np.asarray(loads_SLE, dtype=np.float64)
    if loads.ndim != 3 or loads.shape[0] == 0:
        raise ValueError(f"loads must be [steps >= 1, layers, experts], got shape {loads.shape}")
    if (loads < 0).any():
        raise ValueError("loads must be >= 0")
    per_rank = rank_loads(loads, num_ranks)  # [S, L, R]
    actual_S = per_rank.max(-1).sum(-1)
    ideal_S = per_rank.mean(-1).sum(-1)
    valid = ideal_S > 0
    if not valid.any():
        raise ValueError("every recorded step has zero load")
    actual_S, ideal_S = actual_S[valid], ideal_S[valid]
    half = len(actual_S) // 2
    factor = actual_S.sum() / ideal_S.sum()
    return ReplayResult(
        num_ranks=num_ranks,
        experts_per_rank=loads.shape[-1] // num_ranks,
        step_time_factor=float(factor),
        waiting_fraction=float(1 - 1 / factor),
        step_time_factor_last_half=float(actual_S[half:].sum() / ideal_S[half:].sum()),
        worst_step_factor=float((actual_S / ideal_S).max()),
        steps=int(len(actual_S)),
    )


def _recorded_loads(run_dir: str | Path) -> np.ndarray:
    """``[S, L, E]`` loads of a run's training records (:func:`moebalance.train.runfiles.read_metrics`
    has checked that every record's ``loads`` is one ``[L][E]`` shape of counts >= 0).

    Raises:
        ValueError: a damaged ``metrics.jsonl`` (named), or one without per-step loads.
    """
    from moebalance.lab.reporting import load_metrics

    train, _ = load_metrics(run_dir)
    loads = [r["loads"] for r in train if "loads" in r]
    if not loads:
        raise ValueError(f"{run_dir}: metrics.jsonl has no per-step 'loads' to replay")
    return np.asarray(loads, dtype=np.float64)


def replay_inputs(paths: list[str | Path]) -> dict[str, Path]:
    """The runs of ``paths`` (:func:`~moebalance.lab.reporting.find_run_dirs`), each checked to hold
    loads that :func:`replay_runs` can replay (``moebalance replay`` calls this before any work).

    Raises:
        FileNotFoundError: see :func:`~moebalance.lab.reporting.find_run_dirs`.
        ValueError: a damaged ``metrics.jsonl`` or one without per-step loads; the message names it.
    """
    from moebalance.lab.reporting import find_run_dirs

    runs = find_run_dirs(paths)
    for run_dir in runs.values():
        _recorded_loads(run_dir)
    return runs


def replay_runs(runs: dict[str, str | Path], ranks: tuple[int, ...] = DEFAULT_RANKS) -> dict[str, Any]:
    """Replay every run's recorded loads onto each rank count that divides its expert count.

    Returns:
        ``{"ranks": [...], "runs": {name: {"num_experts", "results": [ReplayResult as dict],
        "not_replayable": [R, ...]}}}`` (JSON-ready).
    """
    out: dict[str, Any] = {"ranks": list(ranks), "runs": {}}
    for name, run_dir in runs.items():
        loads = _recorded_loads(run_dir)
        num_experts = loads.shape[-1]
        ok = [r for r in ranks if num_experts % r == 0]
        out["runs"][name] = {
            "num_experts": num_experts,
            "results": [asdict(replay_loads(loads, r)) for r in ok],
            "not_replayable": [r for r in ranks if r not in ok],
        }
    return out


def replay_markdown(replay: dict[str, Any]) -> list[str]:
    """Markdown lines: one table row per (run, EP ranks), and a note on the rank counts left out."""
    lines = [
        "## Expert-parallel cost: a replay of the measured loads",
        "",
        "Each run's recorded per-step, per-layer expert loads replayed onto R expert-parallel ranks "
        "(experts assigned contiguously). Step-time factor = sum of the busiest rank's load / sum of "
        "the mean rank load (1.0 is perfect balance); waiting = share of rank time spent idle. "
        "A replay, not a measurement: no communication, and loads summed over each optimizer step "
        "(real EP waits per micro-batch, so this understates the cost).",
        "",
        "| run | EP ranks | experts/rank | step-time factor | waiting | factor, last half | worst step |",
        "|---|---|---|---|---|---|---|",
    ]
    skipped: dict[int, set[int]] = {}
    for name, run in replay["runs"].items():
        for r in run["results"]:
            lines.append(
                f"| {name} | {r['num_ranks']} | {r['experts_per_rank']} | {r['step_time_factor']:.3f} | "
                f"{100 * r['waiting_fraction']:.1f}% | {r['step_time_factor_last_half']:.3f} | "
                f"{r['worst_step_factor']:.3f} |"
            )
        for rk in run["not_replayable"]:
            skipped.setdefault(run["num_experts"], set()).add(rk)
    for num_experts, rks in sorted(skipped.items()):
        lines += ["", not_replayable_note(num_experts, sorted(rks))]
    return lines + [""]


def not_replayable_note(num_experts: int, ranks: list[int]) -> str:
    """Why the rank counts ``ranks`` were left out of a replay of ``num_experts`` experts: each rank
    holds whole experts and as many as every other rank, so a rank count must divide ``num_experts``."""
    more = [r for r in ranks if r > num_experts]
    uneven = [r for r in ranks if r <= num_experts]
    why = []
    if more:
        why.append(f"{' and '.join(map(str, more))} ranks exceed the {num_experts} experts (each rank holds at least one whole expert)")
    if uneven:
        why.append(f"{num_experts} experts do not split evenly over {' or '.join(map(str, uneven))} ranks")
    return (
        f"Not replayable with {num_experts} experts: {', '.join(map(str, ranks))} EP ranks, because "
        f"{'; and '.join(why)}. Expert parallelism never splits an expert across ranks, so these rows are "
        "left out rather than invented (`moebalance replay RUN --ranks ...` picks other counts)."
    )
