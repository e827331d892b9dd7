"""Command line: ``moebalance train`` (``--nproc N`` runs it under torchrun), ``compare``,
``sweep GRID``, ``leakage``, ``plot RUN_DIR...``, ``replay RUN_DIR...`` (expert-parallel cost of
finished runs' loads) and ``verify MODEL_DIR`` (does plain ``transformers`` route a saved model as
moebalance does; :mod:`moebalance.integrations.transformers.verify`).

Any config key can be overridden as ``section.field=value`` after the options, e.g.
``moebalance train --preset smoke train.max_steps=50 balance.strategy=aux_loss``.
An unknown key or a value out of range is an error that names the field.

``moebalance train --resume DIR`` continues the run in ``DIR`` from its newest verified checkpoint
(``DIR/checkpoints/step_*.pt`` or the final ``DIR/checkpoint.pt``: a finished run is extended by
raising ``train.max_steps``), with the config saved in ``DIR/config.json``; only the keys of
:data:`moebalance.train.resume.RESUMABLE_KEYS` may be overridden. ``train --out DIR`` refuses a
``DIR`` that already holds a run (its ``config.json``, or the ``DIR/.replaced-run`` an
interrupted ``--overwrite`` left) unless ``--overwrite`` is given, which moves what that run wrote
aside (:func:`moebalance.train.checkpoint.stash_run`; other files stay), starts over, removes the
old run once the new one completes and puts it back if the new one fails. A ``config.json`` that is
not a moebalance run's, or a folder a run cannot be cleared into, is refused with or without
``--overwrite``: nothing is removed.

Failures: :func:`main` turns every expected failure into one line on stderr and an exit code of
:data:`EXIT_CODES` in one place (:func:`_fail`); it never shows a Python traceback (set
``MOEBALANCE_TRACEBACK=1`` to see one for an internal error). The phases: the command line, the
config and the paths it names are checked first (exit 2, nothing written); then the work runs
(exit 3, 4 or 130). A folder the command created is removed again when the work fails on its
inputs (exit 4) and holds no checkpoint; every file is written atomically, so a failure never
leaves a half-written one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from moebalance.train.config import PRESETS, RunConfig, apply_overrides, cuda_assumed, override_keys, preset_config

__all__ = ["EXIT_CODES", "UsageError", "build_parser", "main"]

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_STOPPED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

#: Exit status -> meaning (also in ``moebalance --help`` and the README).
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_BUG: "internal error: a bug in moebalance (MOEBALANCE_TRACEBACK=1 shows the traceback)",
    EXIT_USAGE: "bad command line: an unknown option or config key, a value out of range, or a path "
    "named on it that cannot serve (missing, a file where a folder is expected, a corrupt checkpoint "
    "or run folder); found before anything was written",
    EXIT_STOPPED: "training stopped on a non-finite value (train.on_nonfinite=stop), or ended with nothing to "
    "report under skip (every step skipped as non-finite, or a non-finite final validation loss)",
    EXIT_INPUT: "the work failed on its data or files: data that cannot be trained on, a checkpoint "
    "that does not fit, a file that cannot be read or written; a folder it created is removed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); complete files are kept, and `train --resume` continues "
    "from the newest checkpoint (`train --overwrite`: the earlier run is put back; `compare` and `sweep`: run the "
    "same command again)",
}

DEFAULT_OUT = {"train": "runs/train", "compare": "runs/compare", "leakage": "runs/leakage", "plot": "runs/plots"}


class UsageError(Exception):
    """The command line is wrong (exit 2, with the sub-command's usage line)."""


def _resume_config(args: argparse.Namespace) -> RunConfig:
    """The saved config of the run in ``args.resume``, with the allowed overrides applied."""
    from moebalance.train.resume import RESUMABLE_KEYS, check_resumable_folder, latest_training_state
    from moebalance.train.runfiles import read_json

    run_dir = Path(args.resume)
    for flag in ("preset", "data", "out"):
        if getattr(args, flag) is not None and not (flag == "out" and Path(args.out) == run_dir):
            raise UsageError(f"--{flag} cannot be combined with --resume: the run's config and folder are {run_dir}")
    config_path = run_dir / "config.json"
    if not os.path.lexists(config_path):  # one that is there but not a file: named below
        raise UsageError(f"--resume {run_dir}: no config.json there (not a moebalance run folder){_stash_hint(run_dir)}")
    bad = [k for k in override_keys(args.overrides) if k not in RESUMABLE_KEYS]
    if bad:
        raise UsageError(f"--resume: {bad} cannot change on resume; allowed: {sorted(RESUMABLE_KEYS)}")
    try:  # every file the resumed run reads or writes, before anything is prepared or written
        check_resumable_folder(run_dir)
        saved = read_json(config_path)
    except (ValueError, OSError) as exc:  # RunFileError names the file
        raise UsageError(f"--resume {run_dir}: {_message(exc)}") from exc
    try:
        saved = RunConfig.from_dict(saved)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--resume {run_dir}: config.json is not a moebalance run config: {exc}") from exc
    cfg = apply_overrides(saved, list(args.overrides))
    try:  # verified here, before any data is prepared; train() reads it again
        path, state = latest_training_state(run_dir)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--resume {run_dir}: {_message(exc)}{_stash_hint(run_dir)}") from exc
    if cfg.train.max_steps < state["step"]:
        raise UsageError(
            f"--resume: train.max_steps={cfg.train.max_steps} is below step {state['step']} of {path}; "
            f"raise it to extend the run (e.g. train.max_steps={2 * state['step']})"
        )
    return cfg


def _config(args: argparse.Namespace) -> RunConfig:
    """The run config of ``train`` / ``compare`` / ``sweep`` / ``leakage`` (raises ``ValueError``)."""
    if getattr(args, "resume", None):
        return _resume_config(args)
    if getattr(args, "checkpoint", None):
        from moebalance.lab.leakage import checkpoint_config

        for flag in ("preset", "data"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} cannot be combined with --checkpoint: the checkpoint's own config is used")
        return checkpoint_config(args.checkpoint, args.overrides)
    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data is not None else [])
    cfg = preset_config(args.preset or "default", overrides)
    for name in ("path", "cache_dir"):
        value = getattr(cfg.data, name)
        if value is not None:
            _check_path_name(f"data.{name}", value)
    if cfg.data.path is not None and not _expand(f"data.path {cfg.data.path!r}", cfg.data.path).exists():
        raise UsageError(f"data.path {cfg.data.path!r} does not exist")
    return cfg


