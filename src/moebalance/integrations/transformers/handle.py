"""The handle :func:`~moebalance.integrations.transformers.apply_loss_free_balancing` returns:
the bias update, the loads, the metrics, the optimizer hook and the bias files.

Shape legend: E routed experts, L MoE layers.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from moebalance.balancing import LossFreeBalancer, OptimizerHook
from moebalance.metrics import max_violation


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

    Attributes:
        routers: the L router modules, in module order.
        router_names: their qualified names in the model.
        balancer: the :class:`~moebalance.LossFreeBalancer` whose ``bias_delta`` is applied.
        settings: the arguments the handle was built with (compared on a second apply).
        last_loads: ``[L, E]`` float32 loads of the last :meth:`step` (``None`` before it).
        steps: how many updates :meth:`step` made.
        update_biases: when False, :meth:`step` still reads, all-reduces and reports the loads but
            leaves the biases alone (to monitor a baseline, e.g. one trained with the auxiliary loss).
    """

    def __init__(self, model, routers, balancer: LossFreeBalancer, all_reduce, settings: dict) -> None:
        self.model = model
        self.router_names = [name for name, _ in routers]
        self.routers = [r for _, r in routers]
        self.balancer = balancer
        self.all_reduce = all_reduce
        self.settings = dict(settings)
        self.last_loads: torch.Tensor | None = None
        self.steps = 0
        self.update_biases = True
        self.optimizer_hook: OptimizerHook | None = None
        self.hooks: list = []  # the padding-mask hooks on the model

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
        if not isinstance(balancer, LossFreeBalancer):
            raise TypeError(f"balancer must be a moebalance.LossFreeBalancer, got {type(balancer).__name__}")
        self._balancer = balancer
        if hasattr(self, "settings"):  # not during __init__: apply records the config itself
            from moebalance.integrations.transformers.checkpoint import record_in_config

            self.settings.update(update_rate=balancer.update_rate, update=balancer.update, center=balancer.center)
            record_in_config(self)

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def bias_tensors(self) -> list[torch.Tensor]:
        """The live ``[E]`` float32 bias buffers, one per router (writing to them steers routing)."""
        return [getattr(r, r._moebalance_bias_name) for r in self.routers]

    def biases(self) -> torch.Tensor:
        """``[L, E]`` float32 copy of the biases (all routers must have the same ``E``)."""
        return torch.stack([b.detach().float().cpu() for b in self.bias_tensors()])

    def pending_loads(self) -> torch.Tensor:
        """``[L, E]`` float32 tokens routed per expert in training mode since the last step, on this rank."""
        return torch.stack([r.moebalance_load_counts.detach().cpu() for r in self.routers])

    def reset_loads(self) -> None:
        """Forget the loads counted since the last step (e.g. a skipped step)."""
        for r in self.routers:
            r.moebalance_load_counts.zero_()

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
        (no training forward since the last step) is left unchanged.

        Returns:
            ``[L, E]`` float32 global loads used for the update.
        """
        loads_LE = torch.stack([r.moebalance_load_counts for r in self.routers]).clone()
        self.reset_loads()
        if self.all_reduce is not None:
            self.all_reduce(loads_LE)
        if self.update_biases:
            biases = self.bias_tensors()
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

    def attach(self, target):
        """Drive the bias update from ``target``: a ``transformers.Trainer`` or an optimizer.

        * Trainer: adds :class:`LossFreeBalancingCallback` *ahead of* its reporting callbacks
          (TensorBoard, W&B...) so the balance metrics reach them; returns the callback. A second
          attach to the same Trainer returns the callback already there.
        * Optimizer (``torch.optim.Optimizer``, Accelerate's ``AcceleratedOptimizer``, Lightning's
          wrapper): registers :meth:`step` as a step post-hook of the inner torch optimizer, so the
          update runs exactly once per real optimizer step, whatever loop calls it; returns the
          :class:`~moebalance.balancing.OptimizerHook` (``detach()`` removes it). Attaching again
          to the same optimizer returns the same hook; to another one moves the hook there.

        Raises:
            TypeError: ``target`` is neither.
        """
        if hasattr(target, "callback_handler"):
            from moebalance.integrations.transformers.callback import LossFreeBalancingCallback

            for cb in target.callback_handler.callbacks:
                if isinstance(cb, LossFreeBalancingCallback) and cb.balancing is self:
                    return cb
            cb = LossFreeBalancingCallback(self)
            target.callback_handler.callbacks.insert(0, cb)
            return cb
        return self.attach_optimizer(target)

    def attach_optimizer(self, optimizer) -> OptimizerHook:
        """The optimizer half of :meth:`attach`."""
        hook = OptimizerHook(optimizer, lambda: self.step())
        if self.optimizer_hook is not None and self.optimizer_hook.attached:
            if self.optimizer_hook.optimizer is hook.optimizer:
                hook.detach()
                return self.optimizer_hook
            self.optimizer_hook.detach()
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

