"""Experiments built from several training runs: ``compare`` (Loss-Free vs auxiliary loss, and
the stronger auxiliary-loss baselines: :data:`COMPARE_RUNS`)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

from moebalance.lab.replay import replay_markdown, replay_runs
from moebalance.lab.reporting import maxvio_global_label, plot_loads, plot_maxvio_batch, plot_val_loss, short_run_note
from moebalance.lab.runs import RunFolderError, clear_refusal, damaged_run, folder_conflict, run_or_resume, run_state
from moebalance.lab.seeds import ppl_noise_verdict, seed_markdown, seed_summary
from moebalance.train.checkpoint import run_folder_problem, write_json, write_text
from moebalance.train.config import RunConfig, apply_overrides
from moebalance.train.data import prepare_data

log = logging.getLogger(__name__)

__all__ = [
    "COMPARE_RUNS", "DEFAULT_RUNS", "check_run_folders", "check_runs", "check_seeds", "compare", "compare_configs",
    "replaced_overrides", "resumable", "run_folders", "seed_configs",
]  # fmt: skip

REPORT_FIELDS = (
    "val_loss",
    "val_ppl",
    "maxvio_global",
    "maxvio_global_per_layer",
    "maxvio_batch_last",
    "tokens_per_s",
    "steps",
    "tokens",
)


# The figures every multi-run report draws (see compare / sweep), as markdown lines.
RUN_PLOTS_MARKDOWN = [
    "![MaxVio_batch during training](maxvio_batch.png)",
    "",
    "![validation loss](val_loss.png)",
    "",
    "![expert load at the end](expert_load.png)",
    "",
]


def prepare_base(base: RunConfig):
    """Tokens for a multi-run experiment, prepared once, and a copy of ``base`` whose
    ``model.vocab_size`` is the tokenizer's (so every run's config states it).

    Returns:
        ``(data, base_copy)``.
    """
    data = prepare_data(base.data)
    base = copy.deepcopy(base)
    base.model.vocab_size = data.vocab_size
    return data, base


def report_context(data, base: RunConfig, run_dirs: dict[str, Path], command: str | None) -> dict[str, Any]:
    """What every multi-run report states besides its runs: the data (fingerprint), the base config,
    the command that produced it, and the expert-parallel replay of the runs' measured loads."""
    return {
        "corpus_fingerprint": data.fingerprint,
        "data": data.describe(),
        "config": base.to_dict(),
        "command": command or " ".join(["moebalance"] + sys.argv[1:]),
        "ep_replay": replay_runs(run_dirs),
    }


#: The runs ``compare`` can train, by name: the overrides each puts on the base config (see
#: :func:`compare_configs`). ``loss_free`` and ``aux_loss`` are the paper's comparison (Table 2);
#: ``global_aux_loss`` is the global-batch auxiliary loss (Qiu et al., arXiv 2501.11873: ``f``
#: counted over all micro-batches and ranks), with the base ``balance.aux_loss_coeff``;
#: ``deepseek_v3`` is DeepSeek-V3's pairing (arXiv 2412.19437 §2.1.2): the Loss-Free bias plus a
#: sequence-wise loss at alpha = 1e-4. A claim that Loss-Free beats "the auxiliary loss" should
#: be made against these too.
COMPARE_RUNS = {
    "loss_free": ["balance.strategy=loss_free"],
    "aux_loss": ["balance.strategy=aux_loss"],
    "global_aux_loss": ["balance.strategy=global_aux_loss"],
    "deepseek_v3": ["balance.strategy=deepseek_v3", "balance.seq_aux_coeff=1e-4"],
}

#: The runs of a plain ``moebalance compare``: the paper's two.
DEFAULT_RUNS = ("loss_free", "aux_loss")


def check_runs(runs) -> tuple[str, ...]:
    """``runs`` as a tuple of names of :data:`COMPARE_RUNS`, in order.

    Raises:
        ValueError: an empty list, an unknown name (the message lists the choices) or a name twice.
    """
    names = tuple(runs)
    if not names:
        raise ValueError(f"--runs needs at least one run of {list(COMPARE_RUNS)}")
    unknown = [n for n in names if n not in COMPARE_RUNS]
    if unknown:
        raise ValueError(f"--runs: unknown run {unknown[0]!r}; choose from {list(COMPARE_RUNS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--runs names a run twice: {','.join(names)}")
    return names