def _expand(what: str, path: str) -> Path:
    """``path`` with ``~`` / ``~user`` expanded; an unknown user is a usage error naming ``what``."""
    try:
        return Path(path).expanduser()
    except RuntimeError as exc:  # "Could not determine home directory"
        raise UsageError(f"{what}: {exc} (no such user?)") from None


def _check_path_name(what: str, path: str) -> None:
    """A path named on the command line is not empty and is valid UTF-8 (a name with undecodable
    bytes cannot be written into the run's config.json, logs and reports)."""
    if not path.strip():
        raise UsageError(f"{what} is empty: give a path")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} {path!r}: the name is not valid UTF-8 (bytes {os.fsencode(path)!r}); rename it") from None


def _check_path_options(args: argparse.Namespace) -> None:
    """Every path option (``--out``, ``--data``, ``--resume``, ``--checkpoint``, run folders) is a
    usable name: an empty ``--data ''`` is not the built-in corpus, an empty ``--resume ''`` not
    "no resume"."""
    for flag in ("out", "data", "resume", "checkpoint"):
        value = getattr(args, flag, None)
        if value is not None:
            _check_path_name(f"--{flag}", value)
    for value in getattr(args, "run_dirs", None) or ():
        _check_path_name("RUN_DIR", value)


def _add_common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named config preset (default: default)")
    p.add_argument("--out", default=None, help=f"output folder (default {default_out})")
    p.add_argument("--data", default=None, help="text file, folder of text files, or .bin tokens (default: built-in corpus)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def _count(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]`` (argparse names the option; exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {text}")
        return value

    return parse


#: The ranges of the count options (every count a command takes has one).
MAX_NPROC, MAX_TRIALS, MAX_POSITION, MAX_RANKS = 1024, 10_000, 2**31, 2**20
# (--seeds: moebalance.lab.compare.check_seeds, 1 to MAX_SEEDS.)


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


