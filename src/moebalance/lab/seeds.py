"""Results with their noise: ``moebalance compare --seeds N`` statistics over seeds.

Each seed fixes the initial weights and the data order, shared by the strategies of that seed
(so the per-seed differences are paired); the validation tokens are the same for every seed
(``data.split_seed``, docs/data.md). The spread is the sample standard deviation over seeds
(``ddof = 1``); with one seed there is none.

The rule for "the perplexity difference exceeds the seed spread": ``|mean_LF - mean_aux| >
2 * pooled_std`` with ``pooled_std = sqrt((std_LF**2 + std_aux**2) / 2)``, the spread of one
method's perplexity across seeds. The report also gives the paired per-seed differences, their
mean and standard deviation, and how many seeds favour each method.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["METRICS", "ppl_noise_verdict", "seed_markdown", "seed_summary"]

#: record field -> report name
METRICS = {"val_ppl": "val ppl", "maxvio_global": "MaxVio_global", "maxvio_batch_last": "MaxVio_batch (last 10%)"}


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def seed_summary(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, sample std and values over seeds of each run's metrics.

    Args:
        records: run folder -> record with ``run`` (the run's name without its seed folder; when
            absent, ``balance.strategy``), ``seed`` and the :data:`METRICS` fields.

    Returns:
        ``{run: {"seeds": [...], metric: {"mean", "std", "values"}}}`` (``std`` ``None`` for one seed).
    """
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for rec in records.values():
        by_strategy.setdefault(rec.get("run") or rec["balance"]["strategy"], []).append(rec)
    out = {}
    for strategy, recs in by_strategy.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        out[strategy] = {"seeds": [r["seed"] for r in recs]} | {m: _stats([r[m] for r in recs]) for m in METRICS}
    return out


def ppl_noise_verdict(summary: dict[str, dict[str, Any]], a: str = "loss_free", b: str = "aux_loss") -> dict[str, Any]:
    """Whether the validation-perplexity difference of ``a`` and ``b`` exceeds the seed spread.

    Returns:
        dict with ``mean_diff`` (``mean_a - mean_b``), ``rel_diff`` (``mean_a / mean_b - 1``),
        ``pooled_std``, ``exceeds`` (``|mean_diff| > 2 * pooled_std``; ``None`` with one seed),
        ``paired_diffs`` (per seed, ``a - b``), ``paired_mean``, ``paired_std``, ``a_lower`` (seeds
        where ``a`` has the lower perplexity), ``rule`` and ``text`` (one sentence).
    """
    pa, pb = summary[a]["val_ppl"], summary[b]["val_ppl"]
    diff = pa["mean"] - pb["mean"]
    paired = [x - y for x, y in zip(pa["values"], pb["values"])]
    if pa["std"] is None or pb["std"] is None:
        pooled, exceeds = None, None
    else:
        pooled = math.sqrt((pa["std"] ** 2 + pb["std"] ** 2) / 2)
        exceeds = abs(diff) > 2 * pooled
    n = len(paired)
    lower = sum(d < 0 for d in paired)
    rule = "|mean difference| > 2 x pooled seed std, pooled std = sqrt((std_a^2 + std_b^2) / 2)"
    if exceeds is None:
        text = f"One seed: no seed spread to compare the {diff:+.2f} perplexity difference with; run --seeds 2 or more."
    else:
        text = (
            f"{a} minus {b}: {diff:+.2f} perplexity ({100 * (pa['mean'] / pb['mean'] - 1):+.2f}%) against a pooled "
            f"seed std of {pooled:.2f}; the difference {'exceeds' if exceeds else 'does not exceed'} twice the seed "
            f"spread, so it is {'larger than' if exceeds else 'within'} the noise. {a} had the lower perplexity "
            f"in {lower} of {n} seeds (paired differences {', '.join(f'{d:+.2f}' for d in paired)})."
        )
    return {
        "mean_diff": diff,
        "rel_diff": pa["mean"] / pb["mean"] - 1,
        "pooled_std": pooled,
        "exceeds": exceeds,
        "paired_diffs": paired,
        "paired_mean": statistics.fmean(paired),
        "paired_std": statistics.stdev(paired) if n > 1 else None,
        "a_lower": lower,
        "rule": rule,
        "text": text,
    }


def _fmt(stat: dict[str, Any], digits: int) -> str:
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def seed_markdown(summary: dict[str, dict[str, Any]], verdict: dict[str, Any] | None, maxvio_label: str) -> list[str]:
    """Markdown lines: the mean ± std table over seeds and the noise verdict."""
    n = max(len(s["seeds"]) for s in summary.values())
    lines = [
        f"## Over {n} seeds (mean ± sample std)",
        "",
        f"| strategy | seeds | val ppl | {maxvio_label} | MaxVio_batch (last 10%) |",
        "|---|---|---|---|---|",
    ]
    for strategy, s in summary.items():
        seeds = ", ".join(str(x) for x in s["seeds"])
        lines.append(
            f"| {strategy} | {seeds} | {_fmt(s['val_ppl'], 2)} | {_fmt(s['maxvio_global'], 3)} | "
            f"{_fmt(s['maxvio_batch_last'], 3)} |"
        )
    if verdict is not None:
        lines += ["", verdict["text"], "", f"Rule: {verdict['rule']}."]
    return lines
