"""Command line: ``moebalance train`` (``--nproc N`` runs it under torchrun), ``compare``,
``sweep GRID``, ``leakage``, ``plot RUN_DIR...`` and ``replay RUN_DIR...`` (expert-parallel cost of
finished runs' loads).

Any config key can be overridden as ``section.field=value`` after the options, e.g.
``moebalance train --preset smoke train.max_steps=50 balance.strategy=aux_loss``.
An unknown key or a value out of range is an error that names the field.

``moebalance train --resume DIR`` continues the run in ``DIR`` from its newest good checkpoint
(``DIR/checkpoints``), with the config saved in ``DIR/config.json``; only the keys of
:data:`moebalance.train.resume.RESUMABLE_KEYS` (e.g. ``train.max_steps``) may be overridden.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from moebalance.train.config import PRESETS, RunConfig, apply_overrides, get_preset

__all__ = ["main"]


def _config(args: argparse.Namespace) -> RunConfig:
    if getattr(args, "resume", None):
        return _resume_config(args)
    cfg = get_preset(args.preset or "default")
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    return apply_overrides(cfg, overrides)


def _resume_config(args: argparse.Namespace) -> RunConfig:
    """The saved config of the run in ``args.resume``, with the allowed overrides applied."""
    from moebalance.train.resume import RESUMABLE_KEYS

    run_dir = Path(args.resume)
    for flag in ("preset", "data", "out"):
        if getattr(args, flag) is not None and not (flag == "out" and Path(args.out) == run_dir):
            raise ValueError(f"--{flag} cannot be combined with --resume: the run's config and folder are {run_dir}")
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"--resume {run_dir}: no config.json there (not a moebalance run folder)")
    keys = [item.split("=", 1)[0].strip() for item in args.overrides]
    bad = [k for k in keys if k not in RESUMABLE_KEYS]
    if bad:
        raise ValueError(f"--resume: {bad} cannot change on resume; allowed: {sorted(RESUMABLE_KEYS)}")
    try:
        saved = RunConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"--resume {run_dir}: config.json is not a moebalance run config: {exc}") from exc
    return apply_overrides(saved, list(args.overrides))


def _add_common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named config preset (default: default)")
    p.add_argument("--out", default=None, help=f"output folder (default {default_out})")
    p.add_argument("--data", default=None, help="text file, folder of text files, or .bin tokens (default: built-in corpus)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moebalance",
        description="Auxiliary-Loss-Free Load Balancing for MoE (arXiv 2408.15664): train and compare.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the small MoE LM with one balancing strategy")
    _add_common(p_train, "runs/train")
    p_train.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR from its newest good checkpoint (needs train.checkpoint_every > 0)",
    )
    p_train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine: runs the same command under torchrun (default 1)",
    )
    p_cmp = sub.add_parser("compare", help="Loss-Free vs auxiliary loss on the same model, data and seed")
    _add_common(p_cmp, "runs/compare")
    p_cmp.add_argument("--seeds", type=int, default=1, help="seeds per strategy; > 1 reports mean ± std (default 1)")
    p_cmp.add_argument("--overwrite", action="store_true", help="replace run folders that hold another config")
    from moebalance.lab.sweeps import GRIDS

    p_sweep = sub.add_parser("sweep", help="a grid of balancing runs on one seed, data order and initial weights")
    p_sweep.add_argument("grid", choices=GRIDS, help="built-in grid (see docs/balancing.md)")
    _add_common(p_sweep, "runs/sweep/GRID")
    p_sweep.add_argument("--overwrite", action="store_true", help="replace run folders that hold another config")
    p_leak = sub.add_parser("leakage", help="future-token leakage of expert choice, Loss-Free and a current-batch bias")
    _add_common(p_leak, "runs/leakage")
    p_leak.add_argument("--checkpoint", default=None, help="checkpoint.pt of a trained run (default: the seeded initial model)")
    p_leak.add_argument("--position", type=int, default=None, help="last unchanged position p (default: seq_len/2 - 1)")
    p_leak.add_argument("--trials", type=int, default=4, help="perturbed sequences averaged (default 4)")
    p_plot = sub.add_parser("plot", help="redraw the report plots of finished runs (no training)")
    p_plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or compare folders holding runs")
    p_plot.add_argument("--out", default="runs/plots", help="output folder (default runs/plots)")
    p_rep = sub.add_parser("replay", help="replay finished runs' expert loads onto expert-parallel ranks")
    p_rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders holding a metrics.jsonl")
    p_rep.add_argument("--ranks", default="2,4,8,16,64,256", help="comma-separated EP rank counts")
    return parser


def _replay(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pathlib import Path

    from moebalance.lab.replay import replay_markdown, replay_runs

    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError:
        parser.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    if any(r < 1 for r in ranks):
        parser.error(f"--ranks must be >= 1, got {args.ranks!r}")
    try:
        replay = replay_runs({Path(d).name or d: d for d in args.run_dirs}, ranks)
    except (ValueError, FileNotFoundError) as exc:
        print(f"moebalance: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(replay_markdown(replay)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: after `sweep GRID`, argparse has already filled the `overrides`
    # positional when it meets them behind options; they come back as extras.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "replay":
        return _replay(parser, args)
    if args.command == "plot":  # no config: it reads finished runs
        from moebalance.lab.reporting import plot_runs

        try:
            for path in plot_runs(args.run_dirs, args.out):
                print(path)
        except (ValueError, FileNotFoundError) as exc:
            print(f"moebalance: error: {exc}", file=sys.stderr)
            return 2
        return 0
    args.overrides = list(args.overrides) + extra
    try:
        cfg = _config(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if getattr(args, "nproc", 1) != 1 and "WORLD_SIZE" not in os.environ:
        from moebalance.parallel.process import launch

        if args.nproc < 1:
            parser.error(f"--nproc must be >= 1, got {args.nproc}")
        # Same arguments minus --nproc; torchrun starts the workers and sets RANK / WORLD_SIZE.
        return launch(args.nproc, _without_nproc(sys.argv[1:] if argv is None else list(argv)))
    resume = getattr(args, "resume", None)
    default_out = {"train": "runs/train", "compare": "runs/compare", "leakage": "runs/leakage"}
    out = resume or args.out or default_out.get(args.command) or f"runs/sweep/{args.grid}"
    if Path(out).exists() and not Path(out).is_dir():
        parser.error(f"--out {out!r} is a file; it must be a folder (it is created if missing)")
    try:
        if args.command == "train":
            from moebalance.train.loop import train

            result = train(cfg, out, progress=not args.no_progress, resume=bool(resume))
            if int(os.environ.get("RANK", "0")) != 0:
                return 0
            print(json.dumps({k: v for k, v in result.to_dict().items() if k != "final_loads"}, indent=2))
        elif args.command == "compare":
            from moebalance.lab.compare import compare

            report = compare(cfg, out, progress=not args.no_progress, seeds=args.seeds, overwrite=args.overwrite)
            label = "MaxVio_global_shift" if report["data"].get("val_split") == "files" else "MaxVio_global"
            for name, r in report["runs"].items():
                print(
                    f"{name:10s} val_ppl {r['val_ppl']:.2f}  {label} {r['maxvio_global']:.3f}  "
                    f"MaxVio_batch(last 10%) {r['maxvio_batch_last']:.3f}"
                )
            if "ppl_noise" in report:
                print(report["ppl_noise"]["text"])
            print(f"report: {out}/report.md")
        elif args.command == "sweep":
            from moebalance.lab.sweeps import sweep

            report = sweep(args.grid, cfg, out, progress=not args.no_progress, overwrite=args.overwrite)
            for name, r in report["runs"].items():
                print(f"{name:24s} val_ppl {r['val_ppl']:.2f}  MaxVio_global {r['maxvio_global']:.3f}" + ("  (read back)" if r["resumed"] else ""))
            print(f"report: {out}/sweep.md")
        elif args.command == "leakage":
            from moebalance.lab.leakage import leakage, render_leakage_table

            result = leakage(cfg, out, checkpoint=args.checkpoint, position=args.position, trials=args.trials)
            print(render_leakage_table(result))
            print(f"written: {out}/leakage.json")
    except (ValueError, FileNotFoundError) as exc:
        print(f"moebalance: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # guards.NonFiniteError with train.on_nonfinite=stop
        print(f"moebalance: stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"moebalance: interrupted; {_resume_hint(args.command, out, cfg.train.checkpoint_every)}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(command: str, out: str, checkpoint_every: int) -> str:
    """One line saying how to continue an interrupted command (checkpoints are written atomically)."""
    if command == "train" and checkpoint_every:
        return f"continue with: moebalance train --resume {out}"
    if command == "train":
        return "no checkpoint to resume from (train.checkpoint_every=0); set it to make a run resumable"
    if command in ("compare", "sweep"):
        return "run the same command again to continue: finished runs are kept, unfinished ones resume from their last checkpoint"
    return "nothing to resume; run the command again"