def replaced_overrides(base: RunConfig, runs: dict[str, list[str]], keys: list[str]) -> list[str]:
    """Which of the user's override ``keys`` (already applied to ``base``) some run would replace
    with another value, as ``"run 'NAME' sets key=value"`` (the first such run of each key).

    ``runs``: run name -> that run's own overrides (:data:`COMPARE_RUNS`, or
    :func:`moebalance.lab.sweeps.grid_runs`). A run that sets a key to the value the user gave
    replaces nothing. The CLI refuses the command when the list is not empty: a value that no
    run (or not every run) trains with must not pass for one that was used.

    Raises:
        ValueError: a run's overrides do not apply to ``base`` (see :func:`apply_overrides`).
    """
    found: dict[str, str] = {}
    for name, overrides in runs.items():
        cfg = None
        for item in overrides:
            key = item.split("=", 1)[0]
            if key not in keys or key in found:
                continue
            cfg = apply_overrides(base, overrides) if cfg is None else cfg
            section, field = key.split(".")
            if getattr(getattr(cfg, section), field) != getattr(getattr(base, section), field):
                found[key] = f"run {name!r} sets {item}"
    return list(found.values())


def compare_configs(base: RunConfig, runs=DEFAULT_RUNS) -> dict[str, RunConfig]:
    """The runs ``runs`` (names of :data:`COMPARE_RUNS`; default the two of the paper's main
    comparison, arXiv 2408.15664 Table 2) from one base config.

    ``loss_free``: Algorithm 1 with ``base.balance.bias_update_rate`` (default 1e-3), no aux loss.
    ``aux_loss``: eq. 2 with ``base.balance.aux_loss_coeff`` (default 1e-3), no bias update.
    ``global_aux_loss``: the global-batch loss with that alpha; ``deepseek_v3``: the bias plus a
    sequence-wise loss at alpha = 1e-4. Everything else (model, seed, data order, initial
    weights) is shared.

    Raises:
        ValueError: see :func:`check_runs`, or a run's config out of range.
    """
    # Rebuilt, so every check runs on the config each run really uses, before any training.
    return {name: apply_overrides(base, COMPARE_RUNS[name]) for name in check_runs(runs)}


def _verdict(lf: dict[str, Any], aux: dict[str, Any], val_split: str | None = None) -> str:
    ppl = (
        f"Loss-Free reached a validation perplexity of {lf['val_ppl']:.2f} against {aux['val_ppl']:.2f} "
        f"for the auxiliary loss ({'lower' if lf['val_ppl'] < aux['val_ppl'] else 'not lower'}, "
        f"{100 * (lf['val_ppl'] / aux['val_ppl'] - 1):+.2f}%)"
    )
    bal = (
        f"and a {maxvio_global_label(val_split)} of {lf['maxvio_global']:.3f} against {aux['maxvio_global']:.3f} "
        f"({'better' if lf['maxvio_global'] < aux['maxvio_global'] else 'not better'} balanced)"
    )
    paper = "The paper reports 9.50 vs 9.56 perplexity and 0.04 vs 0.72 MaxVio_global at 1B parameters"
    if val_split == "files":
        paper += (
            ", measured on validation data of the training distribution; this validation split holds out whole "
            "files, another distribution, so its MaxVio is not the paper's metric (data.val_split=chunks is)"
        )
    return f"{ppl}, {bal}. {paper}."


def resumable(base: RunConfig) -> RunConfig:
    """``base`` with periodic checkpoints, so an interrupted multi-run experiment can continue.

    A ``train.checkpoint_every`` of 0 becomes ``max(1, max_steps // 10)``; a set value is kept.
    Checkpoints change nothing a step computes.
    """
    if base.train.checkpoint_every:
        return base
    d = base.to_dict()
    d["train"]["checkpoint_every"] = max(1, base.train.max_steps // 10)
    return RunConfig.from_dict(d)


#: The most seeds ``compare --seeds`` takes: 2,000 default runs are about a week on 2 CPU cores, and
#: a larger count is a typo (10**9 seeds once spent minutes building configs before any output).
MAX_SEEDS = 1000


def check_seeds(base: RunConfig, seeds: int) -> None:
    """Check ``compare --seeds N`` against ``base`` (the CLI calls it before any data is prepared).

    Raises:
        ValueError: ``seeds`` not an integer in ``[1, MAX_SEEDS]``, or a last seed ``base.train.seed + seeds - 1``
            beyond ``train.seed``'s range ``[0, 2**63)``.
    """
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"--seeds must be an integer in [1, {MAX_SEEDS}], got {seeds!r}")
    last = base.train.seed + seeds - 1
    if last >= 2**63:
        raise ValueError(
            f"--seeds {seeds} from train.seed={base.train.seed} needs seeds up to {last}, beyond train.seed's "
            f"range [0, 2**63); lower train.seed to at most {2**63 - seeds}"
        )


