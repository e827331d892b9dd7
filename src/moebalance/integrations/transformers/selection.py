"""The one place where a transformers router's top-K choice is seen and steered.

Shape legend: T tokens, E routed experts, K experts per token.

Every MoE router in transformers, whatever its score function, normalisation or scaling, makes its
choice with one ``torch.topk`` over the ``E`` expert scores of each token (``k = K``). moebalance
does not re-implement any router: it runs the model's own ``forward`` inside a
:class:`SelectionMode`, a ``TorchFunctionMode`` active only during that module's forward, which
intercepts exactly that call (``torch.topk`` or ``Tensor.topk`` on a tensor whose ``dim`` has size
``E``, with ``k = K`` and ``largest=True``) and

* records the ``[..., K]`` indices for the load counts (arXiv 2408.15664 Algorithm 1, ``c_i``);
  when a router makes more than one such top-K in a forward (group-limited routing with one
  group scores each group by a top-K over all ``E`` experts first), the last one is the choice;
* for routers without a selection bias of their own, chooses the top-K on ``scores + expert_bias``
  and returns the *unbiased* scores of the chosen experts as the values (eq. 3: the bias only
  selects, the gate weights are computed by the model's own code from the unbiased scores);
* for a score-based bias rule (Quantile Balancing), keeps the unbiased selection scores ``s``
  ``[T, E]`` and the bias ``b`` of the choice for the router's ``moebalance_score_recorder``.

A router that has its own bias (``e_score_correction_bias``, ``expert_bias``) already adds it
before this call; the mode then only records. Everything else in the forward runs unchanged,
which the probe (:mod:`.probe`) checks bit for bit before a router is accepted.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moebalance.integrations.transformers.routers import count

TOPK_FUNCS = (torch.topk, torch.Tensor.topk)


def topk_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, int, bool, bool] | None:
    """``(input, k, dim, largest, sorted)`` of a ``topk`` call's arguments (``dim`` made
    non-negative), or ``None`` when they are not a plain tensor top-K."""
    names = ("input", "k", "dim", "largest", "sorted")
    defaults = {"dim": -1, "largest": True, "sorted": True}
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    x, k = bound.get("input", bound.get("self")), bound.get("k")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not isinstance(k, int) or bound.get("out") is not None:
        return None
    dim = bound["dim"] if bound["dim"] >= 0 else bound["dim"] + x.dim()
    return x, k, dim, bool(bound["largest"]), bool(bound["sorted"])


class SelectionMode(TorchFunctionMode):
    """Intercepts the top-K over ``num_experts`` scores inside one module's forward.

    Args:
        num_experts: ``E``, the size of the scored dimension.
        top_k: ``K``.
        bias_E: ``[E]`` float32 bias added to the scores for the choice only, or ``None`` (the
            router applies its own bias; only record).
        on_select: called on leaving the mode with the ``[..., K]`` indices of the last matching
            top-K (expert dimension last), the ``[...]`` mask of tokens whose scores were finite,
            and ``(s [..., E], b [E])`` when ``own_bias_E`` or ``record_scores`` asks for the
            scores (else ``None``).
        record_scores: keep, for a score-based bias rule (Quantile Balancing), the unbiased
            selection scores ``s`` (a float32 copy, expert dimension last) and the bias ``b`` whose
            ``s + b`` the top-K was taken on: with ``bias_E``, ``s`` is the top-K input and
            ``b = bias_E``; without, the top-K input is ``s + b`` for the router's own bias
            ``own_bias_E`` (``b``), so ``s`` = input - ``b`` (to float32 rounding).
        own_bias_E: the router's own ``[E]`` bias (only read when ``record_scores`` and no ``bias_E``).

    Source: the selection rule of arXiv 2408.15664 eq. 3; the interception itself is ours.
    """

    def __init__(self, num_experts: int, top_k: int, bias_E: torch.Tensor | None,
                 on_select: Callable[..., None], record_scores: bool = False,
                 own_bias_E: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.bias_E, self.on_select = num_experts, top_k, bias_E, on_select
        self.record_scores, self.own_bias_E = record_scores, own_bias_E
        self.calls = 0
        self.last_index: torch.Tensor | None = None
        self.last_finite: torch.Tensor | None = None
        self.last_scored: tuple[torch.Tensor, torch.Tensor] | None = None

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self.last_index is not None and exc[0] is None:
            self.on_select(self.last_index, self.last_finite, self.last_scored)
        return out

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in TOPK_FUNCS and (call := topk_call(args, kwargs)) is not None:
            x, k, dim, largest, sorted_ = call
            if k == self.top_k and largest and x.shape[dim] == self.num_experts:
                self.calls += 1
                return self._select(x, dim, sorted_)
        return func(*args, **kwargs)

    def _select(self, scores: torch.Tensor, dim: int, sorted_: bool):
        shape = [1] * scores.dim()
        shape[dim] = self.num_experts
        if self.bias_E is None:
            values, index = torch.topk(scores, self.top_k, dim=dim, sorted=sorted_)
        else:
            bias = self.bias_E.to(scores.device).view(shape)
            index = torch.topk(scores.detach() + bias, self.top_k, dim=dim, sorted=sorted_).indices
            values = scores.gather(dim, index)  # unbiased: the bias only selects (eq. 3)
            values = floor_underflowed(values, dim)
        self.last_index = index.movedim(dim, -1)
        self.last_finite = scored_tokens(scores, dim)
        if self.record_scores:
            self.last_scored = self._scores(scores.detach(), dim, shape)
        return torch.return_types.topk((values, index))

    def _scores(self, x: torch.Tensor, dim: int, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s [..., E] float32, b [E])`` of a top-K input ``x`` (see ``record_scores``); a copy,
        so that the router's code after the top-K cannot change it."""
        if self.bias_E is not None:
            return x.to(torch.float32, copy=True).movedim(dim, -1), self.bias_E
        bias = self.own_bias_E.detach().to(x.device, torch.float32)
        return (x.float() - bias.view(shape)).movedim(dim, -1), bias