@functools.cache
def _exit_codes_epilog() -> str:
    import textwrap

    rows = (textwrap.fill(text, 96, initial_indent=f"  {code:<4d} ", subsequent_indent=" " * 7) for code, text in EXIT_CODES.items())
    return "exit status:\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The parser; every sub-parser stores itself as ``args.subparser`` (for its usage line)."""
    from moebalance.lab.sweeps import GRIDS

    parser = argparse.ArgumentParser(
        prog="moebalance",
        description="Auxiliary-Loss-Free Load Balancing for MoE (arXiv 2408.15664): train and compare.",
        epilog=_exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, epilog=_exit_codes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(subparser=p)
        return p

    p_train = add("train", "train the small MoE LM with one balancing strategy")
    _add_common(p_train, "runs/train")
    p_train.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue (or, with a larger train.max_steps, extend) the run in DIR from its newest verified "
        "checkpoint: DIR/checkpoints/step_*.pt or the final DIR/checkpoint.pt",
    )
    p_train.add_argument(
        "--nproc",
        type=_count(1, MAX_NPROC),
        default=1,
        help=f"data-parallel processes on this machine, 1 to {MAX_NPROC}: runs the same command under torchrun (default 1)",
    )
    p_train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out folder that already holds a run (what that run wrote is moved aside, "
        "removed once the new run completes, put back if it fails)",
    )
    p_cmp = add("compare", "Loss-Free vs auxiliary loss on the same model, data and seed")
    _add_common(p_cmp, "runs/compare")
    p_cmp.add_argument("--seeds", type=int, default=1, help="seeds per strategy, 1 to 1000; > 1 reports mean ± std (default 1)")
    p_cmp.add_argument("--overwrite", action="store_true", help="replace run folders that hold another config")
    p_cmp.add_argument(
        "--runs",
        default="loss_free,aux_loss",
        help="comma-separated runs: loss_free, aux_loss, global_aux_loss, deepseek_v3 (default: the paper's two, loss_free,aux_loss)",
    )
    p_sweep = add("sweep", "a grid of balancing runs on one seed, data order and initial weights")
    p_sweep.add_argument("grid", choices=GRIDS, help="built-in grid (see docs/balancing.md)")
    _add_common(p_sweep, "runs/sweep/GRID")
    p_sweep.add_argument("--overwrite", action="store_true", help="replace run folders that hold another config")
    p_sweep.add_argument(
        "--tokens-per-step", default=None, metavar="T,T,...",
        help="batch-size grid: comma-separated tokens per step (default 256,512,1024,2048,4096,8192,20480)",
    )  # fmt: skip
    p_sweep.add_argument("--seeds", type=int, default=1, help="batch-size grid: seeds at the base size, 1 to 10 (default 1)")
    p_leak = add("leakage", "future-token leakage of expert choice, Loss-Free and a current-batch bias")
    _add_common(p_leak, "runs/leakage")
    p_leak.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint.pt of a trained run: its model is rebuilt from the run's own config "
        "(default: the seeded initial model)",
    )
    p_leak.add_argument("--position", type=_count(0, MAX_POSITION), default=None, help="last unchanged position p, 0 to train.seq_len-2 (default: seq_len/2 - 1)")
    p_leak.add_argument("--trials", type=_count(1, MAX_TRIALS), default=4, help=f"perturbed sequences averaged, 1 to {MAX_TRIALS} (default 4)")
    p_plot = add("plot", "redraw the report plots of finished runs (no training)")
    p_plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or compare folders holding runs")
    p_plot.add_argument("--out", default=None, help="output folder (default runs/plots)")
    p_plot.add_argument("--overwrite", action="store_true", help="replace plots of other runs in --out")
    p_rep = add("replay", "replay finished runs' expert loads onto expert-parallel ranks")
    p_rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or compare / sweep folders holding runs")
    p_rep.add_argument("--ranks", default="2,4,8,16,64,256", help=f"comma-separated EP rank counts, each 1 to {MAX_RANKS}")
    _add_verify(add("verify", "does plain transformers route a save_pretrained folder as moebalance does? (probe batch)"))
    return parser


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a save_pretrained folder (config.json + *.safetensors)")
    p.add_argument("--batch-size", type=int, default=4, help="probe sequences, >= 1 (default 4)")
    p.add_argument(
        "--seq-len", type=int, default=None,
        help="probe tokens per sequence, 1 to the model's max_position_embeddings (default 64, or that limit if smaller)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random probe token ids (default 0)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full report to FILE (JSON)")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(r) for r in text.split(","))
    except ValueError:
        raise UsageError(f"--ranks must be comma-separated integers, got {text!r}") from None
    if any(not 1 <= r <= MAX_RANKS for r in ranks):
        raise UsageError(f"--ranks: each must be in [1, {MAX_RANKS}], got {text!r}")
    return ranks