def seed_configs(base: RunConfig, seeds: int, runs=DEFAULT_RUNS) -> dict[str, RunConfig]:
    """Every run of ``compare --seeds N [--runs ...]``: run name -> config, seeds ``base.train.seed + i``.

    With one seed the names are the runs' (``loss_free``, ``aux_loss``, ...); with more,
    ``seed_S/NAME`` (so a single-seed folder never holds another run's folder). Within a seed
    all runs share initial weights and batches.

    Raises:
        ValueError: see :func:`check_seeds`.
    """
    check_seeds(base, seeds)
    out = {}
    for i in range(seeds):
        d = base.to_dict()
        d["train"]["seed"] = base.train.seed + i
        for name, cfg in compare_configs(RunConfig.from_dict(d), runs).items():
            out[name if seeds == 1 else f"seed_{cfg.train.seed}/{name}"] = cfg
    return out


def compare(
    base: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
    command: str | None = None,
    seeds: int = 1,
    overwrite: bool = False,
    runs=DEFAULT_RUNS,
) -> dict[str, Any]:
    """Train the runs ``runs`` of :func:`compare_configs` (default ``loss_free`` and ``aux_loss``)
    for ``seeds`` seeds and write the report.

    Resumable (:func:`~moebalance.lab.runs.run_or_resume`): a re-run reads finished runs back,
    continues unfinished ones from their checkpoints (:func:`resumable` turns them on) and refuses
    a folder that holds another config unless ``overwrite``; every folder is checked before the
    first run trains.

    Writes into ``out_dir``: ``report.json``, ``report.md``, ``maxvio_batch.png``, ``val_loss.png``,
    ``expert_load.png``, and one sub-folder per run (``seed_S/STRATEGY`` with several seeds) with
    its metrics, TensorBoard events and checkpoints.

    Returns:
        the ``report.json`` content; with ``seeds > 1`` it adds ``seed_summary`` (see
        :func:`~moebalance.lab.seeds.seed_summary`, per run name) and ``ppl_noise`` (see
        :func:`~moebalance.lab.seeds.ppl_noise_verdict`: ``loss_free`` against ``aux_loss``),
        and ``ppl_noise_vs`` (``loss_free`` against each other baseline run), when those runs are there.

    Raises:
        RunFolderError: a run folder holds another config and ``overwrite`` is false.
    """
    out = Path(out_dir)
    data, base = prepare_base(base)
    base = resumable(base)
    configs = seed_configs(base, seeds, runs)  # validates every run before the first one starts
    run_dirs = run_folders(out, configs)
    check_run_folders({name: (cfg, run_dirs[name]) for name, cfg in configs.items()}, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        res, state = run_or_resume(cfg, run_dirs[name], data, overwrite, progress, desc=name)
        results[name] = {k: res[k] for k in REPORT_FIELDS} | {
            "balance": cfg.balance.__dict__.copy(),
            "run_dir": run_dirs[name].relative_to(out).as_posix(),
            "run": name.rsplit("/", 1)[-1],
            "seed": cfg.train.seed,
            "state": state,
        }
    plot_maxvio_batch(run_dirs, out / "maxvio_batch.png")
    plot_val_loss(run_dirs, out / "val_loss.png")
    plot_loads(run_dirs, out / "expert_load.png")
    report = report_context(data, base, run_dirs, command) | {"seeds": sorted({r["seed"] for r in results.values()})}
    report["runs"] = results
    report["short_run_note"] = short_run_note({name: configs[name] for name in configs if name.endswith("loss_free")})
    if seeds > 1:
        summary = report["seed_summary"] = seed_summary(results)
        if "loss_free" in summary and "aux_loss" in summary:
            report["ppl_noise"] = ppl_noise_verdict(summary)
        others = [n for n in summary if n not in ("loss_free", "aux_loss")]
        if "loss_free" in summary and others:
            report["ppl_noise_vs"] = {n: ppl_noise_verdict(summary, "loss_free", n) for n in others}
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_compare_markdown(report))
    return report


