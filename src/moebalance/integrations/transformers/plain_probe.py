"""The plain-``transformers`` half of ``moebalance verify``: load a ``save_pretrained`` folder and
record each router's expert choice on a probe batch.

Shape legend: B sequences, S tokens per sequence, T = B * S tokens, K experts per token.

:mod:`.verify` runs this file's source as a fresh Python process (``python -c``), so the model it
loads has never seen moebalance: the file imports only ``torch``, ``transformers`` and the standard
library, never moebalance. :mod:`.verify` also imports it, to load the model and read the choices
the same way under moebalance.

Command line (``python -c SOURCE FOLDER WORK_DIR THREADS``): reads ``WORK_DIR/probe.pt`` (``{"ids":
[B, S] int64, "routers": [router module names], "bias_keys": [state-dict names]}``), writes
``WORK_DIR/plain.pt`` (``{"routing": {router: [T, K] int64}, "biases": {bias key: [E] float32}}``,
holding only the bias keys the plain model has) and ``WORK_DIR/plain.json`` (the load report:
unexpected and missing keys, the model class, and whether anything had imported moebalance). Exit status 0, or 1 with one line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def load_model(folder: str | Path):
    """The model of a ``save_pretrained`` folder, float32, in eval mode, and its load report.

    The class is the config's first ``architectures`` entry when transformers has it, else
    ``AutoModelForCausalLM``. Float32 for both halves of ``verify``, so only the routing differs.

    Returns:
        ``(model, info)``: ``info`` holds transformers' ``unexpected_keys`` and ``missing_keys``
        (sorted lists of checkpoint / model keys) and ``model_class``.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else transformers.AutoModelForCausalLM
    model, info = cls.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    model.eval()
    report = {k: sorted(str(x) for x in info.get(k, ())) for k in ("unexpected_keys", "missing_keys")}
    report["model_class"] = type(model).__name__
    return model, report


def expert_index(output, router_name: str) -> torch.Tensor:
    """The ``[T, K]`` expert ids in a router's output: its first integer tensor (transformers 5.x
    routers return ``(logits, top-K weights, top-K ids)``).

    Raises:
        ValueError: the output holds no integer tensor (the message names the router).
    """
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, torch.Tensor) and not item.is_floating_point() and item.dtype != torch.bool:
            return item.reshape(-1, item.shape[-1]) if item.dim() > 1 else item.reshape(-1, 1)
    raise ValueError(f"router {router_name!r} returned no integer expert ids; cannot read its choice")


@torch.no_grad()
def probe_routing(model: torch.nn.Module, router_names: list[str], ids_BS: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named router's expert choice on one eval-mode forward of ``ids_BS``.

    Args:
        model: the loaded model (its mode is restored afterwards).
        router_names: qualified module names of the routers in ``model``.
        ids_BS: ``[B, S]`` int64 token ids.

    Returns:
        ``{router name: [T, K] int64 ids}`` in the order of ``router_names`` (the calls of a
        router that runs more than once per forward are concatenated).

    Raises:
        ValueError: a name is not a module of ``model``, or a router's output holds no ids.
    """
    modules = dict(model.named_modules())
    missing = [n for n in router_names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module {missing[0]!r} ({len(missing)} router(s) missing)")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in router_names}
    hooks = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append(expert_index(out, n).cpu().long()))
        for n in router_names
    ]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=ids_BS.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n: torch.cat(seen[n]) if seen[n] else torch.empty(0, 1, dtype=torch.long) for n in router_names}


def main(argv: list[str]) -> int:
    """The fresh-process entry point (see the module docstring)."""
    folder, work, threads = argv[0], Path(argv[1]), int(argv[2])
    try:
        torch.set_num_threads(threads)
        probe = torch.load(work / "probe.pt", weights_only=True)
        model, report = load_model(folder)
        routing = probe_routing(model, probe["routers"], probe["ids"])
        state = model.state_dict()
        biases = {k: state[k].detach().float().cpu() for k in probe["bias_keys"] if k in state}
        torch.save({"routing": routing, "biases": biases}, work / "plain.pt")
        report["moebalance_imported"] = any(m == "moebalance" or m.startswith("moebalance.") for m in sys.modules)
        (work / "plain.json").write_text(json.dumps(report))
    except Exception as exc:  # the parent reports it as one line
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
