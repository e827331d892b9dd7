"""Results with their noise: ``moebalance compare --seeds N`` statistics over seeds.

Each seed fixes the initial weights and the data order, shared by the strategies of that seed
(so the per-seed differences are paired); the validation tokens are the same for every seed
(``data.split_seed``, docs/data.md). The spread is the sample standard deviation over seeds
(``ddof = 1``); with one seed there is none.

The one statistical statement on the perplexity difference is a **paired t-test** on the
per-seed differences ``ppl_LF - ppl_aux`` (two-sided, ``n - 1`` degrees of freedom; Student 1908):
the difference is *significant* at ``p < 0.05``, else *not established*. The report also gives the
paired differences, their mean and standard deviation, the pooled seed std (the spread of one
method's perplexity across seeds, ``sqrt((std_LF**2 + std_aux**2) / 2)``) and how many seeds
favour each method; the README quotes the same test.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["METRICS", "SIGNIFICANCE", "paired_t_test", "ppl_noise_verdict", "seed_markdown", "seed_stats", "seed_summary"]

#: Two-sided p-value below which a paired difference is called significant.
SIGNIFICANCE = 0.05

#: record field -> report name
METRICS = {"val_ppl": "val ppl", "maxvio_global": "MaxVio_global", "maxvio_batch_last": "MaxVio_batch (last 10%)"}


def seed_stats(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample, ddof = 1; None for one value), "values"}`` of one metric over seeds."""
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
        out[strategy] = {"seeds": [r["seed"] for r in recs]} | {m: seed_stats([r[m] for r in recs]) for m in METRICS}
    return out


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz; Numerical
    Recipes 3rd ed. §6.4, ``betacf``)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``, ``0 <= x <= 1``."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def paired_t_test(diffs: list[float]) -> tuple[float, float]:
    """Paired (one-sample) t-test of ``mean(diffs) == 0``: ``(t, two-sided p)``, ``n - 1`` degrees of freedom.

    ``p = I_{df / (df + t^2)}(df / 2, 1 / 2)`` (the Student t tail through the incomplete beta
    function, as ``scipy.stats.ttest_1samp``). Equal differences give ``t = ±inf, p = 0`` (all
    zero: ``t = 0, p = 1``).

    Raises:
        ValueError: fewer than two differences (no spread to test against).
    """
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 differences, got {n}")
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    if std == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (std / math.sqrt(n))
    df = n - 1
    return t, _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def ppl_noise_verdict(summary: dict[str, dict[str, Any]], a: str = "loss_free", b: str = "aux_loss") -> dict[str, Any]:
    """The paired t-test of the validation-perplexity difference of ``a`` and ``b`` over seeds.

    Returns:
        dict with ``mean_diff`` (``mean_a - mean_b``), ``rel_diff`` (``mean_a / mean_b - 1``),
        ``pooled_std``, ``paired_diffs`` (per seed, ``a - b``), ``paired_mean``, ``paired_std``,
        ``t`` and ``p`` (:func:`paired_t_test`), ``significant`` (``p <`` :data:`SIGNIFICANCE`;
        ``None`` with one seed), ``a_lower`` (seeds where ``a`` has the lower perplexity), ``rule``
        and ``text`` (the statement, the test named).
    """
    pa, pb = summary[a]["val_ppl"], summary[b]["val_ppl"]
    diff = pa["mean"] - pb["mean"]
    paired = [x - y for x, y in zip(pa["values"], pb["values"])]
    n = len(paired)
    lower = sum(d < 0 for d in paired)
    rule = f"paired t-test on the per-seed differences, two-sided, n - 1 degrees of freedom; significant when p < {SIGNIFICANCE:g}"
    if n < 2:
        pooled = t = p = significant = None
        text = f"One seed: no seed spread to test the {diff:+.2f} perplexity difference against; run --seeds 2 or more."
    else:
        pooled = math.sqrt((pa["std"] ** 2 + pb["std"] ** 2) / 2)
        t, p = paired_t_test(paired)
        significant = p < SIGNIFICANCE
        text = (
            f"{a} minus {b}: {diff:+.2f} perplexity ({100 * (pa['mean'] / pb['mean'] - 1):+.2f}%); paired t-test over "
            f"{n} seeds: t = {t:.2f}, p = {p:.2f} (two-sided, {n - 1} degrees of freedom), so the difference is "
            f"{'significant' if significant else 'not established'} at the {100 * SIGNIFICANCE:g}% level. {a} had the "
            f"lower perplexity in {lower} of {n} seeds (paired differences {', '.join(f'{d:+.2f}' for d in paired)}; "
            f"pooled seed std {pooled:.2f})."
        )
    return {
        "mean_diff": diff,
        "rel_diff": pa["mean"] / pb["mean"] - 1,
        "pooled_std": pooled,
        "paired_diffs": paired,
        "paired_mean": statistics.fmean(paired),
        "paired_std": statistics.stdev(paired) if n > 1 else None,
        "t": t,
        "p": p,
        "significant": significant,
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