def run_folders(out: Path, configs: dict[str, RunConfig]) -> dict[str, Path]:
    """The folder of each run of :func:`seed_configs`: ``out/NAME``, or the same run's folder under
    the other naming (``STRATEGY`` of a one-seed compare, ``seed_S/STRATEGY`` of a several-seed
    one) when ``out/NAME`` holds no run and that folder holds this config's run, finished or
    resumable (:func:`~moebalance.lab.runs.run_state`). So ``make demo`` then ``make demo
    ARGS="--seeds 3"`` trains seed 1234 once: its two runs are read back where the first command
    left them.
    """
    folders = {}
    for name, cfg in configs.items():
        strategy = name.rsplit("/", 1)[-1]
        folder, other = out / name, out / (strategy if "/" in name else f"seed_{cfg.train.seed}/{strategy}")
        if run_state(folder, cfg) == "new" and run_state(other, cfg) in ("finished", "resume"):
            log.info("%s: the same run is in %s; reading it from there", folder, other)
            folder = other
        folders[name] = folder
    return folders


def check_run_folders(plan: dict[str, tuple[RunConfig, Path]], overwrite: bool) -> None:
    """Refuse, before anything trains, when a run folder of ``plan`` holds another config.

    Raises:
        RunFolderError: the first conflicting folder, unless ``overwrite``; with ``overwrite``, the
            first folder that cannot be cleared (:func:`~moebalance.lab.runs.clear_refusal`); a
            run to read back or continue with a damaged file (:func:`~moebalance.lab.runs.damaged_run`).
    """
    for name, (cfg, run_dir) in plan.items():
        if overwrite:  # run_folder_problem's checks, and the config.json's
            error = clear_refusal(run_dir)
        else:
            error = folder_conflict(run_dir, cfg, name)
            problem = None if error is not None else run_folder_problem(run_dir)
            if problem is not None:
                error = RunFolderError(f"{problem} (choose another --out)")
        error = error or damaged_run(run_dir, cfg)  # a run read back or resumed: its files first
        if error is not None:
            raise error


def render_compare_markdown(report: dict[str, Any]) -> str:
    """The human summary of a ``compare`` report (table, verdict, plots)."""
    runs = report["runs"]
    cfg = report["config"]
    m, t = cfg["model"], cfg["train"]
    val_split = report["data"].get("val_split")
    label = maxvio_global_label(val_split)
    lines = [
        "# moebalance compare: Loss-Free Balancing vs auxiliary loss",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: {m['n_layers']} layers, d_model {m['d_model']}, {m['num_experts']} experts (top-{m['top_k']}, "
        f"{m['score_func']} gate), expert hidden {m['d_expert']}. Training: {t['max_steps']} steps of "
        f"{t['batch_size'] * t['grad_accum']} x {t['seq_len']} tokens, "
        f"seed{'s' if len(report.get('seeds', [])) > 1 else ''} {', '.join(str(x) for x in report.get('seeds', [t['seed']]))}.",
        f"Data: {report['data']['source']} (fingerprint `{report['corpus_fingerprint']}`, "
        f"{report['data']['train_tokens']:,} train / {report['data']['val_tokens']:,} validation tokens, "
        f"validation split `{val_split}`).",
        "",
        f"| run | val loss | val ppl | {label} | MaxVio_batch (last 10%) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['maxvio_global']:.3f} | "
            f"{r['maxvio_batch_last']:.3f} | {r['tokens_per_s']:.0f} |"
        )
    if report.get("short_run_note"):
        lines += ["", report["short_run_note"]]
    lines += ["", f"{label} per layer:", ""]
    for name, r in runs.items():
        lines.append(f"- {name}: " + ", ".join(f"{v:.3f}" for v in r["maxvio_global_per_layer"]))
    if "loss_free" in runs and "aux_loss" in runs:
        lines += ["", _verdict(runs["loss_free"], runs["aux_loss"], val_split)]
    if "seed_summary" in report:
        lines += [""] + seed_markdown(report["seed_summary"], report.get("ppl_noise"), label)
        for verdict in report.get("ppl_noise_vs", {}).values():
            lines += ["", verdict["text"]]
    if "ep_replay" in report:
        lines += [""] + replay_markdown(report["ep_replay"])
    lines += [""] + RUN_PLOTS_MARKDOWN + [
        "TensorBoard: `tensorboard --logdir " + "` / `".join(f"{r['run_dir']}/tb" for r in runs.values()) + "` "
        "(relative to this folder).",
        "",
    ]
    return "\n".join(lines)
