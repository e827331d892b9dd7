"""The handle :func:`~moebalance.integrations.transformers.apply_loss_free_balancing` returns:
the bias update, the loads, the metrics, the optimizer hook and the bias files.

Shape legend: E routed experts, L MoE layers.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch

from moebalance.balancing import LossFreeBalancer, OptimizerHook, unwrap_optimizer
from moebalance.metrics import max_violation

log = logging.getLogger("moebalance.integrations.transformers")

#: The fine-tuning modes of :class:`LossFreeBalancing`.
BiasMode = Literal["update", "frozen"]
MODES = ("update", "frozen")


def check_mode(mode, freeze_after_steps) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`MODES` and ``freeze_after_steps`` is
    ``None`` or an int >= 1 (and then ``mode`` is ``"update"``)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if freeze_after_steps is None:
        return
    if isinstance(freeze_after_steps, bool) or not isinstance(freeze_after_steps, int) or freeze_after_steps < 1:
        raise ValueError(f"freeze_after_steps must be an int >= 1 or None, got {freeze_after_steps!r}")
    if mode != "update":
        raise ValueError(
            f"freeze_after_steps={freeze_after_steps} needs mode='update' (it freezes an updating bias), got {mode!r}"
        )


def rule_setting(balancer: LossFreeBalancer) -> str:
    """The rule as :attr:`LossFreeBalancing.settings` records it: its name when it has its default
    options (``"sign"``, ``"quantile"``), else its repr (``"QuantileRule(estimator='pooled', ...)"``)."""
    from moebalance.rules import make_rule

    return balancer.update if repr(balancer.rule) == repr(make_rule(balancer.update)) else repr(balancer.rule)


def timed_all_reduce(timeout_s: float | None) -> Callable[[torch.Tensor], None]:
    """Sum ``[L, E]`` loads over data-parallel ranks when a process group of more than one rank
    is running (DDP, FSDP); a no-op otherwise.

    Args:
        timeout_s: seconds to wait for the other ranks; ``None``: the process group's timeout.

    Raises:
        RuntimeError: the all-reduce did not finish in time (a rank hung or died); the message
            names this rank and the timeout.
    """

    def all_reduce(loads_LE: torch.Tensor) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return
        if timeout_s is None:
            dist.all_reduce(loads_LE, op=dist.ReduceOp.SUM)
            return
        work = dist.all_reduce(loads_LE, op=dist.ReduceOp.SUM, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            rank, world = dist.get_rank(), dist.get_world_size()
            raise RuntimeError(
                f"rank {rank} of {world}: the Loss-Free load all-reduce did not complete within "
                f"dist_timeout_s={timeout_s:g} s; another rank is hung or died ({exc})"
            ) from exc

    return all_reduce


class LossFreeBalancing:
    """The patched routers of one model and their bias update (arXiv 2408.15664 Algorithm 1).

    Built by :func:`~moebalance.integrations.transformers.apply_loss_free_balancing` (a second call
    with the same settings returns this same handle). Drive it in one of three ways, never two:
    :meth:`attach` to the optimizer (any loop: the update runs after every real optimizer step),
    :meth:`attach` to a ``Trainer``, or :meth:`step` by hand once after each ``optimizer.step()``.

    Fine-tuning modes (what the bias does while the model trains; the loads are counted, reduced
    and logged in every mode):

    * ``mode="update"`` (default): Algorithm 1, one update after every optimizer step.
    * ``mode="frozen"``: the bias is never moved; it routes as loaded (e.g. a released model's
      trained ``e_score_correction_bias``). Megatron-Bridge does this for GLM-4.5 and Kimi K3
      (its bridges set a bias update rate of 0; docs/transformers.md).
    * ``mode="update", freeze_after_steps=N``: Algorithm 1 for the first ``N`` steps (counted by
      :attr:`steps`), frozen after.

    The mode and update rate in use are logged once (logger ``moebalance.integrations.transformers``,
    level INFO), at :meth:`attach` or at the first :meth:`step`.

    Args:
        model: the model. routers: ``(name, module)`` of its L routers. balancer: the update rule.
        all_reduce: in-place sum of the ``[L, E]`` loads over ranks, or ``None``.
        settings: the arguments of the apply call (compared on a second apply).
        mode: ``"update"`` or ``"frozen"``. freeze_after_steps: ``None`` or an int ``>= 1``.

    Attributes:
        routers: the L router modules a forward runs, in module order (under PEFT
            ``modules_to_save``: the active adapter's copies, see :meth:`refresh_routers`).
        router_names: their qualified names in the model.
        balancer: the :class:`~moebalance.LossFreeBalancer` whose ``bias_delta`` is applied.
        settings: the arguments the handle was built with (compared on a second apply).
        last_loads: ``[L, E]`` float32 loads of the last :meth:`step` (``None`` before it).
        steps: how many optimizer steps :meth:`step` took (updating or not); under ``Trainer`` at
            least the Trainer's ``global_step`` (set at ``on_train_begin``, so a resumed run
            keeps counting towards ``freeze_after_steps``).
        skipped_steps: optimizer steps skipped for inf/NaN gradients (:meth:`discard_step`).
        mode, freeze_after_steps: see above; assigning them re-checks them.
        update_biases: whether the next :meth:`step` moves the biases; assigning ``False`` is
            ``mode = "frozen"`` (to monitor a baseline, e.g. one trained with the auxiliary loss),
            ``True`` is ``mode = "update"``.

    Raises:
        ValueError: an unknown ``mode``, or a ``freeze_after_steps`` that is not an int ``>= 1`` (or
            is given with ``mode="frozen"``).
    """

    def __init__(
        self,
        model,
        routers,
        balancer: LossFreeBalancer,
        all_reduce,
        settings: dict,
        mode: BiasMode = "update",
        freeze_after_steps: int | None = None,
    ) -> None:
        check_mode(mode, freeze_after_steps)
        self._mode, self._freeze_after_steps = mode, freeze_after_steps
        from moebalance.integrations.transformers import peft

        self.model = model
        routers = peft.active_routers(model, list(routers))  # PEFT modules_to_save: the copy in use
        self._router_names = [name for name, _ in routers]
        self._routers = [r for _, r in routers]
        self._routers_stale = False
        self.balancer = balancer
        self.all_reduce = all_reduce
        self.settings = dict(settings)
        self.last_loads: torch.Tensor | None = None
        self.steps = 0
        self.skipped_steps = 0
        self._announced = False
        self.optimizer_hook: OptimizerHook | None = None
        self.hooks: list = []  # the padding-mask hooks on the model
        if peft.is_peft_model(model):
            peft.bind_save(self, model)
        # Routers copied since the last forward (PEFT modules_to_save) are followed before the next.
        self._refresh_hook = model.register_forward_pre_hook(self._refresh_if_copied)

    def _refresh_if_copied(self, module, args) -> None:
        if self._routers_stale:
            self.refresh_routers()

    def __deepcopy__(self, memo):
        """Deep-copying the whole model gives the copy its own handle; deep-copying a part of it
        (PEFT's ``modules_to_save`` copies a router) keeps this handle, which then follows the
        copies the forward uses (see :meth:`refresh_routers`)."""
        if id(self.model) not in memo:
            self._routers_stale = True
            return self
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def routers(self) -> list:
        """The L router modules the forward runs, in module order (see :meth:`refresh_routers`)."""
        if self._routers_stale:
            self.refresh_routers()
        return self._routers

    @property
    def router_names(self) -> list[str]:
        """The routers' qualified names in :attr:`model` (a PEFT wrapper's own name for its copy)."""
        if self._routers_stale:
            self.refresh_routers()
        return self._router_names

    def refresh_routers(self) -> int:
        """Follow the routers to the modules a forward runs now.

        After ``get_peft_model(..., modules_to_save=["gate"])`` on a patched model, the forward runs
        PEFT's copies of the routers, not the originals: the handle switches to the active copies
        (bias, counters and padding mask included), keeping one router per layer. Runs by itself
        before the next forward of the model (or use of :attr:`routers`) when a router has been
        copied; call it after ``set_adapter`` / ``disable_adapter`` changes which copy runs.

        Returns:
            The number of routers followed (L).
        """
        from moebalance.integrations.transformers import peft

        self._routers_stale = False
        found = peft.follow_copies(self)
        if found:
            self._router_names = [n for n, _ in found]
            self._routers = [r for _, r in found]
        return len(self._routers)

    @property
    def balancer(self) -> LossFreeBalancer:
        """The :class:`~moebalance.LossFreeBalancer` whose ``bias_delta`` :meth:`step` applies.

        Assign a new one to change the rate, rule or centring mid-run: the assignment also
        updates :attr:`settings` (what a second apply is compared with) and the record in
        ``model.config`` that ``save_pretrained`` writes, so neither keeps the old rate.

        Raises:
            TypeError: the value is not a ``LossFreeBalancer``.
        """
        return self._balancer

    @balancer.setter
    def balancer(self, balancer: LossFreeBalancer) -> None:
        from moebalance.integrations.transformers import scores

        if not isinstance(balancer, LossFreeBalancer):
            raise TypeError(f"balancer must be a moebalance.LossFreeBalancer, got {type(balancer).__name__}")
        later = hasattr(self, "settings")  # not during __init__: apply checks and records itself
        if later and balancer.rule.needs_scores:  # refused before anything changes
            scores.check_aux_loss(self.model)
            scores.check_scores(self.model, self.probe_inputs(), list(zip(self.router_names, self.routers)))
        self._balancer = balancer
        scores.set_recorders(self.routers, balancer.rule)
        if later:
            from moebalance.integrations.transformers.checkpoint import record_in_config

            self.settings.update(update_rate=balancer.update_rate, update=rule_setting(balancer), center=balancer.center)
            record_in_config(self)

    def probe_inputs(self) -> dict:
        """The probe inputs given to ``apply_loss_free_balancing`` (default: :func:`~.discovery.probe_batch`)."""
        from moebalance.integrations.transformers.discovery import probe_batch

        given = getattr(self, "_probe_inputs", None)
        return given if given is not None else probe_batch(self.model)

    @property
    def mode(self) -> BiasMode:
        """``"update"`` or ``"frozen"`` (see the class docstring). Setting ``"frozen"`` also clears
        :attr:`freeze_after_steps` (which only applies to ``"update"``)."""
        return self._mode

    @mode.setter
    def mode(self, mode: BiasMode) -> None:
        check_mode(mode, self._freeze_after_steps if mode == "update" else None)
        self._mode = mode
        if mode == "frozen":
            self._freeze_after_steps = None

    @property
    def freeze_after_steps(self) -> int | None:
        """Update for this many optimizer steps, then freeze; ``None``: no limit."""
        return self._freeze_after_steps

    @freeze_after_steps.setter
    def freeze_after_steps(self, steps: int | None) -> None:
        check_mode(self._mode, steps)
        self._freeze_after_steps = steps

    @property
    def update_biases(self) -> bool:
        """Whether the next :meth:`step` moves the biases (``mode="update"`` and fewer than
        ``freeze_after_steps`` steps taken)."""
        limit = self._freeze_after_steps
        return self._mode == "update" and (limit is None or self.steps < limit)

    @update_biases.setter
    def update_biases(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"update_biases must be True or False, got {value!r}")
        self.mode = "update" if value else "frozen"

    def describe_mode(self) -> str:
        """One line: the mode and update rate in use (what is logged once at the start)."""
        head = f"Loss-Free Balancing (arXiv 2408.15664) on {self.num_layers} routers"
        if self._mode == "frozen":
            return f"{head}: mode=frozen (loads counted and logged, biases never moved)"
        b = self.balancer
        rate = f"update_rate={b.update_rate:g} ({b.update} rule{', centred' if b.center else ''})"
        if b.rule.needs_scores:
            rate = f"{b.rule!r} (no rate: the bias is set from the scores' quantiles)"
        if self._freeze_after_steps is None:
            return f"{head}: mode=update, {rate}, after every optimizer step"
        return f"{head}: mode=update for the first {self._freeze_after_steps} optimizer steps then frozen, {rate}"

    def announce(self) -> None:
        """Log :meth:`describe_mode` (a WARNING, so that it is shown by default), the first time only."""
        if not self._announced:
            self._announced = True
            log.warning("%s", self.describe_mode())

    def __repr__(self) -> str:
        slots = {r._moebalance_slot.own for r in self.routers}
        kind = "own bias" if slots == {True} else "added expert_bias" if slots == {False} else "own and added biases"
        return (
            f"LossFreeBalancing({type(self.model).__name__}: {self.num_layers} routers "
            f"({type(self.routers[0]).__name__ if self.routers else '-'}), {kind}, rule={self.balancer.update!r}, "
            f"u={self.balancer.update_rate:g}, mode={self.mode!r}, steps={self.steps})"
        )

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def bias_tensors(self) -> list[torch.Tensor]:
        """The live ``[E]`` float32 bias buffers, one per router (writing to them steers routing)."""
        return [r._moebalance_slot.tensor() for r in self.routers]

    def bias_parameters(self) -> list[torch.nn.Parameter]:
        """The biases that are ``nn.Parameter`` s (some models keep their own that way: ERNIE-4.5's
        ``moe_statics.e_score_correction_bias``, AFMoE's ``expert_bias``), one per such router.

        They must never reach an optimizer (its update or weight decay would move them, and an
        optimizer holding master copies would write its copy back over the Loss-Free update):
        build the optimizer from parameters with ``requires_grad`` (what ``Trainer`` does; these
        have ``requires_grad=False``) or leave these out. :meth:`check_optimizer` checks it.
        """
        return [b for b in self.bias_tensors() if isinstance(b, torch.nn.Parameter)]

    def check_optimizer(self, optimizer) -> None:
        """Refuse an optimizer that would update one of the biases: one that holds a bias
        ``Parameter`` (see :meth:`bias_parameters`) whose ``requires_grad`` was switched on.

        moebalance adopts such a Parameter with ``requires_grad=False``, so it never has a
        gradient, and torch optimizers skip parameters without one: ``AdamW(model.parameters())``
        holds it but neither steps nor decays it, and is accepted. Called by :meth:`attach` and at
        the start of ``Trainer.train()``.

        Args:
            optimizer: a torch optimizer or a wrapper of one (Accelerate's, Lightning's).

        Raises:
            ValueError: a param group holds a bias that requires grad; the message names the group
                and router.
            TypeError: ``optimizer`` holds no torch optimizer.
        """
        slots = [r._moebalance_slot for r in self.routers]
        biases = {id(getattr(s.holder, s.name)): name for name, s in zip(self.router_names, slots)}
        for i, group in enumerate(unwrap_optimizer(optimizer).param_groups):
            held = [biases[id(p)] for p in group["params"] if id(p) in biases and p.requires_grad]
            if held:
                raise ValueError(
                    f"optimizer param group {i} holds the Loss-Free bias of {len(held)} router(s) ({held[0]}, ...) "
                    "with requires_grad=True: the optimizer (and its weight decay) would update it. Set "
                    "requires_grad=False on handle.bias_parameters() (as apply_loss_free_balancing left them)"
                )

    def biases(self) -> torch.Tensor:
        """``[L, E]`` float32 copy of the biases (all routers must have the same ``E``)."""
        return torch.stack([b.detach().float().cpu() for b in self.bias_tensors()])

    def pending_loads(self) -> torch.Tensor:
        """``[L, E]`` float32 tokens routed per expert in training mode since the last step, on this rank."""
        return torch.stack([r.moebalance_load_counts.detach().cpu() for r in self.routers])

    def reset_loads(self) -> None:
        """Forget the loads counted (and the scores recorded, for the quantile rule) since the last step."""
        for r in self.routers:
            r.moebalance_load_counts.zero_()
            recorder = r.__dict__.get("moebalance_score_recorder")
            if recorder is not None:
                recorder.clear()

    def score_recorders(self) -> list:
        """The routers' :class:`~moebalance.rules.ScoreRecorder` s (a score-based rule: quantile).

        Raises:
            ValueError: a router has none (its forward records no scores).
        """
        recorders = [r.__dict__.get("moebalance_score_recorder") for r in self.routers]
        if any(rec is None for rec in recorders):
            raise ValueError(
                f"bias_update={self.balancer.update!r} needs the routers' scores, but a router records none: "
                "assign the rule through handle.balancer (which sets the recorders up)"
            )
        return recorders

    def discard_step(self) -> None:
        """An optimizer step was skipped (inf/NaN gradients under a ``GradScaler``, a Trainer
        overflow): forget its loads, move no bias, count it in :attr:`skipped_steps`. The next
        update then uses the loads of its own step only, as after a real step."""
        self.reset_loads()
        self.skipped_steps += 1

    def pop_eval_loads(self) -> torch.Tensor:
        """``[L, E]`` float32 tokens per expert of the eval-mode forwards since the last call
        (padding excluded, the bias applied), then clear them; for MaxVio_global."""
        loads = torch.stack([r.moebalance_eval_counts.detach().cpu().clone() for r in self.routers])
        for r in self.routers:
            r.moebalance_eval_counts.zero_()
        return loads

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One bias update from the loads counted since the previous call, then clear them.

        Call once per optimizer step, after all gradient-accumulation micro-batches (or let
        :meth:`attach` do it). The loads are all-reduced first (sum over data-parallel ranks), so
        every rank applies the same update and the biases stay identical. A layer with no load
        (no training forward since the last step) is left unchanged. With ``mode="frozen"`` (or
        after ``freeze_after_steps``) the loads are still read, reduced and returned, and the
        biases stay as they are. The ``quantile`` rule sets the biases from the scores the
        routers recorded since the previous call instead (every micro-batch of the step, reduced
        over ranks as its estimator says: :meth:`moebalance.LossFreeBalancer.score_delta`); when
        frozen, its window still takes the step.

        Returns:
            ``[L, E]`` float32 global loads used for the update.
        """
        self.announce()
        loads_LE = torch.stack([r.moebalance_load_counts for r in self.routers]).clone()
        biases = self.bias_tensors()
        delta_LE = None
        if self.balancer.rule.needs_scores:  # every step, frozen too: the rule's window keeps up
            current = torch.stack([b.detach().float() for b in biases])
            rate = 1.0 if self.update_biases else 0.0
            delta_LE = self.balancer.score_delta(self.score_recorders(), current, rate, self.all_reduce)
        self.reset_loads()
        if self.all_reduce is not None:
            self.all_reduce(loads_LE)
        if self._freeze_after_steps is not None and self.steps == self._freeze_after_steps:
            log.info("Loss-Free Balancing: biases frozen after %d optimizer steps (freeze_after_steps)", self.steps)
        if self.update_biases:
            if delta_LE is None:
                current = torch.stack([b.to(loads_LE.device) for b in biases]) if self.balancer.center else None
                delta_LE = self.balancer.bias_delta(loads_LE, current)
            for bias, delta_E in zip(biases, delta_LE):
                bias += delta_E.to(bias.device, bias.dtype)
        self.steps += 1
        self.last_loads = loads_LE.cpu()
        return self.last_loads

    def metrics(self, loads_LE: torch.Tensor | None = None) -> dict[str, float]:
        """Scalars for logging: :meth:`maxvio_metrics` of ``loads_LE`` (default: the last step's
        loads) and :meth:`bias_metrics`."""
        loads_LE = self.last_loads if loads_LE is None else loads_LE
        out = {} if loads_LE is None else self.maxvio_metrics(max_violation(loads_LE))
        out.update(self.bias_metrics())
        return out

    @staticmethod
    def maxvio_metrics(vio_L: torch.Tensor, name: str = "moe/maxvio_batch") -> dict[str, float]:
        """``<name>`` (mean over layers) and ``<name>_layer{i}`` from ``[L]`` MaxVio."""
        out = {name: vio_L.mean().item()}
        out.update({f"{name}_layer{i}": v for i, v in enumerate(vio_L.tolist())})
        return out

    def bias_metrics(self) -> dict[str, float]:
        """``moe/bias_min``, ``moe/bias_max`` (over all layers) and ``moe/bias_range_layer{i}``
        (max - min of layer i's biases)."""
        biases_LE = self.biases()
        span_L = biases_LE.max(-1).values - biases_LE.min(-1).values
        out = {"moe/bias_min": biases_LE.min().item(), "moe/bias_max": biases_LE.max().item()}
        out.update({f"moe/bias_range_layer{i}": v for i, v in enumerate(span_L.tolist())})
        return out

    @torch.no_grad()
    def validation_loads(self, batches: Iterable[torch.Tensor | dict]) -> torch.Tensor:
        """Tokens per expert over held-out data, for MaxVio_global (arXiv 2408.15664 §4.1).

        Runs the model in eval mode on each batch (``[B, S]`` input ids, or a dict of model
        inputs, whose ``attention_mask`` then excludes padding) with the bias applied, no bias
        update and the training counters untouched, and restores its mode.

        Returns:
            ``[L, E]`` float32 loads; ``max_violation`` of it is MaxVio_global per layer.

        Raises:
            TypeError: ``batches`` is a single tensor (iterating it would feed its rows as 1-D
                batches): pass ``[tensor]``.
            ValueError: a batch's ``input_ids`` is not a ``[B, S]`` integer tensor.
        """
        if isinstance(batches, torch.Tensor):
            raise TypeError(f"batches must be an iterable of batches, got one tensor of shape {tuple(batches.shape)}; pass [tensor]")
        if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes, dict)):
            raise TypeError(f"batches must be an iterable of batches ([B, S] id tensors or dicts), got {type(batches).__name__}")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        before = self.pop_eval_loads()
        try:
            for batch in batches:
                inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
                ids = inputs.get("input_ids")
                if isinstance(ids, torch.Tensor) and (ids.dim() != 2 or ids.is_floating_point()):
                    raise ValueError(f"input_ids must be a [B, S] integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
                self.model(**{k: v.to(device) for k, v in inputs.items() if k != "labels"})
        finally:
            self.model.train(was_training)
        loads = self.pop_eval_loads()
        for r, kept in zip(self.routers, before):  # leave earlier eval counts as they were
            r.moebalance_eval_counts += kept.to(r.moebalance_eval_counts)
        return loads

    def attach(self, target, scaler=None):
        """Drive the bias update from ``target``: a ``transformers.Trainer`` or an optimizer; or
        save the biases with a PEFT model.

        * Trainer: adds :class:`LossFreeBalancingCallback` *ahead of* its reporting callbacks
          (TensorBoard, W&B...) so the balance metrics reach them; returns the callback. A second
          attach to the same Trainer returns the callback already there.
        * Optimizer (``torch.optim.Optimizer``, Accelerate's ``AcceleratedOptimizer``, Lightning's
          wrapper): registers :meth:`step` as a step post-hook of the inner torch optimizer, so the
          update runs exactly once per real optimizer step, whatever loop calls it; returns the
          :class:`~moebalance.balancing.OptimizerHook` (``detach()`` removes it). Attaching again
          to the same optimizer returns the same hook; to another one moves the hook there.
        * ``peft.PeftModel`` wrapping this handle's model: its ``save_pretrained`` also writes the
          biases into the adapter folder (``moebalance_biases.safetensors``); returns the model. A
          Trainer whose model is a ``PeftModel`` gets this too.

        A Trainer from TRL is checked once: its router auxiliary loss being on, or a routing
        replay option, is logged (see :mod:`~moebalance.integrations.transformers.trl`).

        Either way a step skipped for inf/NaN gradients never moves the bias and its loads are
        discarded (:meth:`discard_step`): under ``Trainer`` through Accelerate's
        ``step_was_skipped`` and its ``GradScaler``'s scale; on an optimizer as
        :class:`~moebalance.balancing.OptimizerHook` says (pass ``scaler`` for a non-fused
        optimizer stepped by your own ``torch.amp.GradScaler``). Logs the mode once.

        Args:
            target: a ``transformers.Trainer``, or an optimizer (or a wrapper of one).
            scaler: with an optimizer: the ``GradScaler`` that steps it (see
                :class:`~moebalance.balancing.OptimizerHook`); ignored for a Trainer.

        Raises:
            TypeError: ``target`` is none of these.
            ValueError: the optimizer holds a bias (:meth:`check_optimizer`), or ``target`` is a
                ``PeftModel`` that does not hold this handle's model.
        """
        from moebalance.integrations.transformers import peft

        if peft.is_peft_model(target):
            if not peft.wraps(target, self.model):
                raise ValueError(
                    f"attach: this {type(target).__name__} does not hold the model the handle was built on "
                    f"({type(self.model).__name__}); apply_loss_free_balancing to its base model first"
                )
            peft.bind_save(self, target)
            self.refresh_routers()
            return target
        if hasattr(target, "callback_handler"):
            from moebalance.integrations.transformers.callback import LossFreeBalancingCallback
            from moebalance.integrations.transformers.trl import check_trainer

            if peft.is_peft_model(getattr(target, "model", None)) and peft.wraps(target.model, self.model):
                peft.bind_save(self, target.model)
            self.refresh_routers()
            check_trainer(self, target)
            self.announce()
            for cb in target.callback_handler.callbacks:
                if isinstance(cb, LossFreeBalancingCallback) and cb.balancing is self:
                    return cb
            cb = LossFreeBalancingCallback(self)
            target.callback_handler.callbacks.insert(0, cb)
            return cb
        return self.attach_optimizer(target, scaler)

    def attach_optimizer(self, optimizer, scaler=None) -> OptimizerHook:
        """The optimizer half of :meth:`attach`."""
        self.check_optimizer(optimizer)
        hook = OptimizerHook(optimizer, lambda: self.step(), discard=self.discard_step, scaler=scaler)
        self.announce()
        if self.optimizer_hook is not None and self.optimizer_hook.attached:
            if self.optimizer_hook.optimizer is hook.optimizer and (scaler is None or scaler is self.optimizer_hook.scaler):
                hook.detach()
                return self.optimizer_hook
            self.optimizer_hook.detach()  # another optimizer, or now with its GradScaler
        self.optimizer_hook = hook
        return hook

    def detach(self) -> None:
        """Remove the optimizer hook, if any (the Trainer callback stays; remove it with the Trainer)."""
        if self.optimizer_hook is not None:
            self.optimizer_hook.detach()
            self.optimizer_hook = None

    def callback(self):
        """A new :class:`LossFreeBalancingCallback` driving this handle."""
        from moebalance.integrations.transformers.callback import LossFreeBalancingCallback

        return LossFreeBalancingCallback(self)

    def load_biases(self, path: str | Path) -> int:
        """Read the biases of a ``save_pretrained`` folder into the routers (see :func:`read_biases`).

        Returns:
            The number of routers whose bias was found (0 when the folder holds none).
        """
        from moebalance.integrations.transformers.checkpoint import read_biases

        return read_biases(self, path)

    def save_biases(self, folder: str | Path) -> Path:
        """Write the biases to ``folder/moebalance_biases.safetensors`` (float32), e.g. beside a PEFT
        adapter saved by a model :meth:`attach` was not given; :meth:`load_biases` reads it back.

        Raises:
            FileNotFoundError: ``folder`` does not exist.
        """
        from moebalance.integrations.transformers.resume import save_bias_file

        return save_bias_file(self, folder)

    def export_biases(self, name: str = "e_score_correction_bias", *, center: bool = False) -> dict[str, torch.Tensor]:
        """The ``[E]`` float32 biases keyed for an inference engine (``center=True``: each layer's
        mean subtracted from the copy), see :func:`export_biases`."""
        from moebalance.integrations.transformers.checkpoint import export_biases

        return export_biases(self, name, center=center)

    def center_biases(self) -> torch.Tensor:
        """Subtract each layer's mean bias in place (routing unchanged; call before
        ``save_pretrained`` to save centred biases); returns the ``[L]`` means, see :func:`center_biases`."""
        from moebalance.integrations.transformers.checkpoint import center_biases

        return center_biases(self)

