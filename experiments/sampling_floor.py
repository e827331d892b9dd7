"""The validation split's own floor: the MaxVio_global that perfectly balanced routing would show.

Takes a finished run (its ``checkpoint.pt``) and, on its validation split (or the first
``--eval-tokens`` of it, spread as ``moebalance`` evaluations spread them), measures each window's
expert loads, removes the imbalance (each expert's mean load set to the mean of all experts, the
chunk-to-chunk spread kept) and bootstraps over the split's chunks
(:func:`moebalance.lab.floor.sampling_floor`). What it prints is how low MaxVio_global can be
*measured* on that split: a routing balanced exactly on the distribution the chunks are drawn from
scores this much on average, because the held-out text is a finite sample of chunks and experts
specialise.

    python experiments/sampling_floor.py RUN_DIR --out sampling.json [--eval-tokens 0] [--draws 500]

Output (``--out``, written once, atomically; a re-run with the same arguments reads it back, other
arguments are refused unless ``--overwrite``):
JSON with the arguments and ``{"floor", "std", "measured", "chunks", "tokens"}``.
Errors: one line on stderr; status 2 for bad arguments or a run folder without a readable
checkpoint, 130 on Ctrl-C (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moebalance.lab.floor import load_frozen, sampling_floor
from moebalance.train.checkpoint import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_floor import check_run_and_out, recorded_args  # noqa: E402  (the sibling script)

#: The largest ``--eval-tokens`` (a larger one only hangs or runs out of memory).
MAX_EVAL_TOKENS = 10**9


def main(argv: list[str] | None = None) -> int:
    """Measure and write the floor; return the exit status (see the module docstring). Bad
    arguments, or an ``--out`` that may not be written, exit with status 2 (``SystemExit``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished `moebalance train` run (holds checkpoint.pt)")
    p.add_argument("--eval-tokens", type=int, default=0, help="validation tokens (default 0: the whole split)")
    p.add_argument("--draws", type=int, default=500, help="bootstrap resamples, 10 to 100000 (default 500)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out written with other arguments")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= a.eval_tokens <= MAX_EVAL_TOKENS:
        p.error(f"--eval-tokens must be in [0, {MAX_EVAL_TOKENS}] (0: the whole split), got {a.eval_tokens}")
    if not 10 <= a.draws <= 100000:
        p.error(f"--draws must be in [10, 100000], got {a.draws}")
    check_run_and_out(p, a, needs=("floor",))  # as bias_floor.py: the run, and an --out that may be written
    if a.out.exists() and not a.overwrite:  # it holds these arguments' result
        print(json.dumps(json.loads(a.out.read_text())["floor"]))
        return 0
    torch.set_num_threads(1)
    try:
        model, cfg, data = load_frozen(a.run_dir)
        res = sampling_floor(model, data, cfg, a.eval_tokens, draws=a.draws)
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted: nothing written to {a.out}", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"{p.prog}: error: {a.run_dir}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    write_json(a.out, {"args": recorded_args(a), "floor": res})
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
