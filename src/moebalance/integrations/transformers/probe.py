"""The one probe: before a model is handed back, prove on a probe batch that moebalance changed
nothing in its routing, and that the bias it trains really steers the choice.

Shape legend: E routed experts, L routers.

Two checks, both on the whole model (eval mode, no grad, the probe batch of :mod:`.discovery`):

1. **Bit-identical at the current bias.** The patched model's output equals the unpatched
   model's output bit for bit (every tensor of it, same dtype and shape; NaN equal to NaN, so that
   uninitialised weights after ``to_empty`` compare too), and every router chose each expert
   exactly as often as before. For a router whose own bias moebalance adopted this is the bias
   the model ships with; for an added ``expert_bias`` it is zero.
2. **The bias steers.** With a bias that is large on each router's least-chosen expert and 0
   elsewhere, every token of every router chooses it. This catches a bias that is not the one the
   choice reads.

Biases, load counters and module modes are restored afterwards, and the global RNG is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from moebalance.integrations.transformers.discovery import Router, run_forward

log = logging.getLogger("moebalance.integrations.transformers")

#: Bias added to one expert in the steering check: far above any score a router computes.
STEER_BIAS = 1.0e4


def tensors_of(output) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` of every tensor in a model output (``ModelOutput``, tuple, dict, nested)."""
    if isinstance(output, torch.Tensor):
        yield "", output
    elif isinstance(output, dict):
        for k, v in output.items():
            yield from ((f"{k}{p}", t) for p, t in tensors_of(v))
    elif isinstance(output, (tuple, list)):
        for i, v in enumerate(output):
            yield from ((f"[{i}]{p}", t) for p, t in tensors_of(v))


def first_difference(ref, got) -> str | None:
    """Where two model outputs differ (path and what), or ``None`` when they are bit-identical."""
    a, b = dict(tensors_of(ref)), dict(tensors_of(got))
    if a.keys() != b.keys():
        return f"outputs {sorted(a)} against {sorted(b)}"
    for path, x in a.items():
        y = b[path]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{path or 'output'}: {x.dtype} {tuple(x.shape)} against {y.dtype} {tuple(y.shape)}"
        same = (x == y) | (x != x) & (y != y) if x.is_floating_point() else x == y
        if not bool(same.all()):
            return f"{path or 'output'}: values differ"
    return None


def _probe_counts(model: nn.Module, inputs: dict, routers: list[nn.Module]) -> tuple[object, list[torch.Tensor]]:
    """One eval-mode no-grad forward; returns its output and each router's ``[E]`` choice counts.
    The routers' eval counters and every module's mode are as before afterwards."""
    modes = {m: m.training for m in model.modules()}
    saved = [r.moebalance_eval_counts.clone() for r in routers]
    for r in routers:
        r.moebalance_eval_counts.zero_()
    try:
        model.eval()
        with torch.no_grad():
            output = run_forward(model, inputs)
        return output, [r.moebalance_eval_counts.detach().cpu().clone() for r in routers]
    finally:
        for m, training in modes.items():
            m.training = training
        for r, counts in zip(routers, saved):
            r.moebalance_eval_counts.copy_(counts)


def constant_single_gates(outputs: list) -> bool:
    """True when top-1 routers hand out a gate of exactly 1 for every token (a ``[..., 1]`` float
    tensor of ones in their output): renormalising one gate makes it constant, so the router gets
    no gradient from the loss (transformers does this for Mixtral, and with ``norm_topk_prob``)."""
    return bool(outputs) and all(
        any(t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == 1 and bool((t == 1).all())
            for _, t in tensors_of(out))
        for out in outputs
    )


def check_identical(model: nn.Module, inputs: dict, reference_output, found: list[Router]) -> None:
    """Check 1 above; also warns once when every top-1 router's gates are constant (see
    :func:`constant_single_gates`).

    Raises:
        RuntimeError: the outputs or a router's choices differ (the message names the router class).
    """
    outputs: list = []
    hooks = [r.module.register_forward_hook(lambda m, a, out: outputs.append(out)) for r in found if r.top_k == 1]
    try:
        output, counts = _probe_counts(model, inputs, [r.module for r in found])
    finally:
        for h in hooks:
            h.remove()
    if constant_single_gates(outputs):
        log.warning(
            "%s: top-1 routing with renormalised gates gives every token a gate of 1, so the routers get no "
            "gradient from the loss (as the model's own code computes it); moebalance's own TopKRouter refuses "
            "this combination", type(found[0].module).__name__,
        )
    for r, got in zip(found, counts):
        if not torch.equal(got, r.reference_counts):
            raise RuntimeError(
                f"{r.name} ({type(r.module).__name__}): with moebalance in place it chooses other experts than "
                "the model's own code on the probe batch; refusing to patch it"
            )
    if (where := first_difference(reference_output, output)) is not None:
        raise RuntimeError(
            f"{type(model).__name__}: with moebalance in place the model's output changes on the probe batch "
            f"({where}); refusing to patch it"
        )


def check_steers(model: nn.Module, inputs: dict, found: list[Router], biases: list[torch.Tensor]) -> None:
    """Check 2 above (``biases``: each router's live ``[E]`` bias).

    Raises:
        RuntimeError: a router does not follow its bias (the message names the router class).
    """
    saved = [b.clone() for b in biases]
    targets = [int(r.reference_counts.argmin()) for r in found]
    try:
        with torch.no_grad():
            for b, j in zip(biases, targets):  # only the target's bias: whatever the current values are
                b.zero_()
                b[j] = STEER_BIAS
        _, counts = _probe_counts(model, inputs, [r.module for r in found])
    finally:
        with torch.no_grad():
            for b, s in zip(biases, saved):
                b.copy_(s)
    for r, got, j in zip(found, counts, targets):
        tokens = got.sum() / r.top_k
        if tokens == 0 or got[j] != tokens:
            raise RuntimeError(
                f"{r.name} ({type(r.module).__name__}): a bias of {STEER_BIAS:g} on expert {j} did not make every "
                f"token choose it ({int(got[j])} of {int(tokens)}); the bias moebalance trains would not steer "
                "this router, refusing it"
            )
