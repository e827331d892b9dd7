"""Load balancing: the Loss-Free bias update, the auxiliary-loss baselines and their combination.

Shape legend: B sequences, S tokens per sequence, T = B*S tokens, E experts, K experts per token,
L MoE layers.

* :class:`LossFreeBalancer` is Algorithm 1 of arXiv 2408.15664: after each optimizer step,
  ``b_i <- b_i + u * sign(c_mean - c_i)`` from the load counted since the previous step; the
  other bias rules (``error``, ``smebu``, ``proportional``, ``quantile``) are in
  :mod:`moebalance.rules` and run behind the same object.
* The auxiliary losses are pure functions in :mod:`moebalance.losses` (sequence-wise eq. 2,
  batch-level, global-batch, CV² importance, router z-loss); :class:`AuxLossBalancer` wraps the
  sequence-wise one for a list of layers, :class:`GlobalBatchCounts` gathers the global batch's
  expert counts for the global-batch loss.
* :class:`Balancing` is what the training loop talks to: one object per run, built from
  :class:`~moebalance.train.config.BalanceConfig` by strategy name (:data:`STRATEGIES`).

Nothing is stashed in global lists: losses are computed from the router outputs the model returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from moebalance.checks import check_loads, check_number, check_score_tensor
from moebalance.losses import (
    batch_aux_loss,
    global_batch_aux_loss,
    importance_loss,
    normalize_scores,
    router_z_loss,
    sequence_aux_loss,
)
from moebalance.routing import RouterOutput, TopKRouter, is_finite_number
from moebalance.rules import RULES, BiasRule, ScoreRecorder, make_rule

UpdateMode = Literal["sign", "error", "smebu", "proportional", "quantile"]
_F32 = torch.finfo(torch.float32)
AuxScores = Literal["normalized", "raw"]

#: Balancing strategies by name: which auxiliary loss (if any) and whether the Loss-Free bias is
#: updated. ``aux_loss`` is the paper's sequence-wise baseline (eq. 2); ``deepseek_v3`` is
#: Loss-Free plus a tiny complementary sequence-wise loss (DeepSeek-V3 report, §2.1.2).
STRATEGIES: dict[str, tuple[str | None, bool]] = {
    "none": (None, False),
    "loss_free": (None, True),
    "aux_loss": ("sequence", False),
    "batch_aux_loss": ("batch", False),
    "global_aux_loss": ("global", False),
    "importance_loss": ("importance", False),
    "deepseek_v3": ("sequence", True),
}

__all__ = [
    "AuxLossBalancer",
    "Balancing",
    "GlobalBatchCounts",
    "LossFreeBalancer",
    "OptimizerHook",
    "STRATEGIES",
    "find_routers",
    "fused_step_found_inf",
    "grad_scaler_of",
    "pop_expert_loads",
    "rule_from_config",
    "router_z_loss",
    "sequence_aux_loss",
    "sum_over_default_group_",
    "unwrap_optimizer",
]


def find_routers(module: nn.Module) -> list[TopKRouter]:
    """Every :class:`TopKRouter` inside ``module`` (``module`` itself included), in module order.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"model must be an nn.Module (a model, an MoE layer or a TopKRouter), got {type(module).__name__}")
    return [m for m in module.modules() if isinstance(m, TopKRouter)]


def pop_expert_loads(routers: Sequence[TopKRouter]) -> torch.Tensor:
    """Read and clear the training-mode load counters of ``routers``.

    Returns:
        ``[L, E]`` float32 tokens routed to each expert of each layer since the last call.
        All routers must have the same ``E``.

    Raises:
        ValueError: no router, an item that is not a :class:`TopKRouter`, or routers of different ``E``.
    """
    bad = [type(r).__name__ for r in routers if not isinstance(r, TopKRouter)]
    if bad:
        raise ValueError(f"routers must be TopKRouter modules (see find_routers), got {bad[0]}")
    if not routers:
        raise ValueError("no TopKRouter found: the model has no MoE layer")
    sizes = {r.load_counts.numel() for r in routers}
    if len(sizes) > 1:
        raise ValueError(f"routers have different num_experts {sorted(sizes)}; balance them one at a time (step(router))")
    with torch.no_grad():
        counts = [r.load_counts for r in routers]
        loads_LE = torch.stack(counts)  # a new tensor: clearing the counters below leaves it intact
        torch._foreach_zero_(counts)  # one fused call instead of L small ones
    return loads_LE


