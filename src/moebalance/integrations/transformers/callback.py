"""The ``transformers.Trainer`` callback of :class:`LossFreeBalancing`.

Shape legend: E routed experts, L MoE layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from moebalance.balancing import grad_scaler_of
from moebalance.integrations.transformers.resume import restore_on_resume, save_bias_file
from moebalance.integrations.transformers.trl import say_once
from moebalance.metrics import max_violation

log = logging.getLogger("moebalance.integrations.transformers")


class LossFreeBalancingCallback(TrainerCallback):
    """``transformers.TrainerCallback`` that runs :meth:`LossFreeBalancing.step` once per optimizer
    step (``on_step_end`` fires after gradient accumulation) and adds the balance metrics to the
    Trainer's logs.

    Exactly one update per optimizer step, however the handle is wired: several callbacks of one
    handle update once per ``global_step`` between them, and a handle already attached to the
    optimizer (:meth:`LossFreeBalancing.attach`) is left to its hook.

    A step the Trainer skipped for inf/NaN gradients (fp16 with Accelerate's ``GradScaler``, or
    DeepSpeed's loss scaler) never moves the bias: its loads are discarded
    (:meth:`LossFreeBalancing.discard_step`). Skipped means Accelerate's ``step_was_skipped``
    (the scaler did not call ``step()``: a non-fused optimizer; DeepSpeed's ``overflow``) or a
    scale that went down across the optimizer step (a fused optimizer such as
    ``optim="adamw_torch_fused"``, whose ``step()`` the scaler calls even on an overflow, so
    Accelerate reports no skip; the scale only goes down on an overflow). Reading the scale costs
    two device syncs per optimizer step, only when a scaler is in use.

    At ``on_train_begin`` it refuses an optimizer that holds a bias
    (:meth:`LossFreeBalancing.check_optimizer`), logs the mode once, and raises the handle's
    ``steps`` to the Trainer's ``global_step`` (a resumed run keeps counting towards
    ``freeze_after_steps``).

    Logged at training logs (averaged over the steps since the previous log where it says so):
    ``moe/maxvio_batch`` and ``moe/maxvio_batch_layer{i}`` (mean over those steps), ``moe/bias_min``,
    ``moe/bias_max``, ``moe/bias_range_layer{i}`` (now). At evaluation: ``eval_moe/maxvio_global``
    (mean over layers) and ``eval_moe/maxvio_global_layer{i}`` (under the evaluation's own
    ``metric_key_prefix``: ``eval_<name>_moe/...`` for each of several eval datasets,
    ``test_moe/...`` for ``evaluate(metric_key_prefix="test")``), MaxVio of the loads of the
    evaluation's forwards (eval mode, the bias applied, padding excluded, summed over ranks), also
    in the metrics ``Trainer.evaluate()`` returns. Evaluation never updates the biases.

    Checkpoints: at every ``on_save`` the biases go into the checkpoint folder as
    ``moebalance_biases.safetensors`` (float32, main process only), and a train resumed from a
    checkpoint reads them back at ``on_train_begin`` (:mod:`~moebalance.integrations.transformers.resume`):
    PEFT checkpoints hold only the adapter, and transformers 5.25 restores none of Mixtral's MoE
    weights on resume. At ``on_train_begin`` a TRL trainer's router auxiliary loss or routing
    replay is said once (:mod:`~moebalance.integrations.transformers.trl`).

    For the metrics to reach the Trainer's TensorBoard / W&B callbacks, this callback must run before
    them: add it with :meth:`LossFreeBalancing.attach`. Passed as ``Trainer(callbacks=[...])`` it
    still balances, and the metrics still reach the console and ``trainer.state.log_history``.
    """

    def __init__(self, balancing) -> None:  # a LossFreeBalancing (not imported: it imports this module)
        self.balancing = balancing
        self._vio_sum: torch.Tensor | None = None
        self._vio_steps = 0
        self._seen_steps = balancing.steps
        self._eval: dict[str, float] = {}
        self._scale_before: float | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        handle = self.balancing
        # A resumed train: the checkpoint's biases (PEFT adapters and Mixtral checkpoints lose them).
        restore_on_resume(handle, args, state)
        say_once(handle, args=args, model=model)
        if optimizer is not None:
            handle.check_optimizer(optimizer)
        handle.announce()
        # Loads counted by forwards before training (a sanity forward in train mode) are not a step's.
        handle.reset_loads()
        handle.pop_eval_loads()
        handle._trainer_step = None  # a new train() counts global_step from its own start
        handle.steps = self._seen_steps = max(handle.steps, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = None if optimizer is None else grad_scaler_of(optimizer)
        self._scale_before = None if scaler is None else scaler.get_scale()

    def _step_was_skipped(self, optimizer) -> bool:
        """Whether the optimizer step that just ran was skipped (see the class docstring)."""
        if optimizer is None:
            return False
        if getattr(optimizer, "step_was_skipped", False):
            return True
        scaler = grad_scaler_of(optimizer)
        return scaler is not None and self._scale_before is not None and scaler.get_scale() < self._scale_before

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        handle = self.balancing
        hooked = handle.optimizer_hook is not None and handle.optimizer_hook.attached
        if not hooked and getattr(handle, "_trainer_step", None) != state.global_step:
            handle._trainer_step = state.global_step
            if self._step_was_skipped(optimizer):
                handle.discard_step()
            else:
                handle.step()
        self._scale_before = None
        if handle.steps != self._seen_steps and handle.last_loads is not None and handle.last_loads.sum() > 0:
            vio_L = max_violation(handle.last_loads)
            self._vio_sum = vio_L if self._vio_sum is None else self._vio_sum + vio_L
            self._vio_steps += 1
        self._seen_steps = handle.steps
        handle.pop_eval_loads()  # eval-mode forwards outside an evaluation are not its loads

    def on_save(self, args, state, control, **kwargs):
        # Every checkpoint gets the biases as a file of their own (see moebalance...transformers.resume).
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_bias_file(self.balancing, folder)
        else:
            log.warning("no checkpoint folder %s to write the Loss-Free biases into", folder)

    def _eval_metrics(self, prefix: str) -> dict[str, float]:
        loads_LE = self.balancing.pop_eval_loads()
        if self.balancing.all_reduce is not None:
            self.balancing.all_reduce(loads_LE)
        if loads_LE.sum() == 0:
            return {}
        return self.balancing.maxvio_metrics(max_violation(loads_LE), f"{prefix}_moe/maxvio_global")

    @staticmethod
    def eval_prefix(logs: dict) -> str | None:
        """The ``metric_key_prefix`` of an evaluation's logs (``"eval"``, ``"eval_<name>"`` for
        one of several eval datasets, ``"test"``...), read from its ``<prefix>_runtime`` key;
        ``None`` for a training log."""
        for key in logs:
            if key.endswith("_runtime") and key != "train_runtime":
                return key[: -len("_runtime")]
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "train_runtime" in logs:
            return
        if (prefix := self.eval_prefix(logs)) is not None:
            extra = self._eval = self._eval_metrics(prefix)
        else:
            extra = self.balancing.bias_metrics()
            if self._vio_steps:
                extra.update(self.balancing.maxvio_metrics(self._vio_sum / self._vio_steps))
                self._vio_sum, self._vio_steps = None, 0
        logs.update(extra)
        # Trainer.log stored a copy of the logs before calling the callbacks; complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is not None:  # so that Trainer.evaluate() returns them too
            metrics.update(self._eval)
        self._eval = {}