def _sizes(text: str | None) -> tuple[int, ...] | None:
    """``--tokens-per-step`` as integers (their range: :func:`moebalance.lab.batch_size.check_tokens_per_step`)."""
    if text is None:
        return None
    items = text.split(",")
    if not all(t.isascii() and t.isdigit() for t in items):  # int() also takes " 512", "1_024" and other digits
        raise UsageError(f"--tokens-per-step must be comma-separated integers (digits 0-9 only), got {text!r}")
    return tuple(int(t) for t in items)


def _check_out(args: argparse.Namespace, out: str) -> None:
    from moebalance.train.checkpoint import folder_problem

    problem = folder_problem(out)
    if problem is not None:
        raise UsageError(f"--{'resume' if getattr(args, 'resume', None) else 'out'} {out!r}: {problem}")


def _check_train_out(args: argparse.Namespace) -> None:
    """``train --out DIR`` where DIR already holds a run: refuse unless ``--overwrite`` (never
    silently train over a run's checkpoints and logs)."""
    if getattr(args, "resume", None):  # --overwrite with --resume: refused first thing in _prepare
        return
    from moebalance.train.checkpoint import foreign_config_problem, run_folder_problem, stash_problem

    problem = foreign_config_problem(args.out_dir)
    if problem is not None:
        raise UsageError(f"--out {args.out_dir!r}: {problem}; not touched, even with --overwrite (choose another --out)")
    problem = stash_problem(args.out_dir)  # a user's file, folder or link where the stash goes
    if problem is not None:
        raise UsageError(f"--out {args.out_dir!r}: {problem}; nothing moved or removed")
    if _held(args.out_dir) and not args.overwrite:
        raise UsageError(
            f"--out {args.out_dir!r} already holds a run (config.json); not overwritten: continue it with "
            f"`moebalance train --resume {args.out_dir}`, start it over with --overwrite, or choose another --out"
            + _stash_hint(args.out_dir)
        )
    problem = run_folder_problem(args.out_dir)  # its config.json was checked just above
    if problem is not None:
        raise UsageError(f"--out {args.out_dir!r}: {problem}; nothing removed (choose another --out)")


def _held(out: str | Path) -> bool:
    """Whether ``out`` holds a run: its ``config.json``, or a run an ``--overwrite`` moved aside."""
    from moebalance.train.checkpoint import STASH

    return (Path(out) / "config.json").is_file() or os.path.lexists(Path(out) / STASH)


def _stash_hint(out: str | Path) -> str:
    """What the message of a refused ``train`` says about ``out/.replaced-run`` (empty when there is none)."""
    from moebalance.train.checkpoint import STASH, stash_problem

    stash = Path(out) / STASH
    if not os.path.lexists(stash):
        return ""
    problem = stash_problem(out)
    if problem is not None:
        return f"; {problem}"
    if not (stash / "config.json").is_file():
        return (
            f"; {str(stash)!r} holds part of the earlier run, moved aside by an --overwrite killed while moving it "
            "(the rest is beside it): the same --overwrite command completes the stash and starts over"
        )
    return (
        f"; {str(stash)!r} holds the earlier run that an interrupted --overwrite moved aside (kept by another "
        "--overwrite and put back if it fails, removed when the run beside it finishes)"
    )


def _check_plot_out(args: argparse.Namespace) -> None:
    """``plot --out DIR`` where DIR holds plots of other runs: refuse unless ``--overwrite``."""
    from moebalance.lab.reporting import plot_folder_problem

    problem = plot_folder_problem(args.out_dir, list(args.runs.values()), args.overwrite)
    if problem is not None:
        raise UsageError(f"--out {problem}")


def _check_measurement(args: argparse.Namespace, cfg: RunConfig) -> None:
    seq_len = cfg.train.seq_len
    if args.position is not None and not 0 <= args.position <= seq_len - 2:
        raise UsageError(f"--position must be in [0, train.seq_len-2={seq_len - 2}], got {args.position}")
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")


def _check_replaced(args: argparse.Namespace, cfg: RunConfig) -> None:
    """Refuse an override that a run of ``compare`` / ``sweep GRID`` replaces with its own value."""
    from moebalance.lab.compare import COMPARE_RUNS, replaced_overrides
    from moebalance.lab.sweeps import grid_runs

    if args.command == "sweep":
        from moebalance.lab.batch_size import DERIVED_KEYS

        runs = grid_runs(args.grid, cfg, args.sizes, args.seeds)
        if args.grid == "batch-size":  # the user's value of these is the base run's, scaled per run
            runs = {n: [o for o in ov if o.split("=", 1)[0] not in DERIVED_KEYS] for n, ov in runs.items()}
    else:
        runs = {n: COMPARE_RUNS[n] for n in args.run_names}
    replaced = replaced_overrides(cfg, runs, override_keys(args.overrides))
    if replaced:
        what = f"sweep {args.grid}" if args.command == "sweep" else "compare"
        raise UsageError(
            f"{what} sets these itself, so your value would not be used: {'; '.join(replaced)} "
            f"(leave them out; the runs are listed in docs/balancing.md)"
        )


