"""Finding a model's routers by what they do, not by their class names.

Shape legend: B batch, S sequence, T tokens, E routed experts, K experts per token.

A router is the module whose forward makes the top-K choice over the ``E`` experts of each token.
:func:`find_routers` runs the model once on a small probe batch (eval mode, no grad, a fixed
seed of its own), watches every ``torch.topk`` / ``Tensor.topk`` call, and notes which module was
innermost when a top-K with ``k = K`` over a dimension of size ``E`` ran. ``E`` and ``K`` come from
the model's config (whatever the family calls them: ``num_experts``, ``num_local_experts``,
``n_routed_experts``, ``moe_num_experts``...; ``num_experts_per_tok``, ``moe_k``, ``top_k``...),
and from the module's own attributes where the config has none. The choices each router made are
counted, so that :mod:`.probe` can check that the patched model makes the same ones.

What it cannot find is refused by the caller with the reason: no such top-K (hash routing,
expert-choice routing, which picks tokens per expert).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moebalance.integrations.transformers.selection import TOPK_FUNCS, scored_tokens, topk_call

#: Config / module attribute names for the number of routed experts and for K, as families spell them.
EXPERT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                "n_experts")
TOP_K_NAMES = ("num_experts_per_tok", "moe_k", "top_k", "moe_topk", "num_experts_per_token", "experts_per_token",
               "moe_top_k", "router_top_k", "top_k_experts")

#: The probe batch: ``[PROBE_BATCH, PROBE_SEQ]`` token ids (a sequence length unlikely to equal E or K).
PROBE_BATCH, PROBE_SEQ = 2, 11


@dataclass
class Router:
    """One router found by the probe forward.

    Attributes:
        name: qualified module name in the model. module: the router module.
        num_experts: ``E``. top_k: ``K``.
        calls: its forwards in the probe; selections: matching top-K calls during them.
    """

    name: str
    module: nn.Module
    num_experts: int
    top_k: int
    calls: int = 0
    selections: int = 0
    reference_counts: torch.Tensor | None = None


def _ints(obj, names: tuple[str, ...]) -> set[int]:
    out = set()
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out.add(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and x > 0 for x in v):
            out |= set(v)
    return out


def _configs(config) -> Iterator:
    """``config`` and every sub-config it holds (``text_config``...), each once."""
    seen, todo = set(), [config]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        todo += [v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]


def expert_counts(config) -> tuple[set[int], set[int]]:
    """The ``E`` and ``K`` values a transformers config names (empty sets when it names none)."""
    experts, ks = set(), set()
    for c in _configs(config):
        experts |= _ints(c, EXPERT_NAMES)
        ks |= _ints(c, TOP_K_NAMES)
    return experts, ks


class _TopKRecorder(TorchFunctionMode):
    """Records ``(innermost module, size of the top-K dim, k, [..., k] indices, that module's
    forward number)`` of every largest-top-K call."""

    def __init__(self, stack: list, entered: dict) -> None:
        super().__init__()
        self.stack, self.entered, self.calls = stack, entered, []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in TOPK_FUNCS and self.stack and (call := topk_call(args, kwargs)) is not None:
            x, k, dim, largest, _ = call
            if largest:
                out = func(*args, **kwargs)
                module = self.stack[-1]
                index = out[1].movedim(dim, -1)[scored_tokens(x, dim)]  # the tokens that carry load
                self.calls.append((module, x.shape[dim], k, index, self.entered.get(module, 0)))
                return out
        return func(*args, **kwargs)


def probe_batch(model: nn.Module) -> dict:
    """Default probe inputs: ``[2, 11]`` token ids drawn with a fixed seed of their own (the
    global RNG is untouched) from the model's vocabulary, on its device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None) or 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(vocab), (PROBE_BATCH, PROBE_SEQ), generator=gen)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = {"input_ids": ids.to(device)}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"]
    return inputs