def scored_tokens(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``[...]`` bool: the tokens whose scores hold no NaN and no +inf; the others carry no load
    (-inf is how routers mask the experts of excluded groups, so it is allowed)."""
    s = scores.detach()
    return ~(s.isnan() | s.isposinf()).any(dim=dim)


def floor_underflowed(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Replace a token's selected scores by the smallest normal float when *all* of them are 0.

    A bias can select experts whose softmax probabilities underflowed to 0 (logits ``[200, 0, 0,
    0]``); renormalising the K gates would then divide 0 by 0. With every selected score raised to
    the same tiny value the renormalised gates are finite and equal. A token with any non-zero
    selected score is left bit-identical.
    """
    if not values.is_floating_point():
        return values
    dead = (values == 0).all(dim=dim, keepdim=True)  # no data-dependent branch: torch.compile traces it whole
    return torch.where(dead, torch.finfo(values.dtype).tiny, values)


def steer_forward(module: nn.Module, num_experts: int, top_k: int, added_bias: str | None) -> None:
    """Run ``module``'s forward inside a :class:`SelectionMode` from now on (this instance only).

    Args:
        module: the router (the module whose forward makes the top-K choice).
        num_experts, top_k: ``E`` and ``K`` of that choice.
        added_bias: name of the ``[E]`` float32 buffer of ``module`` to add for the choice, or
            ``None`` when the model applies its own bias (the mode then only records).

    Everything the replacement reads lives on ``module`` and it is a bound method, so
    ``copy.deepcopy`` (PEFT's ``modules_to_save``) gives the copy its own bias and counters. The
    forward in place before (the class's, or one a library put on the instance) is kept as
    ``module._moebalance_inner_forward`` and called inside the mode.
    """
    module._moebalance_inner_forward = module.__dict__.get("forward") or types.MethodType(type(module).forward, module)
    module._moebalance_choice = (num_experts, top_k, added_bias)
    module.forward = types.MethodType(_steered_forward, module)


def unsteer_forward(module: nn.Module) -> None:
    """Undo :func:`steer_forward` (the forward in place before it is restored)."""
    inner = module.__dict__.pop("_moebalance_inner_forward")
    if inner.__func__ is type(module).forward:
        del module.forward
    else:
        module.forward = inner


def _steered_forward(self: nn.Module, *args, **kwargs):
    num_experts, top_k, added = self._moebalance_choice
    bias = None if added is None else getattr(self, added)
    record = self.__dict__.get("moebalance_score_recorder") is not None  # a score-based rule (quantile)
    own = self._moebalance_slot.tensor() if record and added is None else None
    with SelectionMode(num_experts, top_k, bias, functools.partial(count, self), record, own):
        return self._moebalance_inner_forward(*args, **kwargs)