def _world_size(args: argparse.Namespace) -> int:
    """Ranks of the job: ``--nproc`` in the launching process, torchrun's ``WORLD_SIZE`` in a worker."""
    return int(os.environ.get("WORLD_SIZE", 0)) or getattr(args, "nproc", 1)


def _check_memory(args: argparse.Namespace, cfg: RunConfig) -> None:
    """Refuse (exit 2) a config whose sizes cannot fit this machine, before anything is built
    (:func:`moebalance.train.footprint.check_fits`); ``--nproc N`` ranks of expert parallelism
    are checked against the config before torchrun starts them."""
    from moebalance.train.footprint import check_fits

    world = _world_size(args)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or world  # the ranks that share this machine
    if world > 1 and cfg.train.expert_parallel:
        if cfg.model.num_experts % world:
            raise UsageError(
                f"--nproc {world} with train.expert_parallel=true: model.num_experts={cfg.model.num_experts} "
                f"must be a multiple of the number of ranks"
            )
        if cfg.train.checkpoint_every or getattr(args, "resume", None):
            raise UsageError("train.checkpoint_every and --resume are not supported with train.expert_parallel yet")
    check_fits(cfg, world, local)
    if getattr(args, "grid", None) == "batch-size":  # every run of the study, scaled to its size
        from moebalance.lab.sweeps import grid_runs
        from moebalance.train.config import apply_overrides

        runs = grid_runs(args.grid, cfg, args.sizes, args.seeds)
        largest = max((apply_overrides(cfg, o) for o in runs.values()), key=lambda c: c.train.batch_size)
        try:
            check_fits(largest, world, local)
        except ValueError as exc:
            t = largest.train
            raise ValueError(f"its run of {t.batch_size * t.grad_accum * t.seq_len} tokens per step: {exc}") from None


def _prepare(args: argparse.Namespace, extra: list[str]) -> RunConfig | None:
    """The config phase: parse the config and check every path the command names (exit 2)."""
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or args.command in ("plot", "replay", "verify")]
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    _check_path_options(args)
    if args.command == "train" and args.resume and args.overwrite:  # before the resumed config is checked
        raise UsageError("--overwrite cannot be combined with --resume (which continues the run)")
    cfg = None
    # --print-config only shows the config: a GPU config (the paper-* presets) may be built without a GPU.
    with cuda_assumed() if getattr(args, "print_config", False) else contextlib.nullcontext():
        try:
            if args.command == "verify":
                _check_verify(args)
            elif args.command in ("plot", "replay"):  # every run file read and checked here: a damaged one is exit 2
                from moebalance.lab.replay import replay_inputs
                from moebalance.lab.reporting import find_run_dirs, plot_inputs

                args.ranks_tuple = _ranks(args.ranks) if args.command == "replay" else None
                if args.command == "replay":
                    args.runs = replay_inputs(args.run_dirs)
                else:
                    plot_inputs(args.run_dirs)  # every metrics file checked here; plot_runs reads them again
                    args.runs = find_run_dirs(args.run_dirs)
            else:
                args.overrides = list(args.overrides) + extra
                cfg = _config(args)
                if args.command == "leakage":
                    _check_measurement(args, cfg)
                if args.command == "compare":
                    from moebalance.lab.compare import check_runs, check_seeds

                    check_seeds(cfg, args.seeds)
                    args.run_names = check_runs(n.strip() for n in args.runs.split(","))
                if args.command == "sweep":
                    args.sizes = _sizes(args.tokens_per_step)
                if args.command in ("compare", "sweep"):
                    _check_replaced(args, cfg)
                if not getattr(args, "print_config", False):
                    _check_memory(args, cfg)
        except (ValueError, OSError) as exc:
            raise UsageError(_message(exc)) from exc
    if args.command not in ("replay", "verify"):
        default = DEFAULT_OUT.get(args.command) or f"runs/sweep/{getattr(args, 'grid', '')}"
        args.out_dir = getattr(args, "resume", None) or args.out or default
        _check_out(args, args.out_dir)
        # The other ranks of a torchrun job leave the folder to rank 0 (which may be clearing it).
        if args.command == "train" and not getattr(args, "print_config", False) and os.environ.get("RANK", "0") == "0":
            _check_train_out(args)
        if args.command == "plot":
            _check_plot_out(args)
    return cfg


