"""Which MoE families of the installed transformers take Loss-Free Balancing: a generated table.

Run ``python -m moebalance.integrations.transformers.coverage [--write FILE]`` to print (or write)
the table of docs/transformers-coverage.md; ``tests/test_coverage.py`` regenerates it and fails
when the stored table is out of date. Nothing is downloaded: each family is built from a tiny
config (:func:`~.tiny.tiny_config_for`).

The MoE families are found in the installed transformers itself (model types whose modeling code
names a number of experts and calls a top-K), not listed by hand. Each one that builds is put
through the functional checks of :func:`check_family`.
"""

from __future__ import annotations

import argparse
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

#: Words of a modeling file that mark an MoE family (a number of experts, and a top-K).
_EXPERTS = re.compile(r"num_experts|n_routed_experts|num_local_experts|moe_num_experts")


@dataclass
class Row:
    """One family's line of the table."""

    model_type: str
    status: str  # "works", "refused", "not built", "not run"
    model_class: str = ""
    router_class: str = ""
    routers: int = 0
    slot: str = ""
    reason: str = ""


def moe_model_types() -> list[str]:
    """Model types of the installed transformers whose modeling code names experts and a top-K."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    out = []
    for model_type in CONFIG_MAPPING_NAMES:
        folder = root / model_type.replace("-", "_")
        src = "".join(f.read_text(errors="replace") for f in sorted(folder.glob("modeling_*.py")))
        if _EXPERTS.search(src) and "topk" in src.lower():
            out.append(model_type)
    return sorted(out)


def _build(model_type: str):
    from transformers import AutoModel, AutoModelForCausalLM

    from moebalance.integrations.transformers.tiny import tiny_config_for

    config = tiny_config_for(model_type)
    try:
        return AutoModelForCausalLM.from_config(config)
    except ValueError:
        return AutoModel.from_config(config)


def _train_checks(model, handle) -> str | None:
    """Loads = tokens x K on every router; one update per optimizer step (two micro-batches)."""
    from moebalance.integrations.transformers.discovery import probe_batch

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    handle.attach(opt)
    inputs = probe_batch(model)
    tokens = inputs["input_ids"].numel()
    for _ in range(2):
        out = model(**inputs, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits.float().mean().backward()
    loads = handle.pending_loads()
    want = [2 * tokens * r._moebalance_choice[1] for r in handle.routers]
    if loads.sum(-1).tolist() != [float(w) for w in want]:
        return f"loads {loads.sum(-1).tolist()} != tokens x K {want}"
    before = handle.biases()
    opt.step()
    if handle.steps != 1 or torch.equal(before, handle.biases()):
        return f"{handle.steps} updates for one optimizer step"
    handle.detach()
    return None


def check_family(model_type: str) -> Row:
    """Build a tiny model of ``model_type``, apply Loss-Free Balancing and run the checks.

    The checks: a bias on every router the probe finds; the probe's bit-identical output and
    choices at the current bias and its steering check (inside ``apply_loss_free_balancing``);
    loads equal tokens x K on every router; exactly one bias update per optimizer step over two
    micro-batches.
    """
    from moebalance.integrations.transformers import apply_loss_free_balancing

    try:
        torch.manual_seed(0)
        model = _build(model_type)
    except Exception as exc:  # a tiny config that does not build says nothing about routing
        return Row(model_type, "not built", reason=f"tiny config does not build: {type(exc).__name__}: {exc}")
    row = Row(model_type, "refused", type(model).__name__)
    try:
        handle = apply_loss_free_balancing(model)
    except (ValueError, RuntimeError) as exc:
        row.reason = str(exc).split("; pass probe_inputs")[0]
        if row.reason.startswith("the probe forward"):  # the tiny config's forward fails: routing untested
            row.status, row.reason = "not run", f"tiny model's forward fails: {row.reason}"
        return row
    first = handle.routers[0]
    slot = first._moebalance_slot
    row.router_class, row.routers = type(first).__name__, len(handle.routers)
    row.slot = f"own `{slot.key.split('.', 2)[-1] if slot.key.count('.') > 2 else slot.key}`" if slot.own else "added"
    problem = _train_checks(model, handle)
    row.status, row.reason = ("works", "") if problem is None else ("refused", f"functional check failed: {problem}")
    return row


def table(rows: list[Row]) -> str:
    """The markdown table of ``rows`` with a summary line."""
    import transformers

    works = [r for r in rows if r.status == "works"]
    own = [r for r in works if r.slot.startswith("own")]
    lines = [
        "# Loss-Free Balancing across the MoE families of transformers",
        "",
        "Generated by `python -m moebalance.integrations.transformers.coverage --write docs/transformers-coverage.md`",
        "(tests/test_coverage.py regenerates it and fails when it is out of date). Every family is built from",
        "a tiny config, nothing downloaded. *works*: the probe found a router in every MoE layer, proved the",
        "patched model bit-identical and steered by the bias, loads equal tokens x K, one update per optimizer",
        "step. *refused*: moebalance cannot steer its routing (the reason says why). *not built* / *not run*:",
        "the tiny config of the family does not build or run, so its routing was not tried.",
        "",
        f"transformers {transformers.__version__}: {len(rows)} MoE families, {len(works)} work "
        f"({len(own)} train their own bias slot, {len(works) - len(own)} get an added `expert_bias`), "
        f"{sum(r.status == 'refused' for r in rows)} refused, {sum(r.status == 'not built' for r in rows)} "
        f"not built from a tiny config, {sum(r.status == 'not run' for r in rows)} whose tiny model's forward fails.",
        "",
        "| family | status | model class | router class | routers | bias slot | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| `{r.model_type}` | {r.status} | {r.model_class} | {r.router_class} | {r.routers or ''} "
            f"| {r.slot} | {reason} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, help="write the table to this file instead of printing it")
    parser.add_argument("families", nargs="*", help="model types (default: every MoE family)")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows = [check_family(m) for m in (args.families or moe_model_types())]
    text = table(rows)
    if args.write:
        args.write.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
