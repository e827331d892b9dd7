"""What does dropping the trained Loss-Free bias cost a model? (The export question of issue 20.)

Plain ``transformers`` has no bias slot in the Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE routers: a
checkpoint saved with moebalance's ``expert_bias`` loads there without it, and the model routes on
its gate scores alone (``moebalance verify`` shows it on a saved folder). What that costs depends
on how far the experts have specialised around the bias, so this measures it on a model trained
long enough for that: a finished ``moebalance train`` run (its ``checkpoint.pt``), evaluated on the
whole validation split four times, the weights untouched, on the run's ``train.threads``:

* ``trained``: the trained float32 biases (the model as trained);
* ``zero``: every bias set to 0 (what a loader without a bias slot routes with);
* ``bf16``: the biases rounded to bfloat16 (an engine that stores the bias in the model's dtype);
* ``bf16_centred``: each layer's mean subtracted first, then rounded to bfloat16.

For each it records validation loss and perplexity and MaxVio_global (arXiv 2408.15664 §4.1), and
against ``trained`` the share of tokens whose set of experts changes, per layer and in any layer
(:func:`moebalance.metrics.layer_routing_changes`). Used by docs/transformers.md:

    moebalance train --out runs/drop_bias train.threads=1
    python experiments/drop_bias.py runs/drop_bias --out docs/results/issue20/drop_bias_sigmoid.json

Errors, as ``moebalance`` (README, *Errors and exit status*): one line on stderr and status 2 for
bad arguments, a run folder without a readable checkpoint, or an ``--out`` that cannot be written
(before the work starts); 4 when the work fails on its data or files; 130 on Ctrl-C (nothing is
written: the JSON is written once, atomically, at the end). A re-run never overwrites: an ``--out``
written with the same arguments is read back, one with other arguments is refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from moebalance.balancing import find_routers
from moebalance.integrations.transformers.checkpoint import centred
from moebalance.integrations.transformers.verify import bias_cast_collisions
from moebalance.metrics import layer_routing_changes
from moebalance.train.checkpoint import load_checkpoint, write_json
from moebalance.train.config import RunConfig
from moebalance.train.loop import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_floor import check_run_and_out, load_frozen, recorded_args  # noqa: E402  (the sibling script)

CONDITIONS = ("trained", "zero", "bf16", "bf16_centred")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished `moebalance train` run (holds checkpoint.pt)")
    p.add_argument("--eval-tokens", type=int, default=0, help="validation tokens read (default 0: the whole split)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out written with other arguments")
    a = p.parse_args(argv)
    if a.eval_tokens < 0:
        p.error(f"--eval-tokens must be >= 0 (0: the whole split), got {a.eval_tokens}")
    check_run_and_out(p, a, needs=CONDITIONS)
    return a


def condition_biases(trained: list[torch.Tensor], condition: str) -> list[torch.Tensor]:
    """The ``[E]`` float32 biases each router routes with under ``condition`` (:data:`CONDITIONS`)."""
    if condition == "trained":
        return [b.clone() for b in trained]
    if condition == "zero":
        return [torch.zeros_like(b) for b in trained]
    return [(centred(b) if condition == "bf16_centred" else b).to(torch.bfloat16).float() for b in trained]


@contextlib.contextmanager
def recording(routers) -> Iterator[list[list[torch.Tensor]]]:
    """Record each router's ``[T, K]`` choices of every forward inside the block."""
    seen: list[list[torch.Tensor]] = [[] for _ in routers]
    hooks = [r.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out.indices.cpu())) for i, r in enumerate(routers)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def measure(model, cfg, data, eval_tokens: int) -> dict:
    """Evaluate the run's model under every condition; routing changes against ``trained``."""
    routers = find_routers(model)
    trained = [r.expert_bias.detach().clone() for r in routers]
    results, reference = {}, None
    for condition in CONDITIONS:
        with torch.no_grad():
            for router, bias in zip(routers, condition_biases(trained, condition)):
                router.expert_bias.copy_(bias)
        with recording(routers) as seen:
            ev = evaluate(model, data, cfg, max_tokens=eval_tokens)
        choices = [torch.cat(calls) for calls in seen]
        reference = choices if reference is None else reference
        changes = layer_routing_changes(reference, choices)
        results[condition] = {
            **{k: ev[k] for k in ("val_loss", "val_ppl", "val_tokens", "maxvio_global", "maxvio_global_per_layer")},
            "tokens_changed_per_layer": changes["tokens_per_layer"],
            "choices_changed_per_layer": changes["choices_per_layer"],
            "tokens_changed_any_layer": changes["tokens_any_layer"],
        }
        print(json.dumps({"condition": condition, **{k: results[condition][k] for k in ("val_ppl", "maxvio_global", "tokens_changed_any_layer")}}), flush=True)
    with torch.no_grad():
        for router, bias in zip(routers, trained):
            router.expert_bias.copy_(bias)
    results["biases"] = {
        "min_per_layer": [b.min().item() for b in trained], "max_per_layer": [b.max().item() for b in trained],
        "mean_per_layer": [b.mean().item() for b in trained],
        "bf16_collisions_per_layer": [bias_cast_collisions(b) for b in trained],
        "bf16_centred_collisions_per_layer": [bias_cast_collisions(centred(b)) for b in trained],
    }
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; return the exit status (see the module docstring)."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    prog = Path(__file__).name
    if a.out.exists() and not a.overwrite:  # parse_args checked that it holds these arguments' result
        print(f"{a.out}: already written with these arguments; read back, nothing recomputed")
        print(json.dumps({k: v for k, v in json.loads(a.out.read_text()).items() if k in CONDITIONS}, indent=1))
        return 0
    try:
        state = load_checkpoint(a.run_dir / "checkpoint.pt")
        if not (isinstance(state, dict) and {"config", "model"} <= state.keys()):
            raise ValueError("checkpoint.pt is not the training state of a `moebalance train` run (no config and model)")
        torch.set_num_threads(RunConfig.from_dict(state["config"]).train.threads or torch.get_num_threads())
        model, cfg, data = load_frozen(a.run_dir, state)
        if cfg.balance.strategy != "loss_free" or cfg.balance.bias_mode != "additive":
            raise ValueError(f"{a.run_dir} was trained with balance.strategy={cfg.balance.strategy}, "
                             f"bias_mode={cfg.balance.bias_mode}: no additive Loss-Free bias to drop")
        results = measure(model, cfg, data, a.eval_tokens)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: nothing written to {a.out}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 4
    run = {"steps": state.get("step"), "model": cfg.to_dict()["model"], "balance": cfg.to_dict()["balance"],
           "seed": cfg.train.seed, "max_steps": cfg.train.max_steps}
    write_json(a.out, {"args": recorded_args(a), "run": run, **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