def _cmd_train(args: argparse.Namespace, cfg: RunConfig) -> int:
    from moebalance.train.loop import train

    # --overwrite: train() moves the old run aside only when data and model are ready (rank 0 alone).
    overwrite = args.replacing = args.overwrite and _held(args.out_dir)
    result = train(cfg, args.out_dir, progress=not args.no_progress, resume=bool(args.resume), overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.to_dict().items() if k != "final_loads"}, indent=2))
    return EXIT_OK


@contextlib.contextmanager
def _folder_conflict_is_usage() -> Iterator[None]:
    """A run folder of ``--out`` that holds another config is a path that cannot serve (exit 2):
    ``compare`` and ``sweep`` find it before anything trains or is written."""
    from moebalance.lab.runs import RunFolderError

    try:
        yield
    except RunFolderError as exc:
        raise UsageError(str(exc)) from exc


def _cmd_compare(args: argparse.Namespace, cfg: RunConfig) -> int:
    from moebalance.lab.compare import compare

    with _folder_conflict_is_usage():
        report = compare(
            cfg, args.out_dir, progress=not args.no_progress, seeds=args.seeds, overwrite=args.overwrite, runs=args.run_names
        )
    label = "MaxVio_global_shift" if report["data"].get("val_split") == "files" else "MaxVio_global"
    for name, r in report["runs"].items():
        print(
            f"{name:15s} val_ppl {r['val_ppl']:.2f}  {label} {r['maxvio_global']:.3f}  "
            f"MaxVio_batch(last 10%) {r['maxvio_batch_last']:.3f}"
        )
    if "ppl_noise" in report:
        print(report["ppl_noise"]["text"])
    if report.get("short_run_note"):
        print(report["short_run_note"].replace("**", ""))
    print(f"report: {args.out_dir}/report.md")
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace, cfg: RunConfig) -> int:
    from moebalance.lab.sweeps import sweep

    with _folder_conflict_is_usage():
        report = sweep(
            args.grid, cfg, args.out_dir, progress=not args.no_progress, overwrite=args.overwrite,
            sizes=args.sizes, seeds=args.seeds,
        )  # fmt: skip
    for name, r in report["runs"].items():
        print(f"{name:24s} val_ppl {r['val_ppl']:.2f}  MaxVio_global {r['maxvio_global']:.3f}" + ("  (read back)" if r["resumed"] else ""))
    if report.get("short_run_note"):
        print(report["short_run_note"].replace("**", ""))
    print(f"report: {args.out_dir}/sweep.md")
    return EXIT_OK


def _cmd_leakage(args: argparse.Namespace, cfg: RunConfig) -> int:
    from moebalance.lab.leakage import leakage, render_leakage_table

    result = leakage(cfg, args.out_dir, checkpoint=args.checkpoint, position=args.position, trials=args.trials, progress=not args.no_progress)
    print(render_leakage_table(result))
    print(f"written: {args.out_dir}/leakage.json")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace, cfg: None) -> int:
    from moebalance.lab.reporting import plot_runs

    for path in plot_runs(list(args.runs.values()), args.out_dir):
        print(path)
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace, cfg: None) -> int:
    from moebalance.lab.replay import replay_markdown, replay_runs

    print("\n".join(replay_markdown(replay_runs(args.runs, args.ranks_tuple))))
    return EXIT_OK


def _check_verify(args: argparse.Namespace) -> None:
    """The paths and sizes of ``verify`` (exit 2): a model folder, probe sizes, a writable --json."""
    from moebalance.integrations.transformers.verify import check_model_folder

    check_model_folder(args.model_dir)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.json is not None:
        target = Path(args.json)
        if target.is_dir():
            raise UsageError(f"--json {args.json!r} is a folder; give a file name")
        if not target.absolute().parent.is_dir():
            raise UsageError(f"--json {args.json!r}: the folder {str(target.absolute().parent)!r} does not exist")