def sum_over_default_group_(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` in place over ``torch.distributed``'s default process group when one is
    initialised with more than one rank; a no-op otherwise (single process, or no group).

    The ``all_reduce="auto"`` of :class:`LossFreeBalancer`. Every rank must call it (a rank that
    skips the bias update leaves the others waiting until the group's timeout).

    Raises:
        ValueError: ``tensor`` is not a ``torch.Tensor``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _check_rate_scale(rate_scale: float) -> None:
    """Raise ``ValueError`` unless ``rate_scale`` is an int or float in ``[0, 1]``."""
    if not (is_finite_number(rate_scale) and 0.0 <= rate_scale <= 1.0):
        raise ValueError(f"rate_scale must be a number (int or float) in [0, 1], got {rate_scale!r}")


class LossFreeBalancer:
    """Auxiliary-Loss-Free Load Balancing bias update (arXiv 2408.15664 §3, Algorithm 1).

    Call :meth:`step` once per optimizer step, after ``optimizer.step()``. It reads the load each
    router counted in training mode since the previous call (all gradient-accumulation
    micro-batches of the step), updates every router's ``expert_bias`` and clears the counts.
    Because only loads of *past* batches enter the bias, a token's routing never depends on later
    tokens of its own batch (§5 of the paper).

    Args:
        update_rate: ``u > 0`` (paper default 1e-3; its ablation tries 1e-4 and 1e-2).
        update: the rule, by name or as a :class:`moebalance.rules.BiasRule` (with its options):
            ``"sign"`` (Algorithm 1: ``b += u * sign(e)``), ``"error"`` (the paper's ablation,
            ``b += u * e / c_mean``: the raw error, divided by the mean load so that the rate does
            not depend on the batch size), ``"smebu"`` (Arcee Trinity), ``"proportional"``
            (LongCat-Flash), ``"quantile"`` (Quantile Balancing: needs the routers' scores, so
            call :meth:`prepare` on the model before its first training forward; :meth:`attach`
            does). Each rule's formula and source: :mod:`moebalance.rules`.
        all_reduce: how the ``[L, E]`` float32 load matrix is summed over data-parallel ranks
            before the update, so that every rank updates from the global batch's load and keeps
            identical biases. ``"auto"`` (default): :func:`sum_over_default_group_`, a sum over
            ``torch.distributed``'s default process group when one is initialised with more than
            one rank at the time of the step (own DDP / FSDP loops, Accelerate, torchrun), nothing
            otherwise. A function: applied in place (e.g. ``moebalance.parallel.all_reduce_sum_``,
            or a sum over a sub-group). ``None``: never reduce; each rank updates from its own
            loads (the biases of the ranks drift apart).
        center: after each update subtract each layer's mean bias, so the biases of a layer sum
            to 0 (torchtitan does this). Routing does not change: the top-K of ``s + b`` is the
            same as that of ``s + b - c`` for any constant ``c`` (also group-limited routing,
            whose group scores all shift by ``2c``), and the gates never contain ``b``. What
            changes: the biases stay bounded near 0 in long runs (with the sign rule all of them
            can drift together, e.g. when most experts are under-loaded), which keeps their
            float32 resolution and makes a bfloat16 export of the bias lose less; the values
            differ from the paper's rule by a per-layer constant, and ``s + b`` may round
            differently in the last bit. Default False: Algorithm 1 as published. Additive
            bias only.

    Raises:
        ValueError: ``update_rate`` not an int or float (a tensor or NumPy float32 is not) in
            ``[1.18e-38, 3.40e38]`` (a normal float32; a
            larger one makes the float32 delta inf and the biases NaN, a smaller one underflows),
            an unknown ``update``, a non-boolean ``center``, or an ``all_reduce`` that is not
            ``"auto"``, ``None`` or callable.

    Routers whose ``bias_frozen`` is True keep their bias (their loads are still read and cleared).
    """

    def __init__(
        self,
        update_rate: float = 1e-3,
        update: UpdateMode | BiasRule = "sign",
        all_reduce: Callable[[torch.Tensor], None] | Literal["auto"] | None = "auto",
        center: bool = False,
    ) -> None:
        if not is_finite_number(update_rate) or not _F32.tiny <= update_rate <= _F32.max:
            raise ValueError(
                f"update_rate must be a number (int or float) > 0 and finite as a float32 (in [{_F32.tiny:.3g}, "
                f"{_F32.max:.3g}]: the biases are float32), got {update_rate!r}"
            )
        if not isinstance(update, BiasRule) and not (isinstance(update, str) and update in RULES):
            raise ValueError(f"update must be one of {list(RULES)} or a moebalance.rules.BiasRule, got {update!r}")
        if not isinstance(center, bool):
            raise ValueError(f"center must be True or False, got {center!r}")
        if not (all_reduce is None or callable(all_reduce) or (isinstance(all_reduce, str) and all_reduce == "auto")):
            raise ValueError(f"all_reduce must be 'auto', None or a function summing a tensor in place, got {all_reduce!r}")
        self.update_rate = float(update_rate)
        self.rule = update if isinstance(update, BiasRule) else make_rule(update)
        self.update = self.rule.name
        self.all_reduce = all_reduce
        self.center = center

    def prepare(self, model: nn.Module) -> None:
        """Set up ``model``'s routers for this rule; needed (before the first training forward)
        only by score-based rules (``quantile``), a no-op for the others. Idempotent.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: no :class:`TopKRouter`; for ``quantile``, a router with group-limited
                routing (``n_group > 1``), a multiplicative bias, or ``top_k >= num_experts``
                (Megatron-LM's guards).
        """
        routers = find_routers(model)
        if not self.rule.needs_scores:
            return
        if not routers:
            raise ValueError("no TopKRouter found: the model has no MoE layer")
        for r in routers:
            if r.n_group > 1:
                raise ValueError(f"bias_update='quantile' does not support group-limited routing (n_group={r.n_group}); set n_group=1")
            if r.bias_mode != "additive":
                raise ValueError(f"bias_update='quantile' needs bias_mode='additive', got {r.bias_mode!r}")
            if r.top_k >= r.num_experts:
                raise ValueError(f"bias_update='quantile' needs top_k < num_experts, got top_k={r.top_k}, num_experts={r.num_experts}")
            if r.score_recorder is None:
                r.score_recorder = self.rule.recorder(r.top_k)

    def state_dict(self) -> dict:
        """The rule's own state (SMEBU momentum, the quantile window) for a checkpoint."""
        return self.rule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.rule.load_state_dict(state)

    @torch.no_grad()
    def step(self, model: nn.Module, rate_scale: float = 1.0) -> torch.Tensor:
        """Apply one bias update to every router in ``model`` and clear their load counts.

        Args:
            model: a model, an MoE layer or a single :class:`TopKRouter`.
            rate_scale: this step's update rate is ``update_rate * rate_scale`` (a schedule, e.g.
                the trainer's ``balance.bias_update_schedule=lr``; 1.0 is Algorithm 1).

        Returns:
            ``[L, E]`` float32 loads the update used (global loads when they were all-reduced).
            A layer whose load is all zero (no training forward since the last step) is left as is;
            when any load is NaN or inf, every bias is left as is (:meth:`bias_delta`). Tokens whose
            router scores were not finite never count (:meth:`TopKRouter.forward`).

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: ``rate_scale`` not a number in ``[0, 1]``, no :class:`TopKRouter` in
                ``model``, routers of different ``E``, or ``center=True`` with a multiplicative
                bias. Raised before the loads are read: the counters keep them for the next call.
        """
        _check_rate_scale(rate_scale)
        routers = find_routers(model)
        if self.center and any(r.bias_mode != "additive" for r in routers):
            raise ValueError("center=True needs bias_mode='additive' (a multiplicative bias is not shift-invariant)")
        loads_LE = pop_expert_loads(routers)
        self._reduce(loads_LE)
        biases = [r.expert_bias for r in routers]
        if self.rule.needs_scores:
            delta_LE = self._score_delta(routers, torch.stack(biases), rate_scale)
        else:
            delta_LE = self.bias_delta(loads_LE, torch.stack(biases) if self.center else None, rate_scale)
        frozen = [i for i, r in enumerate(routers) if r.bias_frozen]
        if frozen:
            delta_LE[frozen] = 0
        # In place through one fused call: ``router.expert_bias += d`` per router would cost a
        # Module.__setattr__ per layer, most of the update's time for many layers.
        torch._foreach_add_(biases, list(delta_LE.to(biases[0].device).unbind(0)))
        return loads_LE

    def _reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over data-parallel ranks (``all_reduce``)."""
        if self.all_reduce == "auto":
            sum_over_default_group_(tensor)
        elif self.all_reduce is not None:
            self.all_reduce(tensor)

    def _score_delta(self, routers: Sequence[TopKRouter], bias_LE: torch.Tensor, rate_scale: float) -> torch.Tensor:
        """The quantile rule's ``[L, E]`` delta from what the routers recorded this step."""
        if any(r.score_recorder is None for r in routers):
            raise ValueError("bias_update='quantile' needs the routers' scores: call prepare(model) before the first training forward (attach() does)")
        reduce = self._reduce if self.all_reduce is not None else None
        return self.score_delta([r.score_recorder for r in routers], bias_LE, rate_scale, reduce)

    def score_delta(self, recorders: Sequence[ScoreRecorder], bias_LE: torch.Tensor, rate_scale: float = 1.0,
                    reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """A score-based rule's (``quantile``) ``[L, E]`` delta from one step's records, which it
        pops: the path every router kind shares (:class:`TopKRouter` here, the routers of the
        ``transformers`` integration in its handle).

        Args:
            recorders: one :class:`~moebalance.rules.ScoreRecorder` per layer, in layer order.
            bias_LE: ``[L, E]`` current biases (the records' device).
            rate_scale: the schedule's factor in ``[0, 1]``; 0 adds the step to the rule's window
                and moves nothing.
            reduce: in-place sum over data-parallel ranks of the ``[L, E+1]`` / ``[L, E*B+1]``
                record; for the ``pooled`` estimator, not ``None`` means gather the scores over
                ``torch.distributed``'s default group; ``None``: this rank's records only.

        Raises:
            ValueError: recorders of different ``top_k``, a rule that needs no scores, or
                ``rate_scale`` outside ``[0, 1]``.
        """
        _check_rate_scale(rate_scale)
        if not self.rule.needs_scores:
            raise ValueError(f"bias_update={self.update!r} updates from loads, not scores: use bias_delta")
        tops = {r.top_k for r in recorders}
        if len(tops) > 1:
            raise ValueError(f"routers have different top_k {sorted(tops)}; balance them one at a time (step(router))")
        num_experts, device = bias_LE.shape[1], bias_LE.device
        records = [r.pop(num_experts, device) for r in recorders]
        if self.rule.estimator == "pooled":
            stats = _gather_pooled(records, reduce is not None)
        else:
            stats = torch.stack(records)
            if reduce is not None:
                reduce(stats)
        return self.rule.delta_from_stats(stats, bias_LE, recorders[0].top_k, float(rate_scale))

    def bias_delta(self, loads_LE: torch.Tensor, bias_LE: torch.Tensor | None = None, rate_scale: float = 1.0) -> torch.Tensor:
        """The change the rule makes to the biases for loads ``c`` (``[E]`` or ``[L, E]``).

        ``e_i = c_mean - c_i`` with ``c_mean = K*T/E``, the mean of the row; ``delta = u*sign(e)``
        (or ``u * e / c_mean``; the other load-based rules: :mod:`moebalance.rules`). Rows that sum
        to 0 give a zero delta. The ``quantile`` rule needs scores: see :meth:`step`. A stateful
        rule (``smebu``: its momentum) advances its state at each call: call it once per step. Loads holding a NaN or +inf
        anywhere give a zero delta everywhere: a step whose loads are not finite moves no bias.

        Args:
            loads_LE: ``[L, E]`` (or ``[E]``) tokens per expert of the step: a real tensor, >= 0.
            bias_LE: the current biases, a real float tensor of the same shape; needed (and only used) with ``center=True``,
                where the delta also removes the row mean of ``bias + delta`` (rows with no load
                stay untouched).
            rate_scale: multiplies ``u`` for this update; in ``[0, 1]``.

        Raises:
            ValueError: ``loads_LE`` not an ``[E]`` / ``[L, E]`` real tensor, or with a negative
                load; ``bias_LE`` of another shape; ``center=True`` without ``bias_LE``;
                ``rate_scale`` outside ``[0, 1]``; or the ``quantile`` rule.
        """
        _check_rate_scale(rate_scale)
        check_loads("loads_LE", loads_LE, allow_nonfinite=True)
        if bias_LE is not None:
            check_score_tensor("bias_LE", bias_LE, (loads_LE.dim(),), f"{list(loads_LE.shape)} (as loads_LE)")
            if bias_LE.shape != loads_LE.shape:
                raise ValueError(f"bias_LE must have loads_LE's shape {list(loads_LE.shape)}, got {list(bias_LE.shape)}")
        rate = self.update_rate * float(rate_scale)
        if not bool(torch.isfinite(loads_LE.float()).all()):
            return torch.zeros_like(loads_LE.float())  # a NaN or inf load: the step's loads are garbage, no update
        mean = loads_LE.float().mean(dim=-1, keepdim=True)
        delta = self.rule.delta(loads_LE, bias_LE, rate)
        if not self.center:
            return delta
        if bias_LE is None:
            raise ValueError("bias_delta(center=True) needs the current biases (bias_LE)")
        updated = bias_LE.to(delta) + delta
        shift = updated.mean(dim=-1, keepdim=True) * (mean > 0)
        return delta - shift

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module, scaler=None) -> OptimizerHook:
        """Run :meth:`step` on ``model`` after every real step of ``optimizer`` (a step post-hook).

        Works in any loop, because the update is tied to the optimizer step itself: plain loops,
        own DDP loops with gradient accumulation, Accelerate (whose wrapped ``optimizer.step()``
        skips the inner step on accumulation micro-batches; the hook sits on the inner torch
        optimizer, so it fires only when the weights really change) and Lightning. Do not also
        call :meth:`step` by hand.

        A step that a ``torch.amp.GradScaler`` skips for inf/NaN gradients never moves the
        bias, and the loads counted for it are discarded (see :class:`OptimizerHook`): a fused
        optimizer's skipped step is seen through ``optimizer.found_inf``; a non-fused one's,
        where the scaler does not call ``step()`` at all, through ``scaler`` (or the scaler of
        an Accelerate wrapper, found by itself). Without it the loads of such a step carry
        into the next step's update.

        Args:
            optimizer: a ``torch.optim.Optimizer``, or a wrapper holding one as ``.optimizer``
                (Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``).
            model: the model (or DDP/FSDP wrapper) whose routers are balanced.
            scaler: the ``GradScaler`` that steps ``optimizer`` (Lightning:
                ``trainer.precision_plugin.scaler``); ``None``: the wrapper's ``.scaler``, if any.

        Returns:
            An :class:`OptimizerHook`; its :meth:`~OptimizerHook.detach` removes the hook.

        Raises:
            TypeError: ``optimizer`` is not (and does not wrap) a ``torch.optim.Optimizer``.
            ValueError: ``model`` holds no :class:`TopKRouter`.
        """
        if not find_routers(model):
            raise ValueError("no TopKRouter found: the model has no MoE layer")
        self.prepare(model)
        return OptimizerHook(
            optimizer, lambda: self.step(model), discard=lambda: pop_expert_loads(find_routers(model)), scaler=scaler
        )


def _gather_pooled(records: Sequence[torch.Tensor], reduce: bool) -> torch.Tensor:
    """``[L, N, E]`` pooled scores of every layer, gathered over ``torch.distributed``'s default
    group when ``reduce`` and one is initialised with more than one rank (every rank must pool as
    many tokens)."""
    stats = torch.stack(records)
    dist = torch.distributed
    if not (reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return stats
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stats.contiguous())
    return torch.cat(parts, dim=1)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's / Lightning's wrappers (``.optimizer`` or
    ``._optimizer``), or ``optimizer`` itself.

    Raises:
        TypeError: no ``torch.optim.Optimizer`` inside.
    """
    seen = optimizer
    for _ in range(8):  # wrappers nest at most a few levels
        inner = getattr(seen, "optimizer", None)
        inner = getattr(seen, "_optimizer", None) if inner is None else inner
        if inner is None or inner is seen or not hasattr(inner, "step"):
            break
        seen = inner
    if not isinstance(seen, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return seen


def grad_scaler_of(optimizer):
    """The enabled ``torch.amp.GradScaler`` that a wrapper steps ``optimizer`` through (its
    ``.scaler``, as Accelerate's ``AcceleratedOptimizer``), or ``None``."""
    seen = optimizer
    for _ in range(8):  # wrappers nest at most a few levels
        scaler = getattr(seen, "scaler", None)
        if scaler is not None and is_grad_scaler(scaler) and scaler.is_enabled():
            return scaler
        inner = getattr(seen, "optimizer", None)
        if inner is None or inner is seen:
            return None
        seen = inner
    return None


def is_grad_scaler(scaler) -> bool:
    """True for a ``torch.amp.GradScaler`` or an object with its ``get_scale``/``update``/``is_enabled``."""
    return all(callable(getattr(scaler, name, None)) for name in ("get_scale", "update", "is_enabled"))


def fused_step_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True while a ``GradScaler`` runs a step of a fused optimizer on inf/NaN gradients.

    ``GradScaler.step`` calls ``step()`` of an optimizer with ``_step_supports_amp_scaling``
    (``Adam``/``AdamW``/``SGD`` with ``fused=True``) even on an overflow: it sets
    ``optimizer.found_inf`` (a 0-dim float tensor) for the duration of the call, and the fused
    kernel leaves the weights as they are when it is non-zero (torch ``amp/grad_scaler.py``).
    Reads it with ``.item()`` (one device sync per step, only when it is set).
    """
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.item() != 0)


class OptimizerHook:
    """A bias update registered as a step post-hook of one optimizer (see :meth:`LossFreeBalancer.attach`).

    Skipped steps (mixed precision with ``torch.amp.GradScaler``, inf/NaN gradients) never call
    ``update``; they call ``discard``, which forgets the loads counted for the skipped step, so
    the next update uses the loads of its own step only (as :meth:`Balancing.discard_step` does
    in moebalance's trainer):

    * fused optimizer: the scaler still calls ``step()`` and the hook fires;
      :func:`fused_step_found_inf` tells it the kernel skipped the weights.
    * non-fused optimizer: the scaler does not call ``step()``, so the hook does not fire. With a
      ``scaler`` the hook wraps that scaler's ``update`` (on the instance, until :meth:`detach`):
      when the scale went down in an ``update`` (an overflow: ``backoff_factor < 1``) and the
      hook did not fire since the previous ``update``, the step was skipped. Without a scaler
      these loads carry into the next real step's update.

    Args:
        optimizer: the optimizer or a wrapper of one (see :func:`unwrap_optimizer`).
        update: called with no argument after each real ``step()`` of the inner optimizer.
        discard: called with no argument for each skipped step; ``None``: nothing to forget.
        scaler: the ``GradScaler`` stepping ``optimizer``; ``None``: the wrapper's enabled
            ``.scaler`` (Accelerate), if any (:func:`grad_scaler_of`).

    Attributes:
        optimizer: the inner ``torch.optim.Optimizer`` the hook is registered on.
        scaler: the scaler whose ``update`` is watched, or ``None``.
        steps: how many times ``update`` ran. skipped: how many skipped steps were discarded.

    Raises:
        TypeError: ``optimizer`` holds no torch optimizer, or ``scaler`` is not a ``GradScaler``.
    """

    def __init__(
        self, optimizer, update: Callable[[], object], discard: Callable[[], object] | None = None, scaler=None
    ) -> None:
        if not callable(update):
            raise ValueError(f"update must be a function of no argument, got {type(update).__name__}")
        self.optimizer = unwrap_optimizer(optimizer)
        if scaler is not None and not is_grad_scaler(scaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler if scaler is not None else grad_scaler_of(optimizer)
        self._update = update
        self._discard = discard
        self.steps = 0
        self.skipped = 0
        self._fired = False  # the hook ran since the scaler's last update()
        self._handle = self.optimizer.register_step_post_hook(self._after_step)
        self._scaler_update = None
        if self.scaler is not None and self.scaler.is_enabled():
            self._wrap_scaler_update()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._fired = True
        if fused_step_found_inf(optimizer):
            self._skip()
            return
        self.steps += 1
        self._update()

    def _skip(self) -> None:
        self.skipped += 1
        if self._discard is not None:
            self._discard()

    def _wrap_scaler_update(self) -> None:
        scaler, original = self.scaler, self.scaler.update
        self._scaler_previous = scaler.__dict__.get("update")  # an earlier instance wrapper, or None

        def update(*args, **kwargs):
            if not self.attached:
                return original(*args, **kwargs)
            before, fired = scaler.get_scale(), self._fired
            self._fired = False
            result = original(*args, **kwargs)
            if not fired and scaler.get_scale() < before:
                self._skip()
            return result

        self._scaler_update = scaler.update = update

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def detach(self) -> None:
        """Remove the hook (idempotent); later optimizer steps no longer update the biases. The
        scaler's ``update`` is restored, unless something wrapped it again since (then the
        wrapper stays and does nothing more)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._scaler_update is not None and self.scaler.__dict__.get("update") is self._scaler_update:
            if self._scaler_previous is None:
                del self.scaler.update
            else:
                self.scaler.update = self._scaler_previous
        self._scaler_update = None


def rule_from_config(cfg) -> BiasRule:
    """The bias rule of a :class:`~moebalance.train.config.BalanceConfig`: ``bias_update`` with its
    options (``smebu_kappa``, ``smebu_momentum``, ``target_load``, ``qb_*``).

    Raises:
        ValueError: an option out of range (see :mod:`moebalance.rules`).
    """
    options = {
        "smebu": dict(kappa=cfg.smebu_kappa, momentum=cfg.smebu_momentum),
        "proportional": dict(target_load=cfg.target_load or None),
        "quantile": dict(estimator=cfg.qb_estimator, ema=cfg.qb_ema, window=cfg.qb_window, bins=cfg.qb_bins),
    }.get(cfg.bias_update, {})
    return make_rule(cfg.bias_update, **options)


def check_aux_scores(scores: str) -> None:
    """Raise ``ValueError`` unless ``scores`` is ``"normalized"`` or ``"raw"``."""
    if scores not in ("normalized", "raw"):
        raise ValueError(f"aux_loss_scores must be 'normalized' or 'raw', got {scores!r}")


def aux_scores(routing: RouterOutput, scores: AuxScores) -> torch.Tensor:
    """The ``[T, E]`` scores an auxiliary loss averages into ``P``: normalised per token
    (:func:`~moebalance.losses.normalize_scores`) or raw."""
    return normalize_scores(routing.scores) if scores == "normalized" else routing.scores


class AuxLossBalancer:
    """Auxiliary-loss load balancing, sequence-wise as in the paper (arXiv 2408.15664 eq. 2).

    ``loss = coeff * sum over MoE layers of sequence_aux_loss(layer)``: the coefficient applies to
    each layer and the layers' losses add, as in DeepSeekMoE and Megatron-Core.

    Args:
        coeff: ``alpha >= 0`` (paper baseline 1e-3; its Figure 2 sweeps 0, 1e-4, 1e-3, 1e-2).
        scores: ``"normalized"`` (default): ``P`` from each token's scores divided by their sum
            over experts (DeepSeek-V3 eq. 19-20; what Megatron-Core and OLMo-core do for sigmoid
            gates, the identity for softmax); ``"raw"``: ``P`` from the scores as the gate gives
            them, which a sigmoid gate can lower without balancing (docs/balancing.md).

    Raises:
        ValueError: ``coeff < 0`` or an unknown ``scores``.
    """

    def __init__(self, coeff: float = 1e-3, scores: AuxScores = "normalized") -> None:
        if not is_finite_number(coeff) or coeff < 0:
            raise ValueError(f"coeff must be a number >= 0 and finite, got {coeff!r}")
        check_aux_scores(scores)
        self.coeff = float(coeff)
        self.scores = scores

    def __call__(self, routing: RouterOutput | Iterable[RouterOutput]) -> torch.Tensor:
        """The scaled loss for one layer's or several layers' router outputs.

        Each output must come from a ``[B, S, D]`` input (``seq_len`` set).

        Returns:
            0-dim float32 tensor to add to the language-model loss.

        Raises:
            ValueError: no output, an item that is not a :class:`RouterOutput`, an expert-choice
                output (its ``indices`` are ``[E, C]`` token ids, not ``[T, K]`` expert ids, and
                its load is balanced by construction), or an output of a ``[T, D]`` input.
        """
        outputs = check_router_outputs("routing", routing)
        total = None
        for out in outputs:
            if getattr(out, "is_expert_choice", False):
                raise ValueError("routing is an expert-choice output ([E, C] token ids); the auxiliary loss needs top-K routing")
            if out.seq_len is None:
                raise ValueError("routing must come from [B, S, D] inputs (seq_len set): the sequence-wise aux loss needs the sequences")
            layer = sequence_aux_loss(aux_scores(out, self.scores), out.indices, out.seq_len, out.mask)
            total = layer if total is None else total + layer
        return self.coeff * total




def check_router_outputs(name: str, routing: object) -> list[RouterOutput]:
    """``routing`` (one :class:`RouterOutput` or an iterable of them) as a non-empty list.

    Raises:
        ValueError: empty, or an item that is not a :class:`RouterOutput` (the message names ``name``).
    """
    if isinstance(routing, RouterOutput):
        return [routing]
    if isinstance(routing, (str, bytes, torch.Tensor)) or not isinstance(routing, Iterable):
        raise ValueError(f"{name} must be a RouterOutput or a list of them (one per MoE layer), got {type(routing).__name__}")
    outputs = list(routing)
    if not outputs:
        raise ValueError(f"{name} must hold at least one RouterOutput, got none")
    bad = [type(r).__name__ for r in outputs if not isinstance(r, RouterOutput)]
    if bad:
        raise ValueError(f"{name} must hold RouterOutput items (what a router returns), got {bad[0]}")
    return outputs


class GlobalBatchCounts:
    """Expert counts of the current global batch, for :func:`~moebalance.losses.global_batch_aux_loss`.

    Design (as Megatron-Core's global auxiliary loss): each micro-batch adds its ``[L, E]`` counts,
    all-reduced (sum) over data-parallel ranks through the ``all_reduce`` hook, to a running total
    that :meth:`reset` clears after every optimizer step. The loss of micro-batch ``m`` uses the
    counts of micro-batches ``1..m`` of the step on all ranks. With one micro-batch per step this is
    exactly the global batch's ``f``; with gradient accumulation the last micro-batch sees the whole
    global batch and earlier ones a growing part of it, because a micro-batch's backward runs before
    later micro-batches are routed. (Exact ``f`` for every micro-batch would need a second forward
    pass or keeping every micro-batch's graph alive until the step ends.)

    Args:
        all_reduce: optional in-place sum over data-parallel ranks of a float32 ``[L, E]`` tensor
            (e.g. ``torch.distributed.all_reduce``); ``None`` in a single process.
    """

    def __init__(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        if not (all_reduce is None or callable(all_reduce)):
            raise ValueError(f"all_reduce must be None or a function summing a tensor in place, got {all_reduce!r}")
        self.all_reduce = all_reduce
        self.counts_LE: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, routing: Sequence[RouterOutput]) -> torch.Tensor:
        """Add one micro-batch's counts (masked tokens excluded) and return the running ``[L, E]`` total.

        Raises:
            ValueError: ``routing`` not a non-empty list of :class:`RouterOutput`, or a number of
                layers or experts that differs from the running total's.
        """
        routing = check_router_outputs("routing", routing)
        shape = (len(routing), routing[0].tokens_per_expert.numel())
        if self.counts_LE is not None and self.counts_LE.shape != shape:
            raise ValueError(f"routing gives [L, E] = {list(shape)} counts, the global batch so far {list(self.counts_LE.shape)}")
        step_LE = torch.stack([r.tokens_per_expert.float() for r in routing])
        if self.all_reduce is not None:
            self.all_reduce(step_LE)
        self.counts_LE = step_LE if self.counts_LE is None else self.counts_LE + step_LE
        return self.counts_LE

    def reset(self) -> None:
        """Start a new global batch (call after each optimizer step)."""
        self.counts_LE = None


class Balancing:
    """The balancing of one training run, built from :class:`~moebalance.train.config.BalanceConfig`.

    The training loop asks it for the extra loss of each micro-batch (:meth:`loss`) and calls
    :meth:`after_step` once after each optimizer step (the bias update, and the reset of the load
    counters and of the global-batch counts). Adding a strategy means adding a branch here, not
    touching the loop.

    Each auxiliary loss is summed over MoE layers and scaled by its coefficient
    (``loss = alpha * sum_layers loss_layer``, as DeepSeekMoE and Megatron-Core).

    Args:
        strategy: a name of :data:`STRATEGIES`.
        bias_update_rate, bias_update: see :class:`LossFreeBalancer`.
        aux_loss_coeff: ``alpha`` of the strategy's auxiliary loss (``aux_loss``, ``batch_aux_loss``,
            ``global_aux_loss``, ``importance_loss``).
        z_loss_coeff: coefficient of :func:`~moebalance.losses.router_z_loss`, summed over layers,
            added on top of any strategy; 0 disables it.
        all_reduce: in-place sum over data-parallel ranks of a float32 tensor; used for the
            Loss-Free loads and the global-batch counts.
        seq_aux_coeff: ``alpha`` of the complementary sequence-wise loss of ``deepseek_v3``
            (DeepSeek-V3 uses 1e-4).
        aux_loss_scores: ``"normalized"`` (default) or ``"raw"``: which scores every auxiliary
            loss (the ``f . P`` losses and the importance loss) averages into ``P``; see
            :class:`AuxLossBalancer`. With ``"normalized"``, ``deepseek_v3`` is DeepSeek-V3 eq. 17-20.
        bias_center: see :class:`LossFreeBalancer` (``center``).
        bias_rule: a :class:`moebalance.rules.BiasRule` with its options; replaces
            ``bias_update`` (which then only names it) when given.

    Raises:
        ValueError: unknown strategy or ``aux_loss_scores``, a coefficient that is not a finite
            number >= 0, a bias argument :class:`LossFreeBalancer` refuses (checked also for
            strategies that do not update the bias: a bad value is never silently ignored), or the
            ``quantile`` rule with an auxiliary loss (Megatron-LM's guard: aux coefficient 0).
    """

    def __init__(
        self,
        strategy: str = "loss_free",
        bias_update_rate: float = 1e-3,
        bias_update: UpdateMode = "sign",
        aux_loss_coeff: float = 1e-3,
        z_loss_coeff: float = 0.0,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        seq_aux_coeff: float = 1e-4,
        aux_loss_scores: AuxScores = "normalized",
        bias_center: bool = False,
        bias_rule: BiasRule | None = None,
    ) -> None:
        check_aux_scores(aux_loss_scores)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        for name, value in (("aux_loss_coeff", aux_loss_coeff), ("z_loss_coeff", z_loss_coeff), ("seq_aux_coeff", seq_aux_coeff)):
            check_number(name, value, 0.0)
        if not (all_reduce is None or callable(all_reduce)):
            raise ValueError(f"all_reduce must be None or a function summing a tensor in place, got {all_reduce!r}")
        rule = bias_rule if bias_rule is not None else bias_update
        bias = LossFreeBalancer(bias_update_rate, rule, all_reduce, bias_center)  # checks them
        self.strategy = strategy
        self.aux_kind, uses_bias = STRATEGIES[strategy]
        self.aux_coeff = float(seq_aux_coeff if strategy == "deepseek_v3" else aux_loss_coeff)
        self.all_reduce = all_reduce
        self.bias = bias if uses_bias else None
        if self.bias is not None and self.bias.rule.needs_scores and self.aux_kind is not None and self.aux_coeff > 0:
            raise ValueError(
                f"bias_update='quantile' needs no auxiliary loss (Megatron-LM's guard), but strategy {strategy!r} "
                f"adds one with coefficient {self.aux_coeff}: use strategy 'loss_free'"
            )
        # Kept for callers of the core API: the sequence-wise balancer of the ``aux_loss`` strategy.
        self.aux_scores = aux_loss_scores
        self.aux = AuxLossBalancer(self.aux_coeff, aux_loss_scores) if self.aux_kind == "sequence" else None
        self.global_counts = GlobalBatchCounts(all_reduce) if self.aux_kind == "global" else None
        self.z_loss_coeff = float(z_loss_coeff)

    @classmethod
    def from_config(cls, cfg, all_reduce: Callable[[torch.Tensor], None] | None = None) -> Balancing:
        """From a :class:`~moebalance.train.config.BalanceConfig` (its ``bias_update`` and the
        rule's options: ``smebu_*``, ``target_load``, ``qb_*``)."""
        return cls(
            cfg.strategy,
            cfg.bias_update_rate,
            cfg.bias_update,
            cfg.aux_loss_coeff,
            cfg.z_loss_coeff,
            all_reduce,
            cfg.seq_aux_coeff,
            cfg.aux_loss_scores,
            cfg.bias_center,
            rule_from_config(cfg),
        )

    def prepare(self, model: nn.Module) -> None:
        """Before training: set up ``model``'s routers for the bias rule (see
        :meth:`LossFreeBalancer.prepare`); nothing for other strategies."""
        if self.bias is not None:
            self.bias.prepare(model)

    def state_dict(self) -> dict:
        """The bias rule's own state (empty for the stateless rules and the losses)."""
        return self.bias.state_dict() if self.bias is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        if self.bias is not None:
            self.bias.load_state_dict(state)

    def _aux_loss(self, routing: Sequence[RouterOutput]) -> torch.Tensor:
        if any(getattr(r, "is_expert_choice", False) for r in routing):
            raise ValueError(f"strategy {self.strategy!r} adds an auxiliary loss, which expert-choice routing does not use")
        if self.aux is not None:
            return self.aux(routing)
        kind = self.aux_scores
        if self.aux_kind == "batch":
            total = sum(batch_aux_loss(aux_scores(r, kind), r.indices, r.mask) for r in routing)
        elif self.aux_kind == "importance":
            total = sum(importance_loss(aux_scores(r, kind), r.mask) for r in routing)
        else:  # global
            counts_LE = self.global_counts.add(routing)
            total = sum(
                global_batch_aux_loss(aux_scores(r, kind), counts_E, r.indices.shape[1], r.mask)
                for r, counts_E in zip(routing, counts_LE)
            )
        return self.aux_coeff * total

    def loss(self, routing: Sequence[RouterOutput]) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Extra loss for one micro-batch, and its parts as floats for logging (``aux_loss``, ``z_loss``).

        Args:
            routing: one :class:`~moebalance.routing.RouterOutput` per MoE layer.

        Returns:
            ``(loss, parts)``; ``(None, {})`` when the strategy adds no loss.

        Raises:
            ValueError: ``routing`` not a non-empty list of :class:`RouterOutput`, or an auxiliary
                loss asked of expert-choice routing outputs.
        """
        routing = check_router_outputs("routing", routing)
        total, parts = None, {}
        if self.aux_kind is not None and self.aux_coeff > 0:
            total = self._aux_loss(routing)
            parts["aux_loss"] = total.item()
        if self.z_loss_coeff > 0:
            z = self.z_loss_coeff * sum(router_z_loss(r.logits, r.mask) for r in routing)
            parts["z_loss"] = z.item()
            total = z if total is None else total + z
        return total, parts

    def after_step(self, model: nn.Module, rate_scale: float = 1.0) -> torch.Tensor:
        """Once per optimizer step: update the biases (Loss-Free) and clear the load counters.

        Args:
            model: the model whose routers counted this step's loads.
            rate_scale: multiplies the bias update rate for this step (see :meth:`LossFreeBalancer.step`).

        Returns:
            ``[L, E]`` loads of the step (all-reduced when ``all_reduce`` is set).

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: ``rate_scale`` not a number in ``[0, 1]``, or no router in ``model``.
        """
        _check_rate_scale(rate_scale)
        if self.global_counts is not None:
            self.global_counts.reset()
        if self.bias is not None:
            return self.bias.step(model, rate_scale)
        loads_LE = pop_expert_loads(find_routers(model))
        if self.all_reduce is not None:
            self.all_reduce(loads_LE)
        return loads_LE

    def discard_step(self, model: nn.Module) -> None:
        """Forget the loads (and recorded scores) counted in a step that was skipped (non-finite loss)."""
        if self.global_counts is not None:
            self.global_counts.reset()
        routers = find_routers(model)
        pop_expert_loads(routers)
        for r in routers:
            if r.score_recorder is not None:
                r.score_recorder.pop(r.num_experts, r.expert_bias.device)
