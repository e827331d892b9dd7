"""What every patched router shares: the load counters, the padding mask, the float32 state.

Shape legend: T tokens, E routed experts, K experts per token.

The counters are plain tensor attributes of the router (``moebalance_load_counts`` for training
forwards, ``moebalance_eval_counts`` for eval-mode forwards), not buffers: a user's
``DistributedDataParallel(model)`` broadcasts rank 0's buffers at every forward by default, which
under gradient accumulation would overwrite each rank's own counts with rank 0's. The bias stays a
persistent buffer (it is saved, and it is identical on every rank anyway).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moebalance.routing import _in_backward_recompute, count_tokens_per_expert, float32_state_after_apply


@dataclass
class TokenMask:
    """The ``[T]`` bool padding mask of the forward in progress (``None`` outside one, or when the
    model was called without an ``attention_mask``). One per model, shared by its routers.

    Its :meth:`before` and :meth:`after` are the model's forward hooks: bound methods, so that a
    ``copy.deepcopy`` of the model gives the copy's hooks and routers one new mask between them,
    and the model can be pickled.

    Attributes:
        mask_T: the mask of the forward in progress.
        last_mask_T: the mask of the last forward, kept after it for a reentrant
            activation-checkpoint recomputation (which runs in the backward, outside the forward).
        model_ref: weak reference to the module whose forward set the mask (for :meth:`reentrant`).
    """

    mask_T: torch.Tensor | None = None
    last_mask_T: torch.Tensor | None = None
    model_ref: weakref.ref | None = None
    _reentrant: bool | None = None

    def reentrant(self) -> bool:
        """Whether the model recomputes with reentrant activation checkpointing (then the first
        forward runs without grad and the recomputation is the one counted). Read from the model
        only when a recomputation asks, once per forward: never on the forward's hot path."""
        if self._reentrant is None:
            model = self.model_ref() if self.model_ref is not None else None
            self._reentrant = model is not None and reentrant_checkpointing(model)
        return self._reentrant

    def for_tokens(self, num_tokens: int, recompute: bool = False) -> torch.Tensor | None:
        """The mask when it covers exactly ``num_tokens`` tokens, else ``None`` (count all)."""
        mask = self.last_mask_T if recompute else self.mask_T
        if mask is None or mask.numel() != num_tokens:
            return None
        return mask

    def before(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        ok = isinstance(mask, torch.Tensor) and mask.dim() == 2
        self.mask_T = self.last_mask_T = mask.reshape(-1).to(torch.bool) if ok else None
        self.model_ref, self._reentrant = weakref.ref(module), None

    def after(self, module, args, output) -> None:
        self.mask_T = None


def reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model runs its layers under reentrant activation checkpointing
    (``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})``):
    a layer's ``_gradient_checkpointing_func`` is a ``partial`` with ``use_reentrant=True``."""
    if not getattr(model, "is_gradient_checkpointing", False):
        return False
    for m in model.modules():
        func = m.__dict__.get("_gradient_checkpointing_func")
        if func is not None and getattr(m, "gradient_checkpointing", False):
            return bool(getattr(func, "keywords", {}).get("use_reentrant", False))
    return False


def install_mask_hooks(model: nn.Module, state: TokenMask) -> list:
    """Forward hooks that put a ``[B, S]`` ``attention_mask`` (keyword, or second positional
    argument) into ``state`` for the routers and clear it after the forward.

    Installed on ``model`` and on its base model (``model.base_model``, e.g. ``model.model`` of a
    ``...ForCausalLM``) when that is another module, so that calling the base model directly also
    excludes padding. Any 2-D mask counts the tokens where it is non-zero, whatever its dtype: that
    is what transformers 5.x attends to (its mask preparation casts every 2-D mask to bool). A 4-D
    mask is not a padding mask and is ignored (all tokens count).
    """
    modules = [model]
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        modules.append(base)
    hooks = []
    for module in modules:
        hooks += [
            module.register_forward_pre_hook(state.before, with_kwargs=True),
            module.register_forward_hook(state.after),
        ]
    return hooks


#: The plain-attribute load counters every router gets.
COUNTERS = ("moebalance_load_counts", "moebalance_eval_counts")