def _cmd_verify(args: argparse.Namespace, cfg: None) -> int:
    from moebalance.integrations.transformers.verify import VerifyArgumentError, render_report, verify_model_folder
    from moebalance.train.checkpoint import write_json

    try:
        report = verify_model_folder(args.model_dir, args.batch_size, args.seq_len, args.seed)
    except VerifyArgumentError as exc:  # found only by loading the model: still an argument that cannot serve
        raise UsageError(_message(exc)) from exc
    except ImportError as exc:
        raise ValueError(f"moebalance verify needs transformers and safetensors ({exc}); pip install 'moebalance[dev]'") from exc
    print(render_report(report))
    if args.json is not None:
        write_json(args.json, report)
        print(f"report written to {args.json}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, RunConfig | None], int]] = {
    "train": _cmd_train,
    "compare": _cmd_compare,
    "sweep": _cmd_sweep,
    "leakage": _cmd_leakage,
    "plot": _cmd_plot,
    "replay": _cmd_replay,
    "verify": _cmd_verify,
}


@contextlib.contextmanager
def _output_folder(out: str | None) -> Iterator[None]:
    """Remove what the work created under ``out`` if it fails on its inputs (not when it was stopped
    or interrupted: then the complete files it wrote are the run's record) and holds no checkpoint."""
    top = None
    if out is not None:
        top = Path(out).absolute()
        if top.exists():
            top = None
        else:
            while not top.parent.exists():
                top = top.parent
    try:
        yield
    except (KeyboardInterrupt, FloatingPointError):
        if top is not None and top.is_dir() and not any(p.is_file() for p in top.rglob("*")):
            shutil.rmtree(top, ignore_errors=True)
        raise
    except BaseException as exc:
        done = isinstance(exc, BrokenPipeError) and _stdout_closed()  # the work is done; its summary met `| head`
        if top is not None and not done and top.is_dir() and not any(top.rglob("*.pt")):
            shutil.rmtree(top, ignore_errors=True)
        raise


def _message(exc: BaseException | str) -> str:
    from moebalance.train.checkpoint import describe_os_error

    text = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    # A name with undecodable bytes (surrogates) is shown escaped: printing it must not fail.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _fail(parser: argparse.ArgumentParser, args: argparse.Namespace | None, exc: BaseException) -> int:
    """The one place where a failure becomes one line on stderr and an exit code (:data:`EXIT_CODES`)."""
    sub = getattr(args, "subparser", None) or parser
    if isinstance(exc, UsageError):
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    notes = [str(n) for n in getattr(exc, "__notes__", ())]  # e.g. train(overwrite=True): the earlier run put back
    if isinstance(exc, KeyboardInterrupt):
        code, kind, text = EXIT_INTERRUPTED, "interrupted", _interrupted_hint(args, notes)
        notes = []
        if isinstance(exc, Terminated):
            text = f"terminated (SIGTERM); {text}"
    elif isinstance(exc, FloatingPointError):  # guards.NonFiniteError with train.on_nonfinite=stop
        code, kind, text = EXIT_STOPPED, "stopped", _message(exc)
    elif isinstance(exc, (OSError, ValueError, MemoryError)):  # MemoryError: see _allocation_failures
        code, kind, text = EXIT_INPUT, "error", _message(exc)
    else:
        if os.environ.get("MOEBALANCE_TRACEBACK"):
            raise exc
        code, kind = EXIT_BUG, "internal error"
        text = f"{type(exc).__name__}: {_message(exc)} (a bug in moebalance; MOEBALANCE_TRACEBACK=1 shows the traceback)"
    print(f"{sub.prog}: {kind}: {'; '.join([text, *map(_message, notes)])}", file=sys.stderr)
    return code


#: How torch words an allocation that cannot be made (CPU allocator, CUDA, a size past int64).
_ALLOCATION_WORDS = ("can't allocate memory", "out of memory", "storage size calculation overflowed", "failed to unpack")


@contextlib.contextmanager
def _allocation_failures(cfg: RunConfig | None) -> Iterator[None]:
    """An allocation that fails during the work is the config's size against this machine (exit 4),
    reported with the config's estimate (:mod:`moebalance.train.footprint`), not an internal error."""
    try:
        yield
    except (MemoryError, RuntimeError, OverflowError, TypeError) as exc:
        words = str(exc).lower()
        if not isinstance(exc, MemoryError) and not any(w in words for w in _ALLOCATION_WORDS):
            raise
        reason = " ".join(str(exc).split()[:24]) or type(exc).__name__
        if cfg is None:
            raise MemoryError(f"out of memory: {reason}") from exc
        from moebalance.train.footprint import describe, estimate

        raise MemoryError(f"out of memory ({reason}); {describe(estimate(cfg))}: lower those sizes") from exc


