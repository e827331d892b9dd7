"""Grids of training runs that differ only in their balancing (``moebalance sweep GRID``).

Every run of a grid shares the base config's model size, seed, data order and initial weights;
each run is the base config plus a few ``section.field=value`` overrides (the same syntax as the
CLI). A sweep is resumable (:func:`~moebalance.lab.runs.run_or_resume`): a finished run of the
same config is read back, not trained again; an unfinished one continues from its checkpoints
(turned on by :func:`~moebalance.lab.compare.resumable`); a folder that holds another config is
refused, before anything trains, unless ``overwrite``.

Built-in grids (arXiv 2408.15664):

* ``alpha``: auxiliary loss with alpha in {0, 1e-4, 1e-3, 1e-2} and Loss-Free with u = 1e-3
  (Figure 2: validation perplexity against MaxVio_global);
* ``update-rate``: Loss-Free with u in {1e-4, 1e-3, 1e-2} (§5 ablation, MaxVio_batch curves);
* ``variants``: Loss-Free with one change at a time: ``error`` update, multiplicative bias,
  softmax gate (§5 ablations);
* ``strategies``: every strategy of :data:`moebalance.balancing.STRATEGIES` at its usual setting,
  plus the z-loss, group-limited routing and Expert Choice.

Output folder: ``sweep.json`` (one record per run with the fields of ``compare``'s
``report.json``, plus the overrides), ``sweep.md``, ``tradeoff.png``, ``maxvio_batch.png``,
``val_loss.png``, ``expert_load.png`` and one sub-folder per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moebalance.lab.batch_size import batch_size_runs, study_report
from moebalance.lab.compare import (
    REPORT_FIELDS,
    RUN_PLOTS_MARKDOWN,
    check_run_folders,
    prepare_base,
    report_context,
    resumable,
)
from moebalance.lab.replay import replay_markdown
from moebalance.lab.reporting import (
    maxvio_global_label,
    plot_loads,
    plot_maxvio_batch,
    plot_tradeoff,
    plot_val_loss,
    short_run_note,
)
from moebalance.lab.runs import run_or_resume
from moebalance.train.checkpoint import write_json, write_text
from moebalance.train.config import RunConfig, apply_overrides

__all__ = ["GRIDS", "grid_runs", "render_sweep_markdown", "sweep"]

GRIDS = ("alpha", "update-rate", "variants", "strategies", "batch-size")


def grid_runs(grid: str, base: RunConfig, sizes=None, seeds: int = 1) -> dict[str, list[str]]:
    """The runs of a built-in grid: run name -> overrides applied to ``base``.

    ``sizes`` and ``seeds`` are the ``batch-size`` grid's (tokens per step, seeds at the base
    size: :func:`moebalance.lab.batch_size.batch_size_runs`); the other grids refuse them.

    Raises:
        ValueError: unknown grid; ``sizes`` or ``seeds`` given to another grid, or out of range.
    """
    if grid == "batch-size":
        return batch_size_runs(base, sizes, seeds)
    if sizes is not None or seeds != 1:
        raise ValueError(f"--tokens-per-step and --seeds belong to the batch-size grid, not {grid!r}")
    lf = ["balance.strategy=loss_free"]
    if grid == "alpha":
        runs = {f"aux_alpha_{a}": ["balance.strategy=aux_loss", f"balance.aux_loss_coeff={a}"] for a in ("0", "1e-4", "1e-3", "1e-2")}
        runs["loss_free_u_1e-3"] = lf + ["balance.bias_update_rate=1e-3"]
        return runs
    if grid == "update-rate":
        return {f"loss_free_u_{u}": lf + [f"balance.bias_update_rate={u}"] for u in ("1e-4", "1e-3", "1e-2")}
    if grid == "variants":
        # Each run sets all three settings its name is about, so that an override of one of them
        # (which would train another variant under this name) is refused (compare.replaced_overrides).
        paper = {"balance.bias_update": "sign", "balance.bias_mode": "additive", "model.score_func": "sigmoid"}
        changes = {
            "sign_additive_sigmoid": {},
            "error_update": {"balance.bias_update": "error"},
            "multiplicative_bias": {"balance.bias_mode": "multiplicative"},
            "softmax_gate": {"model.score_func": "softmax"},
        }
        return {name: lf + [f"{k}={v}" for k, v in (paper | change).items()] for name, change in changes.items()}
    if grid == "strategies":
        runs = {
            "none": ["balance.strategy=none"],
            "aux_loss": ["balance.strategy=aux_loss", "balance.aux_loss_coeff=1e-3"],
            "batch_aux_loss": ["balance.strategy=batch_aux_loss", "balance.aux_loss_coeff=1e-3"],
            "global_aux_loss": ["balance.strategy=global_aux_loss", "balance.aux_loss_coeff=1e-3"],
            "importance_loss": ["balance.strategy=importance_loss", "balance.aux_loss_coeff=1e-2"],
            "loss_free": lf,
            "loss_free_z_loss": lf + ["balance.z_loss_coeff=1e-3"],
            "deepseek_v3": ["balance.strategy=deepseek_v3", "balance.seq_aux_coeff=1e-4"],
        }
        m = base.model
        if m.num_experts % 4 == 0 and m.top_k <= m.num_experts // 2:  # 4 groups, 2 kept
            runs["loss_free_grouped"] = lf + ["model.n_group=4", "model.topk_group=2"]
        runs["expert_choice"] = ["balance.strategy=none", "model.routing=expert_choice", "model.expert_choice_capacity=1.0"]
        return runs
    raise ValueError(f"unknown grid {grid!r}; choose from {list(GRIDS)}")


def sweep(
    grid: str,
    base: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
    command: str | None = None,
    overwrite: bool = False,
    sizes=None,
    seeds: int = 1,
) -> dict[str, Any]:
    """Run (or read back, or resume) every run of ``grid`` and write the sweep report.

    Args:
        grid: one of :data:`GRIDS`.
        base: the shared config (model, data, training, seed).
        out_dir: output folder; one sub-folder per run.
        progress: show progress bars.
        command: command line recorded in the report.
        overwrite: replace run folders that hold another config instead of refusing.
        sizes, seeds: the ``batch-size`` grid's tokens per step and seeds (see :func:`grid_runs`).

    Returns:
        the ``sweep.json`` content: ``{"grid", "command", "config", "data", "corpus_fingerprint",
        "runs": {name: record}, "ep_replay"}`` (``ep_replay``: see :func:`~moebalance.lab.replay.replay_runs`); each record has ``compare``'s fields plus ``overrides`` and
        ``resumed`` (read back from an earlier sweep).

    Raises:
        RunFolderError: a run folder holds another config and ``overwrite`` is false.
    """
    runs = grid_runs(grid, base, sizes, seeds)
    out = Path(out_dir)
    data, base = prepare_base(base)
    base = resumable(base)
    configs = {name: apply_overrides(base, overrides) for name, overrides in runs.items()}
    check_run_folders({name: (cfg, out / name) for name, cfg in configs.items()}, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    run_dirs: dict[str, Path] = {}
    for name, overrides in runs.items():
        cfg = configs[name]
        run_dirs[name] = out / name
        res, state = run_or_resume(cfg, run_dirs[name], data, overwrite, progress, desc=name)
        resumed = state == "finished"
        records[name] = {k: res[k] for k in REPORT_FIELDS} | {
            "balance": cfg.balance.__dict__.copy(),
            "run_dir": name,
            "overrides": overrides,
            "routing": cfg.model.routing,
            "score_func": cfg.model.score_func,
            "resumed": resumed,
        }
    if grid == "batch-size":  # its own tables and plots against tokens per step
        context = report_context(data, base, run_dirs, command)
        return study_report(out, records, run_dirs, base, data, context, sizes, seeds, progress)
    plot_tradeoff(
        {n: (r["maxvio_global"], r["val_ppl"]) for n, r in records.items()},
        out / "tradeoff.png",
        highlight=[n for n, r in records.items() if r["balance"]["strategy"] in ("loss_free", "deepseek_v3")],
        val_split=data.val_split,
    )
    plot_maxvio_batch(run_dirs, out / "maxvio_batch.png")
    plot_val_loss(run_dirs, out / "val_loss.png")
    plot_loads(run_dirs, out / "expert_load.png")
    report = {"grid": grid} | report_context(data, base, run_dirs, command) | {"runs": records, "short_run_note": short_run_note(configs)}
    write_json(out / "sweep.json", report)
    write_text(out / "sweep.md", render_sweep_markdown(report))
    return report


def render_sweep_markdown(report: dict[str, Any]) -> str:
    """The human summary of a sweep: one table row per run, then the plots."""
    cfg = report["config"]
    m, t = cfg["model"], cfg["train"]
    lines = [
        f"# moebalance sweep `{report['grid']}`",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: {m['n_layers']} layers, d_model {m['d_model']}, {m['num_experts']} experts (top-{m['top_k']}). "
        f"Training: {t['max_steps']} steps of {t['batch_size'] * t['grad_accum']} x {t['seq_len']} tokens, "
        f"seed {t['seed']} (same initial weights and data order in every run).",
        f"Data: {report['data']['source']} (fingerprint `{report['corpus_fingerprint']}`).",
        "",
        f"| run | overrides | val ppl | {maxvio_global_label(report['data'].get('val_split'))} | MaxVio_batch (last 10%) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | `{' '.join(r['overrides'])}` | {r['val_ppl']:.2f} | {r['maxvio_global']:.3f} | "
            f"{r['maxvio_batch_last']:.3f} | {r['tokens_per_s']:.0f} |"
        )
    if report.get("short_run_note"):
        lines += ["", report["short_run_note"]]
    if any(r["routing"] == "expert_choice" for r in report["runs"].values()):
        lines += [
            "",
            "Expert choice is balanced by construction and not causal: its validation perplexity is "
            "measured with routing that sees later tokens of the batch (`moebalance leakage`).",
        ]
    if "ep_replay" in report:
        lines += [""] + replay_markdown(report["ep_replay"])
    lines += [
        "",
        "![validation perplexity against MaxVio_global](tradeoff.png)",
        "",
        *RUN_PLOTS_MARKDOWN,
    ]
    return "\n".join(lines)
