"""The batch-size study (``moebalance sweep batch-size``): balance against tokens per step.

Every balancing method of :data:`STUDY_METHODS` (the bias rules of :mod:`moebalance.rules` and
the auxiliary-loss baselines) trains once at each of several tokens per step, all on the same
number of tokens in total (the base config's ``max_steps * tokens per step``): a step of ``T``
tokens runs ``total / T`` steps. What changes with ``T`` besides the batch: the step count, and
with it the warm-up, the evaluation and the logging intervals, all scaled to stay at the same
token counts. The learning rate is the base config's at every ``T`` (nothing is retuned: the
question is what the balancing does, and a rule that needs a retuned rate per batch size says so
in the table).

Run names: ``METHOD_tT`` (``sign_t1024``); with ``seeds > 1`` the base size also trains
``METHOD_tT_seedS`` for the next ``seeds - 1`` seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moebalance.lab.floor import floor_of, load_frozen, sampling_floor
from moebalance.lab.reporting import load_metrics, moving_average, plot_against_size, run_colours
from moebalance.lab.seeds import seed_stats
from moebalance.train.checkpoint import write_json, write_text
from moebalance.train.config import RunConfig, apply_overrides
from moebalance.train.runfiles import read_json_object

__all__ = [
    "BIAS_METHODS", "DEFAULT_TOKENS_PER_STEP", "DERIVED_KEYS", "STUDY_METHODS", "base_tokens_per_step",
    "batch_size_runs", "check_tokens_per_step", "floor_weights_size", "method_overrides", "noise_floor",
    "parse_run_name", "recovery_tokens", "recovery_window", "render_study_markdown", "run_fields", "seed_rows",
    "study_floors", "study_report",
]  # fmt: skip

#: Tokens per step of the study: from 256 (2 sequences of 128) to 20,480 (160 sequences), each a
#: divisor of the default run's 614,400 tokens (600 steps of 8 x 128).
DEFAULT_TOKENS_PER_STEP = (256, 512, 1024, 2048, 4096, 8192, 20480)

_LF = ["balance.strategy=loss_free", "balance.bias_mode=additive", "balance.bias_update_schedule=constant"]

#: The methods of the study: name -> overrides. The bias rules at their usual settings: ``sign``
#: (Algorithm 1, u = 1e-3), ``error`` (§5 ablation, same u), ``smebu`` (u = 1e-3, kappa 2, momentum
#: 0.5), ``proportional`` (uniform target, u = E * 1e-3: exactly the step of ``error``, set by
#: :func:`method_overrides`), ``quantile`` (Megatron-LM's micro-batch estimator, ema 0.9) and
#: ``quantile_pooled`` (the exact quantile over the last 8 steps' scores, ema 0.9); the
#: auxiliary-loss baselines: ``aux_loss``
#: (eq. 2, alpha 1e-3), ``global_aux_loss`` (Qiu et al., alpha 1e-3) and ``deepseek_v3`` (sign rule
#: + sequence-wise loss at 1e-4).
STUDY_METHODS = {
    "sign": _LF + ["balance.bias_update=sign", "balance.bias_update_rate=1e-3"],
    "error": _LF + ["balance.bias_update=error", "balance.bias_update_rate=1e-3"],
    "smebu": _LF + ["balance.bias_update=smebu", "balance.bias_update_rate=1e-3"],
    "proportional": _LF + ["balance.bias_update=proportional", "balance.target_load="],
    "quantile": _LF + ["balance.bias_update=quantile", "balance.qb_estimator=microbatch", "balance.qb_ema=0.9", "balance.qb_window=1"],
    "quantile_pooled": _LF + ["balance.bias_update=quantile", "balance.qb_estimator=pooled", "balance.qb_ema=0.9", "balance.qb_window=8"],
    "aux_loss": ["balance.strategy=aux_loss", "balance.aux_loss_coeff=1e-3"],
    "global_aux_loss": ["balance.strategy=global_aux_loss", "balance.aux_loss_coeff=1e-3"],
    "deepseek_v3": ["balance.strategy=deepseek_v3", "balance.bias_update=sign", "balance.bias_update_rate=1e-3", "balance.seq_aux_coeff=1e-4"],
}

#: The keys each run derives from the base config's value (scaled to its size, or the next seeds):
#: the user's value sets the base run, so it is not "replaced" (``compare.replaced_overrides``).
DERIVED_KEYS = ("train.batch_size", "train.max_steps", "train.warmup_steps", "train.eval_every", "train.log_every", "train.seed")

#: The most extra seeds the study trains at the base size (``--seeds``).
MAX_STUDY_SEEDS = 10


def method_overrides(method: str, base: RunConfig) -> list[str]:
    """The overrides of study method ``method`` on ``base``: :data:`STUDY_METHODS`'s, plus for
    ``proportional`` the rate ``u = E * 1e-3`` (``E = base.model.num_experts``), at which its step
    with a uniform target, ``u * (1/E - c_i / sum c)``, equals ``error``'s at ``1e-3``.

    Raises:
        KeyError: not a study method.
    """
    overrides = list(STUDY_METHODS[method])
    if method == "proportional":
        overrides.append(f"balance.bias_update_rate={base.model.num_experts * 1e-3!r}")
    return overrides


def base_tokens_per_step(base: RunConfig) -> int:
    """Tokens of one optimizer step of ``base``: ``batch_size * grad_accum * seq_len``."""
    t = base.train
    return t.batch_size * t.grad_accum * t.seq_len


def check_tokens_per_step(base: RunConfig, sizes) -> tuple[int, ...]:
    """``sizes`` as a sorted tuple, checked against ``base``.

    Raises:
        ValueError: an empty list, a size twice, or a size that is not a multiple of
            ``seq_len * grad_accum`` or does not divide the base run's total tokens
            (``max_steps * tokens per step``); the message names ``--tokens-per-step``.
    """
    sizes = tuple(sizes)
    t = base.train
    total = t.max_steps * base_tokens_per_step(base)
    unit = t.seq_len * t.grad_accum
    if not sizes:
        raise ValueError("--tokens-per-step needs at least one size")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--tokens-per-step names a size twice: {sizes}")
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size < unit or size % unit or total % size:
            raise ValueError(
                f"--tokens-per-step: each size must be a multiple of train.seq_len * train.grad_accum = {unit} "
                f"that divides the base run's {total} tokens (train.max_steps * tokens per step), got {size!r}"
            )
    return tuple(sorted(sizes))


def _size_overrides(base: RunConfig, size: int) -> list[str]:
    """The ``train.*`` overrides that make ``base`` a run of ``size`` tokens per step on the same
    total tokens, with warm-up, evaluation and logging at the same token counts."""
    t = base.train
    base_size = base_tokens_per_step(base)
    steps = t.max_steps * base_size // size

    def scaled(n: int) -> int:  # 0 (no warm-up) stays 0
        return 0 if n == 0 else max(1, min(steps, round(n * base_size / size)))

    return [
        f"train.batch_size={size // (t.seq_len * t.grad_accum)}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={scaled(t.warmup_steps)}",
        f"train.eval_every={scaled(t.eval_every)}",
        f"train.log_every={scaled(t.log_every)}",
    ]


def batch_size_runs(base: RunConfig, sizes=None, seeds: int = 1) -> dict[str, list[str]]:
    """The study's runs: name -> overrides on ``base`` (see the module docstring).

    Args:
        base: the shared config; its tokens per step is the base size, its ``max_steps`` times
            that the total tokens of every run.
        sizes: tokens per step (default :data:`DEFAULT_TOKENS_PER_STEP`), see
            :func:`check_tokens_per_step`.
        seeds: seeds at the base size, 1 to :data:`MAX_STUDY_SEEDS` (the extra ones:
            ``train.seed + 1``, ...).

    Raises:
        ValueError: see :func:`check_tokens_per_step`; ``seeds`` out of range, or more than one
            seed with the base size not among ``sizes``.
    """
    if sizes is None:
        try:
            sizes = check_tokens_per_step(base, DEFAULT_TOKENS_PER_STEP)
        except ValueError as exc:
            raise ValueError(f"{exc} (a size of the default list {','.join(map(str, DEFAULT_TOKENS_PER_STEP))}: give --tokens-per-step for this config)") from None
    else:
        sizes = check_tokens_per_step(base, sizes)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_STUDY_SEEDS:
        raise ValueError(f"--seeds must be an integer in [1, {MAX_STUDY_SEEDS}], got {seeds!r}")
    base_size = base_tokens_per_step(base)
    if seeds > 1 and base_size not in sizes:
        raise ValueError(
            f"--seeds {seeds} trains its extra seeds at the base run's {base_size} tokens per step "
            f"(train.batch_size * train.grad_accum * train.seq_len), which --tokens-per-step leaves out: add it"
        )
    runs: dict[str, list[str]] = {}
    for method in STUDY_METHODS:
        for size in sizes:
            runs[f"{method}_t{size}"] = method_overrides(method, base) + _size_overrides(base, size)
    if seeds > 1:
        for method in STUDY_METHODS:
            for seed in range(base.train.seed + 1, base.train.seed + seeds):
                runs[f"{method}_t{base_size}_seed{seed}"] = method_overrides(method, base) + _size_overrides(base, base_size) + [f"train.seed={seed}"]
    return runs


# ---------------------------------------------------------------------------------------------
# The study's report: tables and plots against tokens per step, the noise floor, the frozen floor.

#: MaxVio_batch at or below which a run has recovered from the early routing collapse: no expert
#: above twice its fair share (mean over layers), on a moving average over :data:`RECOVERY_WINDOW`
#: tokens.
RECOVERY_THRESHOLD = 1.0
RECOVERY_WINDOW = 20480

#: Bias updates of each frozen-weight floor, and the validation tokens of each of its scores.
FLOOR_UPDATES = 300
FLOOR_EVAL_TOKENS = 131072


def parse_run_name(name: str) -> tuple[str, int, int | None]:
    """``(method, tokens per step, seed or None)`` of a study run name (``sign_t1024``,
    ``sign_t1024_seed1235``).

    Raises:
        ValueError: not a study run name.
    """
    head, _, seed = name.partition("_seed")
    method, _, size = head.rpartition("_t")
    if method not in STUDY_METHODS or not size.isdigit() or (seed and not seed.isdigit()):
        raise ValueError(f"{name!r} is not a batch-size study run (METHOD_tT or METHOD_tT_seedS)")
    return method, int(size), int(seed) if seed else None


def recovery_window(total_tokens: int) -> int:
    """Tokens of the moving average of :func:`recovery_tokens`: :data:`RECOVERY_WINDOW`, or a
    thirtieth of a shorter run's tokens (a window longer than the run would measure nothing)."""
    return max(1, min(RECOVERY_WINDOW, total_tokens // 30))


def recovery_tokens(maxvio_batch: list[float], size: int, window_tokens: int = RECOVERY_WINDOW) -> int | None:
    """Tokens trained until MaxVio_batch, averaged over the last ``window_tokens`` tokens, first
    falls to :data:`RECOVERY_THRESHOLD` after its peak; ``None`` if it never does.

    Args:
        maxvio_batch: the run's MaxVio_batch at steps 1, 2, ... (one value per step).
        size: tokens per step.
        window_tokens: tokens of the moving average (:func:`recovery_window`).
    """
    if not maxvio_batch:
        return None
    window = max(1, window_tokens // size)
    smooth = moving_average(maxvio_batch, window)
    peak = max(range(len(smooth)), key=smooth.__getitem__)
    for i in range(peak, len(smooth)):
        if smooth[i] <= RECOVERY_THRESHOLD:
            return (i + 1) * size
    return None


def noise_floor(size: int, num_experts: int, top_k: int, n_layers: int, draws: int = 64, seed: int = 0) -> float:
    """Expected MaxVio_batch (mean over layers) of routing that is balanced in expectation: each of
    ``size`` tokens picks ``top_k`` distinct experts uniformly at random, independently per layer.

    No rule that sees only a batch can do better on average: a batch's loads scatter around their
    mean by ``sqrt(T K / E)`` even when every expert's expected load is equal (MaxVio, arXiv
    2408.15664 §4.1, eq. 5). Monte Carlo over ``draws`` batches per layer (numpy, fixed seed).
    """
    rng = np.random.default_rng(seed)
    vios = []
    for _ in range(draws * n_layers):
        choice = np.argsort(rng.random((size, num_experts)), axis=1)[:, :top_k]
        loads = np.bincount(choice.ravel(), minlength=num_experts)
        vios.append(loads.max() / loads.mean() - 1)
    return float(np.mean(vios))


#: The methods with a bias rule of their own (a frozen-weight floor); ``deepseek_v3``'s rule is ``sign``.
BIAS_METHODS = tuple(m for m, o in STUDY_METHODS.items() if "balance.strategy=loss_free" in o)


def run_fields(record: dict[str, Any], run_dir: Path, size: int, window_tokens: int = RECOVERY_WINDOW) -> dict[str, Any]:
    """What the study reads from a finished run besides ``record`` (``compare``'s fields): the mean
    MaxVio_batch over the last quarter of the steps, the tokens to recover from the early collapse
    (:func:`recovery_tokens`) and the training time in seconds (tokens / tokens per second)."""
    train, _ = load_metrics(run_dir)
    vio = [r["maxvio_batch"] for r in train]
    tail = vio[len(vio) * 3 // 4 :] or vio
    return {
        "maxvio_batch_end": float(np.mean(tail)) if tail else float("nan"),
        "recovery_tokens": recovery_tokens(vio, size, window_tokens),
        "train_s": record["tokens"] / record["tokens_per_s"] if record["tokens_per_s"] else float("nan"),
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _valid_entry(entry: Any) -> bool:
    """A ``floor.json`` entry as :func:`study_floors` writes it; anything else is measured again."""
    return (
        isinstance(entry, dict)
        and _finite(entry.get("floor"))
        and _finite(entry.get("time_s"))
        and isinstance(entry.get("curve"), list)
        and all(isinstance(c, dict) and _finite(c.get("maxvio_global")) for c in entry["curve"])
    )


def _valid_sampling(sampling: Any) -> bool:
    """``floor.json``'s ``sampling`` as :func:`study_floors` writes it; anything else is measured again."""
    fields = ("floor", "std", "measured", "chunks", "tokens")
    return isinstance(sampling, dict) and all(
        isinstance(sampling.get(w), dict) and all(_finite(sampling[w].get(f)) for f in fields) for w in ("slice", "split")
    )


def floor_weights_size(sizes, base_size: int) -> int:
    """The tokens per step of the ``sign`` run whose weights every floor uses: the base size, or
    the study's size nearest to it (on a log scale; the smaller on a tie)."""
    return min(sizes, key=lambda t: (abs(np.log2(t / base_size)), t))


def study_floors(out: Path, run_dirs: dict[str, Path], base: RunConfig, sizes, data, progress: bool = True) -> dict[str, Any]:
    """The frozen-weight floor (:func:`moebalance.lab.floor.floor_of`) of every rule of
    :data:`BIAS_METHODS` at every size, on the weights of the base size's ``sign`` run (or the
    nearest size's: :func:`floor_weights_size`; the same weights for every rule), :data:`FLOOR_UPDATES` updates each. Kept in ``out/floor.json`` entry by
    entry: an interrupted study continues where it stopped; a file made with other settings or
    other weights, and an entry that is not what this function writes (damaged, wrong types,
    non-finite), is measured again.

    Also the validation split's own floor on those weights (:func:`~moebalance.lab.floor.sampling_floor`):
    ``"sampling": {"slice": ... on the floors' validation tokens, "split": ... on the whole split}``.

    Returns:
        ``{"weights": run name, "updates", "eval_tokens", "entries": {METHOD_tT: {"floor", "curve",
        "time_s"}}, "sampling"}``; no entries and no ``sampling`` when the base size's ``sign`` run
        is not in ``run_dirs``.
    """
    weights = f"sign_t{floor_weights_size(sizes, base_tokens_per_step(base))}"
    key = {"weights": weights, "updates": FLOOR_UPDATES, "eval_tokens": FLOOR_EVAL_TOKENS}
    if weights not in run_dirs:
        return key | {"entries": {}}
    key["weights_summary"] = read_json_object(run_dirs[weights] / "summary.json").get("val_loss")
    path = out / "floor.json"
    try:
        cached = read_json_object(path) if path.exists() else {}
    except ValueError:  # damaged: recomputed
        cached = {}
    same = all(cached.get(k) == v for k, v in key.items())
    entries = {k: e for k, e in cached.get("entries", {}).items() if _valid_entry(e)} if same and isinstance(cached.get("entries"), dict) else {}
    sampling = cached.get("sampling") if same and _valid_sampling(cached.get("sampling")) else None
    if sampling is None:  # the validation split's own floor, on the weights' routing
        model, cfg, _ = load_frozen(run_dirs[weights], data=data)
        sampling = {"slice": sampling_floor(model, data, cfg, FLOOR_EVAL_TOKENS), "split": sampling_floor(model, data, cfg, 0)}
        write_json(path, key | {"entries": entries, "sampling": sampling})
    todo = [(m, t) for m in BIAS_METHODS for t in sizes if f"{m}_t{t}" not in entries]
    for method, size in tqdm(todo, desc="frozen-weight floors", disable=not progress or not todo):
        balance = apply_overrides(base, method_overrides(method, base)).balance
        start = time.perf_counter()
        res = floor_of(run_dirs[weights], balance, size // base.train.seq_len, FLOOR_UPDATES, FLOOR_EVAL_TOKENS, data)
        entries[f"{method}_t{size}"] = res | {"time_s": time.perf_counter() - start}
        write_json(path, key | {"entries": entries, "sampling": sampling})
    return key | {"entries": entries, "sampling": sampling}


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float) and not np.isfinite(value):
        return "–"
    return {"vio": f"{value:.3f}", "ppl": f"{value:.2f}", "tokens": f"{value / 1000:.0f}k"}[kind]


def _size_table(rows: dict[str, dict], sizes, field: str, kind: str, methods) -> list[str]:
    """A markdown table: one row per method, one column per size, the base seed's ``field``."""
    lines = ["| method | " + " | ".join(f"T = {t}" for t in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in methods:
        cells = [_fmt(rows[f"{method}_t{t}"][field], kind) if f"{method}_t{t}" in rows else "–" for t in sizes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def seed_rows(rows: dict[str, dict], size: int) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per method, the mean, standard deviation (``ddof=1``; 0 for one seed) and count over the
    seeds at ``size`` of MaxVio_global, the end MaxVio_batch and validation perplexity."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method in STUDY_METHODS:
        runs = [r for r in rows.values() if r["method"] == method and r["size"] == size]
        if not runs:
            continue
        out[method] = {}
        for field in ("maxvio_global", "maxvio_batch_end", "val_ppl"):
            stats = seed_stats([r[field] for r in runs])
            out[method][field] = (stats["mean"], stats["std"] or 0.0, len(runs))
    return out


def _seed_table(seeds: dict[str, dict[str, tuple[float, float, int]]]) -> list[str]:
    lines = ["| method | seeds | MaxVio_global | MaxVio_batch (last quarter) | val ppl |", "|---|---|---|---|---|"]
    for method, f in seeds.items():
        g, b, p = f["maxvio_global"], f["maxvio_batch_end"], f["val_ppl"]
        lines.append(f"| {method} | {g[2]} | {g[0]:.3f} ± {g[1]:.3f} | {b[0]:.3f} ± {b[1]:.3f} | {p[0]:.2f} ± {p[1]:.2f} |")
    return lines


def _slice_tokens(floors: dict[str, Any]) -> int:
    """Validation tokens of each floor score: the slice actually read (a split may be shorter)."""
    sampling = floors.get("sampling")
    return sampling["slice"]["tokens"] if sampling else floors["eval_tokens"]


def _sampling_row(floors: dict[str, Any], which: str, n_sizes: int) -> list[str]:
    """The table row "perfect balance, as measured" (:func:`~moebalance.lab.floor.sampling_floor`), or none."""
    sampling = floors.get("sampling")
    if not sampling:
        return []
    f = sampling[which]
    return ["| perfect balance, as measured | " + " | ".join([f"{f['floor']:.3f} ± {f['std']:.3f}"] * n_sizes) + " |"]


def render_study_markdown(report: dict[str, Any]) -> str:
    """The study's ``study.md``: setting and command, one table per measure (methods x tokens per
    step), the seed spread at the base size, the plots."""
    cfg, sizes, rows = report["config"], report["sizes"], report["rows"]
    m, t = cfg["model"], cfg["train"]
    base = report["base_tokens_per_step"]
    floors = report["floors"]
    lines = [
        "# Balance against tokens per step (`moebalance sweep batch-size`)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: {m['n_layers']} layers, d_model {m['d_model']}, {m['num_experts']} experts (top-{m['top_k']}), "
        f"vocabulary {m['vocab_size']}. Every run trains {report['total_tokens']:,} tokens: T tokens per step for "
        f"{report['total_tokens']:,} / T steps, learning rate {t['lr']:g} at every T, warm-up, evaluation and logging "
        f"at the same token counts. Seed {t['seed']}; at T = {base} also {report['seeds'] - 1} more seed(s).",
        f"Data: {report['data']['source']} (fingerprint `{report['corpus_fingerprint']}`). "
        f"Time: {report['train_s'] / 60:.1f} min of training over {len(rows)} runs, "
        f"{report['floor_s'] / 60:.1f} min of frozen-weight floors (one process each, `train.threads` = {t['threads']}).",
        "",
        "## MaxVio_global at the end of training (validation split)",
        "",
        *_size_table(rows, sizes, "maxvio_global", "vio", STUDY_METHODS),
        *_sampling_row(floors, "split", len(sizes)),
        "",
        "## MaxVio_batch, mean over the last quarter of the steps",
        "",
        *_size_table(rows, sizes, "maxvio_batch_end", "vio", STUDY_METHODS),
        "| uniform random routing | " + " | ".join(f"{report['noise_floor'][str(s)]:.3f}" for s in sizes) + " |",
        "",
        f"## Tokens until MaxVio_batch first falls to {RECOVERY_THRESHOLD:g} after the early collapse "
        f"(moving average over {report['recovery_window']:,} tokens)",
        "",
        *_size_table(rows, sizes, "recovery_tokens", "tokens", STUDY_METHODS),
        "",
        "## Validation perplexity",
        "",
        *_size_table(rows, sizes, "val_ppl", "ppl", STUDY_METHODS),
        "",
        f"## Floor with frozen weights: MaxVio_global after {floors['updates']} bias-only updates of T tokens",
        "",
        f"Weights of `{floors['weights']}`, for every rule; mean of the scores after 1/2, 3/4 and all of the "
        f"updates, each on the same {_slice_tokens(floors):,} validation tokens.",
        "",
        *_size_table({k: {"floor": v["floor"]} for k, v in floors["entries"].items()}, sizes, "floor", "vio", BIAS_METHODS),
        *_sampling_row(floors, "slice", len(sizes)),
        "",
        "Perfect balance, as this validation set measures it: the MaxVio_global that routing balanced exactly "
        "on the distribution the validation chunks are drawn from would show on them (mean ± std of a bootstrap "
        "over the chunks, on the weights above; `moebalance.lab.floor.sampling_floor`).",
        "",
        f"## Seeds at T = {base}",
        "",
        *_seed_table(report["seed_spread"]),
        "",
        "![MaxVio_global against tokens per step](maxvio_global_vs_tokens.png)",
        "",
        "![MaxVio_batch against tokens per step](maxvio_batch_vs_tokens.png)",
        "",
        "![frozen-weight floor against tokens per step](floor_vs_tokens.png)",
        "",
        "![validation perplexity against tokens per step](ppl_vs_tokens.png)",
    ]
    return "\n".join(lines) + "\n"


def _plots(out: Path, report: dict[str, Any]) -> None:
    """The study's four figures (metric against tokens per step, one line per method)."""
    rows, floors = report["rows"], report["floors"]["entries"]

    def series(field: str, methods, table=rows) -> dict[str, dict[int, float]]:
        return {m: {t: table[f"{m}_t{t}"][field] for t in report["sizes"] if f"{m}_t{t}" in table} for m in methods}

    noise = ("uniform random routing", {int(k): v for k, v in report["noise_floor"].items()})
    sampling = report["floors"].get("sampling")
    measured = lambda which: ("perfect balance, as measured", dict.fromkeys(report["sizes"], sampling[which]["floor"])) if sampling else None  # noqa: E731
    c = run_colours(STUDY_METHODS)
    plot_against_size(series("maxvio_global", STUDY_METHODS), out / "maxvio_global_vs_tokens.png", "MaxVio_global (validation)",
                      "Balance at the end of training, same tokens in total", reference=measured("split"), colours=c)
    plot_against_size(series("maxvio_batch_end", STUDY_METHODS), out / "maxvio_batch_vs_tokens.png", "MaxVio_batch (last quarter of the steps)",
                      "Balance of each step's batch", reference=noise, colours=c)
    plot_against_size(series("floor", BIAS_METHODS, floors), out / "floor_vs_tokens.png", "MaxVio_global (validation slice)",
                      "Floor of each rule with frozen weights", reference=measured("slice"), colours=c)
    plot_against_size(series("val_ppl", STUDY_METHODS), out / "ppl_vs_tokens.png", "validation perplexity",
                      "Quality, same tokens in total", log_y=False, colours=c)


def study_report(
    out: Path,
    records: dict[str, dict[str, Any]],
    run_dirs: dict[str, Path],
    base: RunConfig,
    data,
    context: dict[str, Any],
    sizes,
    seeds: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure and write the study: ``sweep.json``, ``sweep.md`` (:func:`render_study_markdown`),
    ``floor.json`` (:func:`study_floors`) and four plots in ``out``.

    Args:
        records: run name -> ``compare``'s fields of each finished run (``sweep``'s records).
        run_dirs: run name -> run folder. context: the report's shared fields
            (:func:`~moebalance.lab.compare.report_context`).

    Returns:
        the ``sweep.json`` content: ``context`` plus ``grid``, ``sizes``, ``rows`` (per run:
        method, size, seed, ``val_ppl``, ``maxvio_global``, ``maxvio_batch_end``,
        ``recovery_tokens``, ``train_s``), ``floors``, ``noise_floor``, ``seed_spread``, ``runs``.
    """
    rows = {}
    window = recovery_window(base.train.max_steps * base_tokens_per_step(base))
    for name, rec in records.items():
        method, size, seed = parse_run_name(name)
        rows[name] = {"method": method, "size": size, "seed": seed or base.train.seed}
        rows[name] |= {k: rec[k] for k in ("val_ppl", "maxvio_global", "tokens", "tokens_per_s")} | run_fields(rec, run_dirs[name], size, window)
    sizes = sorted({r["size"] for r in rows.values()} if sizes is None else sizes)
    floors = study_floors(out, run_dirs, base, sizes, data, progress)
    m, base_size = base.model, base_tokens_per_step(base)
    report = context | {
        "grid": "batch-size",
        "sizes": sizes,
        "seeds": seeds,
        "base_tokens_per_step": base_size,
        "total_tokens": base.train.max_steps * base_size,
        "recovery_window": window,
        "noise_floor": {str(s): noise_floor(s, m.num_experts, m.top_k, m.n_layers - m.first_dense_layers) for s in sizes},
        "rows": rows,
        "floors": floors,
        "train_s": sum(r["train_s"] for r in rows.values()),
        "floor_s": sum(e["time_s"] for e in floors["entries"].values()),
        "seed_spread": seed_rows(rows, base_size),
        "runs": records,
    }
    _plots(out, report)
    write_json(out / "sweep.json", report)
    write_text(out / "sweep.md", render_study_markdown(report))
    return report
