"""Numeric guards of the training step: non-finite loss, router logits or gradients.

A step that meets a non-finite value is skipped as a whole (no weight update, no bias update, its
load counts discarded) or, with ``train.on_nonfinite=stop``, ends the run with
:class:`NonFiniteError`. Router logits are checked on their own because a saturating score
function hides them: ``sigmoid(+inf) = 1`` gives a finite gate and a finite loss while the
routing is already garbage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moebalance.routing import RouterOutput

__all__ = ["NonFiniteError", "nonfinite_reason"]


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite value and the config says to stop."""


def nonfinite_reason(loss: torch.Tensor, routing: Sequence[RouterOutput]) -> str | None:
    """Why this micro-batch is unusable, or ``None`` when the loss and every router logit are finite.

    One host synchronisation for the whole check (the flags are stacked before ``.item``).

    Args:
        loss: 0-dim training loss of the micro-batch (LM loss plus balancing losses).
        routing: one :class:`~moebalance.routing.RouterOutput` per MoE layer (``logits`` ``[T, E]``).

    Returns:
        e.g. ``"loss is nan"`` or ``"router logits of MoE layer 1 are not finite"``.
    """
    flags = torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(r.logits).all() for r in routing])
    if bool(flags.all()):
        return None
    reasons = []
    if not bool(flags[0]):
        reasons.append(f"loss is {loss.item()}")
    bad_layers = [i for i in range(len(routing)) if not bool(flags[i + 1])]
    if bad_layers:
        reasons.append(f"router logits of MoE layer {', '.join(map(str, bad_layers))} are not finite")
    return "; ".join(reasons)