def init_counters(router: nn.Module, num_experts: int, device: torch.device, mask: TokenMask) -> None:
    """Give ``router`` its zero ``[E]`` float32 training and eval counters (plain attributes)."""
    router.moebalance_load_counts = torch.zeros(num_experts, device=device)
    router.moebalance_eval_counts = torch.zeros(num_experts, device=device)
    router._moebalance_mask = mask


def count(router: nn.Module, index_TK: torch.Tensor, finite_T: torch.Tensor | None = None,
          scored: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Add one forward's ``[..., K]`` choice to the router's counters, padding excluded, and tokens
    whose scores were not finite (``finite_T`` False) excluded: they carry no load.

    ``scored``: ``(s [..., E], b [E])``, the unbiased selection scores and the bias of the choice
    (:class:`~.selection.SelectionMode`); a training forward that counts also hands the scores of
    the tokens it counts (the same mask) to the router's ``moebalance_score_recorder``, when it has
    one (a :class:`moebalance.rules.ScoreRecorder`, for Quantile Balancing).

    Training forwards with grad enabled go to ``moebalance_load_counts``: a forward under
    ``torch.no_grad()`` in training mode (RL rollouts, ``generate()``) is not a training step's
    load, as in Megatron-Core. Activation checkpointing counts each token once: the first forward
    under non-reentrant checkpointing (its recomputation is skipped), the recomputation under
    reentrant checkpointing (its first forward runs without grad). Eval-mode forwards go to
    ``moebalance_eval_counts`` (MaxVio_global at evaluation).
    """
    state: TokenMask = router._moebalance_mask
    recompute = _in_backward_recompute()
    if router.training and not torch.is_grad_enabled():
        return
    if recompute and not (router.training and state.reentrant()):
        return
    with torch.no_grad():
        index_TK = index_TK.reshape(-1, index_TK.shape[-1])
        mask = state.for_tokens(index_TK.shape[0], recompute)
        mask = None if mask is None else mask.to(index_TK.device)
        if finite_T is not None:
            finite_T = finite_T.reshape(-1).to(index_TK.device)
            mask = finite_T if mask is None else mask & finite_T
        num_experts = router.moebalance_load_counts.numel()
        counts = count_tokens_per_expert(index_TK, num_experts, mask)
        name = "moebalance_load_counts" if router.training else "moebalance_eval_counts"
        counter = getattr(router, name)
        if counter.device != counts.device:  # moved without _apply (FSDP2)
            counter = counter.to(counts.device)
            setattr(router, name, counter)
        counter += counts.to(counter.dtype)
        recorder = router.__dict__.get("moebalance_score_recorder")
        if scored is not None and recorder is not None and router.training:
            scores = scored[0].reshape(-1, scored[0].shape[-1])
            recorder(scores, scored[1].to(scores.device), mask)


def keep_fp32(holder: nn.Module, names: list[str], device_of: Callable[[], torch.device]) -> None:
    """Make ``holder``'s ``_apply`` keep the named tensors (buffers or Parameters: the Loss-Free
    bias, the counters) float32 through dtype casts (an update of 1e-3 vanishes in bfloat16 once
    the bias nears 1), move them to ``device_of()`` after the rest, and give zeros after
    ``to_empty`` on a meta-device model (see :func:`float32_state_after_apply`).

    Patched on the instance; a second call adds its names to the first's.
    """
    kept = holder.__dict__.setdefault("_moebalance_fp32", [])
    kept += [n for n in names if n not in kept]
    holder._moebalance_device_of = device_of
    holder._apply = types.MethodType(_keep_fp32_apply, holder)


def _keep_fp32_apply(self: nn.Module, fn, recurse: bool = True):
    saved = {}
    for name in self._moebalance_fp32:
        for store in (self._parameters, self._buffers):
            if name in store:
                saved[name] = (store, store.pop(name))
    try:
        type(self)._apply(self, fn, recurse)
    finally:
        device = self._moebalance_device_of()
        for name, (store, tensor) in saved.items():
            new = float32_state_after_apply(tensor.detach(), fn, device, 0.0)
            store[name] = nn.Parameter(new, requires_grad=False) if isinstance(tensor, nn.Parameter) else new
        for name in self._moebalance_fp32:
            if name not in saved and isinstance(getattr(self, name, None), torch.Tensor):  # plain attributes
                setattr(self, name, float32_state_after_apply(getattr(self, name), fn, device, 0.0))
    return self