def run_forward(model: nn.Module, inputs: dict):
    """``model(**inputs, use_cache=False)``, or without ``use_cache`` where the forward refuses it."""
    try:
        return model(**inputs, use_cache=False)
    except TypeError as exc:
        if "use_cache" not in str(exc):
            raise
        return model(**inputs)


def _run_probe(model: nn.Module, inputs: dict, stack: list, entered: dict) -> tuple[list, object]:
    """One eval-mode, no-grad forward of ``model`` on ``inputs`` with the module stack tracked.

    Returns the recorded top-K calls and the model's output; ``entered`` gets each module's call
    count.
    """

    def pre(module, args, kwargs):
        stack.append(module)
        entered[module] = entered.get(module, 0) + 1

    def post(module, args, output):
        stack.pop()

    modes = {m: m.training for m in model.modules()}
    hooks = []
    try:
        for m in model.modules():
            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(m.register_forward_hook(post, always_call=True))
        model.eval()
        recorder = _TopKRecorder(stack, entered)
        with torch.no_grad(), recorder:
            output = run_forward(model, inputs)
        return recorder.calls, output
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training


def find_routers(model: nn.Module, inputs: dict) -> tuple[list[Router], list[str], object]:
    """Every module that makes a top-K choice over the experts, found by one probe forward.

    Args:
        model: a transformers model (or any module the inputs can be fed to).
        inputs: keyword inputs of the probe forward (:func:`probe_batch` makes the default).

    Returns:
        ``(routers, problems, output)``: the routers in module order (each with its ``[E]`` choice
        counts of the probe in ``reference_counts``), one line per problem (a module that makes a
        different number of top-K choices in its forwards; the top-K calls seen when no router
        was found), and the model's output.

    Raises:
        RuntimeError: the probe forward failed (the message says why and suggests ``probe_inputs``).
    """
    config = getattr(model, "config", None)
    experts, ks = expert_counts(config) if config is not None else (set(), set())
    stack: list = []
    entered: dict = {}
    try:
        calls, output = _run_probe(model, inputs, stack, entered)
    except Exception as exc:  # the model's own error, whatever its type
        raise RuntimeError(
            f"the probe forward of {type(model).__name__} failed ({type(exc).__name__}: {exc}); "
            "pass probe_inputs= with keyword inputs this model accepts"
        ) from exc
    names = {m: n for n, m in model.named_modules()}
    skip = {model, getattr(model, "base_model", None)}
    found: dict[nn.Module, Router] = {}
    problems: list[str] = []
    last: dict[tuple, torch.Tensor] = {}
    for module, size, k, index, forward_no in calls:
        if module in skip:
            continue
        e_ok = size in experts or size in _ints(module, EXPERT_NAMES)
        k_ok = k in ks or k in _ints(module, TOP_K_NAMES)
        if e_ok and k_ok and k < size:
            r = found.setdefault(module, Router(names.get(module, ""), module, size, k, entered[module]))
            r.selections += 1
            last[module, forward_no] = index
    for (module, _), index in last.items():  # the choice is a forward's last matching top-K (see .selection)
        r = found[module]
        counts = torch.bincount(index.reshape(-1).cpu(), minlength=r.num_experts).float()
        r.reference_counts = counts if r.reference_counts is None else r.reference_counts + counts
    seen = sorted({f"{type(m).__name__} over {size} with k={k}" for m, size, k, *_ in calls if m not in skip})
    if not found and seen:
        problems.append("top-K calls seen (none over the experts with k = K): " + ", ".join(seen[:6]))
    order = {m: i for i, m in enumerate(names)}
    routers = sorted(found.values(), key=lambda r: order.get(r.module, 0))
    problems += [
        f"{r.name} ({type(r.module).__name__}): {r.selections} top-K choices over {r.num_experts} experts "
        f"in {r.calls} forwards, not the same number in each"
        for r in routers
        if r.selections % r.calls
    ]
    return routers, problems, output