class Terminated(KeyboardInterrupt):
    """SIGTERM: stopped like Ctrl-C (complete files kept, exit 130), and said so."""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a command runs (main thread, default handler
    only; not in a torchrun worker, which its launcher stops with SIGTERM when another rank failed)."""
    import signal
    import threading

    mine = threading.current_thread() is threading.main_thread() and "WORLD_SIZE" not in os.environ
    if not mine or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupted_hint(args: argparse.Namespace | None, notes: list[str]) -> str:
    """What an interruption's message says to do next, after ``notes`` (what the work said about
    its folder, e.g. that an earlier run was put back)."""
    out = getattr(args, "out_dir", None)
    replacing = getattr(args, "replacing", None)  # set by _cmd_train; before it, the folder decides
    if replacing is None:
        replacing = getattr(args, "command", None) == "train" and getattr(args, "overwrite", False) and out and _held(out)
    if replacing:  # train --overwrite: the earlier run is back (or untouched), never a --resume of the new one
        notes = notes or [f"the run in {out!r} was not changed"]
        hint = "the same command with --overwrite starts over"
    elif getattr(args, "command", None) == "train" and out and (Path(out) / "config.json").exists():
        if any((Path(out) / "checkpoints").glob("step_*.pt")) or (Path(out) / "checkpoint.pt").exists():
            hint = f"continue with: moebalance train --resume {out}"
        else:
            hint = "no checkpoint was written yet (train.checkpoint_every=N writes one every N steps)"
    elif getattr(args, "command", None) in ("compare", "sweep"):
        hint = "run the same command again to continue: finished runs are kept, unfinished ones resume from their last checkpoint"
    else:
        hint = "stopped by Ctrl-C"
    return "; ".join([*map(_message, notes), hint])


def _launch(args: argparse.Namespace, cfg: RunConfig, argv: list[str] | None) -> int:
    from moebalance.parallel.process import launch
    from moebalance.train.data import check_data, prepare_data

    # The data once, here: a bad corpus is one error (exit 4) before any worker starts, not one per
    # rank and torchrun's report; the workers then read the token cache this fills.
    check_data(prepare_data(cfg.data), cfg.train.seq_len)
    # Same arguments minus --nproc; torchrun starts the workers and sets RANK / WORLD_SIZE.
    return launch(args.nproc, _without_nproc(sys.argv[1:] if argv is None else list(argv)))


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (:data:`EXIT_CODES`).

    argparse's own errors (an unknown option or choice) and ``--help`` exit through
    ``SystemExit`` as usual; every other failure comes back as a status, with one line on stderr.
    """
    try:
        parser = build_parser()  # imports torch: seconds, in which a Ctrl-C is an interrupt like any other
    except KeyboardInterrupt:
        print("moebalance: interrupted: stopped by Ctrl-C", file=sys.stderr)
        return EXIT_INTERRUPTED
    # parse_known_args: after `sweep GRID`, argparse has already filled the `overrides`
    # positional when it meets them behind options; they come back as extras.
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        with _sigterm_stops():
            cfg = _prepare(args, extra)
            if getattr(args, "print_config", False):
                print(json.dumps(cfg.to_dict(), indent=2))
                sys.stdout.flush()
                return EXIT_OK
            if getattr(args, "nproc", 1) != 1 and "WORLD_SIZE" not in os.environ:
                return _launch(args, cfg, argv)
            with _output_folder(getattr(args, "out_dir", None)), _allocation_failures(cfg):
                return COMMANDS[args.command](args, cfg)
    except BrokenPipeError as exc:
        if _stdout_closed():  # `moebalance ... | head`: the reader has what it wanted
            return EXIT_OK
        return _fail(parser, args, exc)
    except (Exception, KeyboardInterrupt) as exc:
        return _fail(parser, args, exc)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader went away (``poll`` reports ``POLLERR`` on its write
    end); if so, point stdout at /dev/null, so that the interpreter's final flush is quiet too."""
    import select

    if _STDOUT_GONE[0]:
        return True
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        broken = any(events & select.POLLERR for _, events in poller.poll(0))
        if broken:
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured): not a closed pipe
        return False
    _STDOUT_GONE[0] = broken
    return broken


_STDOUT_GONE = [False]  # set by _stdout_closed once stdout's pipe was found closed (and replaced)
