"""The training loop: a few hundred lines in the spirit of nanoGPT.

One optimizer step = ``grad_accum`` micro-batches. After the step, the Loss-Free bias update runs
once (arXiv 2408.15664 Algorithm 1) from the load of all micro-batches; the auxiliary loss and the
z-loss, when configured, are added to the LM loss of every micro-batch.

Output directory:
    config.json     the full run config
    metrics.jsonl   one record per step (loss, MaxVio_batch per layer, loads, bias range, lr, tokens/s)
                    and one per evaluation (val loss, perplexity, MaxVio_global per layer, loads)
    tb/             TensorBoard event files: the scalars above (and bias range per layer), and the
                    expert-load heatmap of each evaluation as an image
    checkpoints/    resumable checkpoints every ``train.checkpoint_every`` steps (the last
                    ``train.keep_checkpoints`` kept); ``train(..., resume=True)`` continues from them
    checkpoint.pt   final training state (model with expert biases, optimizer, scheduler, RNG, stats);
                    ``train(..., resume=True)`` extends a finished run from it
    summary.json    the final numbers (see :func:`train`)
    bias_checksums.json  distributed runs only: SHA-256 of every rank's final biases
    .replaced-run/  ``train(..., overwrite=True)`` only, while it runs: the run it replaces, put
                    back if this one fails, removed once it finishes (:func:`train`)

The loop is :class:`_Run`, phase by phase: set-up (``__init__``, ``_build_model``), one optimizer
step (``_forward_backward``, then ``_update`` or ``_skip``), logging (``_log_step``), evaluation
(``_evaluate``), checkpoints (``_checkpoint``) and the final files (``finish``).

Under ``torchrun`` (or ``moebalance train --nproc N``) the loop runs data-parallel through the
hooks of :mod:`moebalance.parallel`: each rank trains on its share of the global batch, the
loads are all-reduced before the bias update, evaluation covers the validation set across ranks,
and rank 0 alone writes files. ``train.batch_size`` is per rank.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moebalance import parallel
from moebalance.balancing import Balancing
from moebalance.metrics import max_violation
from moebalance.rules import RateSchedule
from moebalance.train.checkpoint import (
    STASH,
    CheckpointDir,
    drop_stash,
    put_back,
    save_checkpoint,
    stash_problem,
    stash_run,
    write_json,
    write_text,
)
from moebalance.train.config import RunConfig, tokens_per_step
from moebalance.train.data import (
    TokenData,
    check_data,
    eval_batches,
    iter_rank_batches,
    prepare_data,
    sample_batch,
    sample_local_batch,
)
from moebalance.train.guards import NonFiniteError, nonfinite_reason
from moebalance.train.host import keep_freed_memory
from moebalance.train.logs import RunLogger, load_heatmap_image
from moebalance.train.model import MoETransformer
from moebalance.train.resume import (
    capture_state,
    check_resumable_folder,
    fresh_stats,
    latest_training_state,
    restore_state,
)
from moebalance.train.runfiles import read_typed_object

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "evaluate", "perplexity", "read_summary", "train"]


@dataclass
class TrainResult:
    """Final numbers of a run (also written to ``summary.json``).

    ``maxvio_batch_last`` is the mean MaxVio_batch (over layers and over the last 10% of steps).
    """

    val_loss: float
    val_ppl: float
    maxvio_global: float
    maxvio_global_per_layer: list[float]
    maxvio_batch_last: float
    tokens_per_s: float
    steps: int
    tokens: int
    skipped_steps: int
    out_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def read_summary(path: str | Path) -> dict[str, Any]:
    """A run's ``summary.json``, read by :func:`moebalance.train.runfiles.read_typed_object`: a JSON
    object with every field of :class:`TrainResult`, of its type.

    Raises:
        FileNotFoundError: no such file.
        RunFileError: a ``ValueError`` naming the file (not a regular file, over its size limit,
            not JSON, a field missing or of another type).
    """
    from dataclasses import fields

    return read_typed_object(path, {f.name: str(f.type) for f in fields(TrainResult)}, "run summary")


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``max_steps`` (step is 0-based)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def perplexity(loss: float) -> float:
    """``exp(loss)``, or ``inf`` where that overflows a float (a loss above ~709.78 nats/token:
    ``math.exp`` raises ``OverflowError`` there, which ended a diverged run as an internal error)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def bias_rate_scale(step: int, cfg: RunConfig, world_size: int = 1) -> float:
    """The factor on the Loss-Free update rate at ``step`` (0-based), ``balance.bias_update_schedule``
    and the freezes (:class:`moebalance.rules.RateSchedule`).

    ``"constant"``: 1 (Algorithm 1). ``"lr"``: 1 through the warm-up, then ``lr_t / lr``, so that
    the bias slows down as the weights do (cosine decay to ``min_lr / lr`` at the end). DeepSeek-V3
    (§4.2 of its report) likewise keeps the bias update speed for most of training and sets it to 0
    for the last tokens; docs/reproduction.md has the measurements behind this option. ``"decay"``:
    ``1 / (1 + step / balance.bias_decay_steps)``. 0 from step ``balance.bias_freeze_after_steps``
    on, or once ``(step + 1) * tokens_per_step`` exceeds ``balance.bias_freeze_after_tokens``.
    """
    b = cfg.balance
    schedule = RateSchedule(b.bias_update_schedule, b.bias_decay_steps, b.bias_freeze_after_steps, b.bias_freeze_after_tokens)
    lr_ratio = 1.0 if step < cfg.train.warmup_steps else lr_at(step, cfg) / cfg.train.lr
    return schedule.scale(step, (step + 1) * tokens_per_step(cfg.train, world_size), lr_ratio)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and expert stacks only (not norms). Biases are buffers, so
    the optimizer never sees them."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = True if cfg.train.adamw_impl == "fused" else None  # None: PyTorch's default kernels
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=fused)


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    data: TokenData,
    cfg: RunConfig,
    max_tokens: int | None = None,
    ctx: parallel.DistContext | None = None,
) -> dict[str, Any]:
    """Validation loss, perplexity and global expert loads over the validation split.

    ``max_tokens`` (default ``cfg.train.eval_tokens``; 0 = the whole split) bounds the tokens read.
    With several ranks (``ctx``), each evaluates its rows of every batch and the sums are
    all-reduced, so every rank returns the numbers of the whole split (MaxVio_global included).

    Returns:
        dict with ``val_loss`` (nats/token), ``val_ppl``, ``loads`` ``[L, E]`` (list of lists),
        ``maxvio_global_per_layer`` and ``maxvio_global`` (mean over layers).
    """
    was_training = model.training
    model.eval()
    ctx = ctx or parallel.DistContext(device=cfg.train.device)
    total_loss, total_tokens = 0.0, 0
    loads_LE = None
    max_tokens = cfg.train.eval_tokens if max_tokens is None else max_tokens
    batches = eval_batches(data.val, cfg.train.batch_size, cfg.train.seq_len, max_tokens)
    for x, y in iter_rank_batches(batches, ctx):
        x, y = x.to(cfg.train.device), y.to(cfg.train.device)
        with _autocast(cfg):
            # A rank with no rows still runs the forward: expert parallelism exchanges tokens.
            out = model(x, y if y.numel() else None)
        if y.numel():
            total_loss += out.loss.item() * y.numel()
            total_tokens += y.numel()
        step_loads = torch.stack([r.tokens_per_expert for r in out.routing])
        loads_LE = step_loads if loads_LE is None else loads_LE + step_loads
    model.train(was_training)
    sums = torch.tensor([total_loss, total_tokens], dtype=torch.float64, device=cfg.train.device)
    parallel.all_reduce_sum_(sums)
    parallel.all_reduce_sum_(loads_LE)
    total_loss, total_tokens = sums[0].item(), int(sums[1].item())
    val_loss = total_loss / total_tokens
    vio = max_violation(loads_LE)
    return {
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "val_tokens": total_tokens,
        "loads": loads_LE.tolist(),
        "maxvio_global_per_layer": vio.tolist(),
        "maxvio_global": vio.mean().item(),
    }


def _autocast(cfg: RunConfig):
    enabled = cfg.train.dtype == "bfloat16"
    return torch.autocast(device_type=torch.device(cfg.train.device).type, dtype=torch.bfloat16, enabled=enabled)


# Fields of a step record that also go to TensorBoard, as ``train/<field>``.
_TRAIN_SCALARS = ("loss", "lr", "maxvio_batch", "bias_min", "bias_max", "tokens_per_s", "dropped_frac")


@dataclass
class _StepOutcome:
    """What the micro-batches of one optimizer step produced (this rank's sums)."""

    lm_sum: float = 0.0
    parts_sum: dict[str, float] = field(default_factory=dict)
    dropped: int = 0
    reason: str | None = None  # why the step must be skipped (a non-finite value), or None
    grad_norm: float = math.nan


class _Run:
    """One training run, phase by phase: :meth:`__init__` sets up, :meth:`fit` loops over
    optimizer steps (:meth:`_forward_backward`, :meth:`_skip` or :meth:`_update`, :meth:`_log_step`,
    :meth:`_evaluate`, :meth:`_checkpoint`), :meth:`finish` writes the final files. Nothing is
    written before :meth:`start`.

    The running statistics (``skipped``, ``maxvio_history``, ``last_eval``, ``train_time``) live in
    ``self.stats``, the dict a checkpoint saves and a resume restores.
    """

    def __init__(self, cfg: RunConfig, out: Path, data: TokenData | None, resume: bool) -> None:
        self.out = out
        self.completed = False  # set once the final files are written
        if resume:  # a damaged run file is found before anything is prepared or written
            check_resumable_folder(out)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.malloc == "reuse" and torch.device(cfg.train.device).type == "cpu":
            keep_freed_memory()
        self.ctx = parallel.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)  # one process without torchrun
        data = data if data is not None else parallel.main_first(self.ctx, lambda: prepare_data(cfg.data))
        cfg = copy.deepcopy(cfg)
        cfg.model.vocab_size = data.vocab_size  # the model embeds exactly the tokenizer's ids
        cfg.train.device = self.ctx.device  # cuda:<LOCAL_RANK> on a CUDA job
        check_data(data, cfg.train.seq_len)
        self.cfg, self.data = cfg, data
        self.expert_parallel = cfg.train.expert_parallel and self.ctx.enabled
        if self.expert_parallel and (resume or cfg.train.checkpoint_every):
            # Resumable checkpoints hold one model and one optimizer state; sharded experts are not in them.
            raise ValueError("train.checkpoint_every and resume are not supported with train.expert_parallel yet")
        self._build_model()
        self.ckpts = CheckpointDir(out / "checkpoints", cfg.train.keep_checkpoints)
        self.start_step = 0
        self.stats: dict[str, Any] = fresh_stats()
        if resume:
            ckpt_path, state = latest_training_state(out)
            self.start_step, self.stats = restore_state(
                state, **self._objects(), config=cfg.to_dict(), data_fingerprint=data.fingerprint, source=str(ckpt_path)
            )
            self.balancing.load_state_dict(state.get("balancing", {}))  # the rule's momentum / window
            log.info("resumed from %s after step %d", ckpt_path, self.start_step)
            if self.ctx.is_main and os.path.lexists(out / STASH) and stash_problem(out) is None:
                log.warning("%s holds the run an interrupted --overwrite replaced; removed when this run finishes", out / STASH)
        t = cfg.train
        self.tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * self.ctx.world_size

    def start(self, resume: bool) -> None:
        """The run's first writes: ``config.json`` (rank 0) and the logs. Only now, so that a
        refused resume leaves the run's config.json as it was and a run being overwritten is moved
        aside only once everything (data, model, state) is ready."""
        if self.ctx.is_main:
            write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True))
        resume_step = self.start_step if resume else None
        self.logger = RunLogger(self.out, self.cfg.train.tensorboard, resume_step, enabled=self.ctx.is_main)

    def _build_model(self) -> None:
        """Model, DDP wrapper, optimizer, LR schedule, data generator and balancing, from the seed."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # same seed on every rank: identical initial weights
        self.device = torch.device(cfg.train.device)
        self.model = MoETransformer(cfg.model, cfg.balance).to(self.device)
        if self.expert_parallel:
            parallel.apply_expert_parallel(self.model)
        self.train_model = parallel.wrap_data_parallel(self.model, self.ctx)  # the model itself for one process
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s, cfg) / cfg.train.lr)
        self.data_gen = torch.Generator().manual_seed(cfg.train.seed)
        # The bias update uses the global batch's load: all-reduced over the ranks before the update.
        self.balancing = Balancing.from_config(cfg.balance, all_reduce=self.ctx.loads_all_reduce())
        self.balancing.prepare(self.model)
        frozen = {int(i) for i in cfg.balance.bias_frozen_layers.split(",") if i.strip()}
        for i, router in enumerate(self.model.routers):
            router.bias_frozen = i in frozen

    def _objects(self) -> dict[str, Any]:
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, data_gen=self.data_gen)

    def _state(self, steps_done: int) -> dict[str, Any]:
        """The resumable state after ``steps_done`` loop iterations (see :mod:`moebalance.train.resume`)."""
        state = capture_state(
            **self._objects(),
            config=self.cfg.to_dict(),
            data_fingerprint=self.data.fingerprint,
            step=steps_done,
            stats=self.stats,
        )
        state["balancing"] = self.balancing.state_dict()  # the bias rule's own state (SMEBU, quantile window)
        return state

    def fit(self, progress: bool, desc: str | None) -> None:
        """Run the optimizer steps from ``start_step`` to ``train.max_steps``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(
            range(self.start_step, cfg.train.max_steps),
            initial=self.start_step,
            total=cfg.train.max_steps,
            desc=desc or cfg.balance.strategy,
            disable=not (progress and self.ctx.is_main),
            dynamic_ncols=True,
        )
        self.model.train()
        try:
            for step in bar:
                # Periodic checkpoint of the state after `step` iterations, taken at the top of the
                # loop so that a skipped step cannot jump over it.
                if cfg.train.checkpoint_every and step > self.start_step and step % cfg.train.checkpoint_every == 0:
                    self._checkpoint(step)
                t0 = time.perf_counter()
                outcome = self._forward_backward()
                if outcome.reason is not None:
                    self._skip(step, outcome.reason)
                    continue
                loads_LE = self._update(step)
                rec = self._log_step(step, outcome, loads_LE, time.perf_counter() - t0)
                if (step + 1) % cfg.train.log_every == 0:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", maxvio=f"{rec['maxvio_batch']:.2f}")
                last_step = step + 1 == cfg.train.max_steps
                if (step + 1) % cfg.train.eval_every == 0 or last_step:
                    # The final evaluation reads the whole validation split: MaxVio_global (paper §4.1).
                    self._evaluate(step, max_tokens=0 if last_step else None)
        finally:
            bar.close()
            self.logger.close()

    def _checkpoint(self, step: int) -> None:
        self.logger.sync()  # the records the checkpoint refers to are on disk first
        state = self._state(step)  # every rank holds the same state (data parallel only)
        if self.ctx.is_main:
            self.ckpts.save(step, state)

    def _forward_backward(self) -> _StepOutcome:
        """The ``grad_accum`` micro-batches of one step: forward, losses, guards, backward."""
        cfg, ctx, out = self.cfg, self.ctx, _StepOutcome()
        for micro in range(cfg.train.grad_accum):
            if ctx.enabled:  # this rank's slice of the global batch
                x, y = sample_local_batch(self.data.train, cfg.train.batch_size, cfg.train.seq_len, self.data_gen, ctx)
            else:
                x, y = sample_batch(self.data.train, cfg.train.batch_size, cfg.train.seq_len, self.data_gen)
            x, y = x.to(self.device), y.to(self.device)
            # DDP all-reduces gradients in the last micro-batch's backward only.
            with parallel.no_sync(self.train_model, sync=micro == cfg.train.grad_accum - 1):
                with _autocast(cfg):
                    res = self.train_model(x, y)
                extra, parts = self.balancing.loss(res.routing)
                loss = res.loss if extra is None else res.loss + extra
                for k, v in parts.items():
                    out.parts_sum[k] = out.parts_sum.get(k, 0.0) + v
                out.reason = out.reason or nonfinite_reason(loss, res.routing)
                if out.reason is not None and not ctx.enabled:
                    break
                # Several ranks: the others wait in this backward's collectives; join them and
                # skip the step on every rank below.
                (loss / cfg.train.grad_accum).backward()
            out.lm_sum += res.loss.item()
            out.dropped += sum(int(r.dropped_tokens) for r in res.routing if r.dropped_tokens is not None)
        out.reason = parallel.any_rank_reason(out.reason, ctx)
        if out.reason is None:
            # max_norm=inf measures without scaling (the clip coefficient clamps to exactly 1).
            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
            # The global norm (sharded experts included), the same on every rank.
            out.grad_norm = parallel.clip_grad_norm_(self.model, max_norm, ctx)
            if not math.isfinite(out.grad_norm):
                out.reason = f"gradient norm is {out.grad_norm}"
        return out

    def _skip(self, step: int, reason: str) -> None:
        """Skip the whole step: no weight update, and neither the bias nor the load counters take
        anything from it (its counts, all micro-batches, are dropped)."""
        self.stats["skipped"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.balancing.discard_step(self.model)
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(f"step {step + 1}: {reason} (train.on_nonfinite=stop)")
        log.warning("step %d: %s; step skipped", step + 1, reason)

    def _update(self, step: int) -> torch.Tensor:
        """Optimizer and LR step, then the one Loss-Free bias update of this step (Algorithm 1).

        Returns:
            ``[L, E]`` loads of this step's (global) batch, which the bias update used.
        """
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.balancing.after_step(self.model, bias_rate_scale(step, self.cfg, self.ctx.world_size))

    def _log_step(self, step: int, outcome: _StepOutcome, loads_LE: torch.Tensor, dt: float) -> dict[str, Any]:
        """Write the step's record to ``metrics.jsonl`` and TensorBoard; return the record."""
        self.stats["train_time"] += dt
        vio_L = max_violation(loads_LE)
        self.stats["maxvio_history"].append(vio_L.mean().item())
        biases = torch.stack([r.expert_bias for r in self.model.routers])
        n, world = self.cfg.train.grad_accum, self.ctx.world_size
        # Logged losses are means over the global batch (over the ranks as well).
        parts = outcome.parts_sum
        sums = [outcome.lm_sum, outcome.dropped, *parts.values()]
        lm_sum, dropped, *part_sums = parallel.mean_over_ranks(sums, self.ctx)
        parts = dict(zip(parts, part_sums))
        dropped *= world  # all ranks' dropped pairs, like the all-reduced loads
        rec = {
            "kind": "train",
            "step": step + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "loss": lm_sum / n,
            **{k: v / n for k, v in parts.items()},
            "grad_norm": outcome.grad_norm,
            "maxvio_batch": self.stats["maxvio_history"][-1],
            "maxvio_batch_per_layer": vio_L.tolist(),
            "loads": loads_LE.long().tolist(),
            "bias_min": biases.min().item(),
            "bias_max": biases.max().item(),
            "tokens_per_s": self.tokens_per_step / dt,
            # Capacity factor: share of the step's (token, slot) pairs dropped, over all MoE layers.
            "dropped_frac": dropped / max(1.0, loads_LE.sum().item()),
        }
        scalars = {f"train/{k}": rec[k] for k in _TRAIN_SCALARS}
        scalars.update({f"train/{k}": rec[k] for k in parts})
        scalars.update({f"maxvio_batch/layer{i}": v for i, v in enumerate(rec["maxvio_batch_per_layer"])})
        span_L = biases.max(-1).values - biases.min(-1).values
        scalars.update({f"bias_range/layer{i}": v for i, v in enumerate(span_L.tolist())})
        self.logger.record(rec, scalars, step + 1)
        return rec

    def _evaluate(self, step: int, max_tokens: int | None) -> None:
        """Evaluate, log the record and the load heatmap, keep it as ``stats['last_eval']``."""
        ev = evaluate(self.model, self.data, self.cfg, max_tokens=max_tokens, ctx=self.ctx)
        self.stats["last_eval"] = ev
        scalars = {"val/loss": ev["val_loss"], "val/ppl": ev["val_ppl"], "val/maxvio_global": ev["maxvio_global"]}
        scalars.update({f"maxvio_global/layer{i}": v for i, v in enumerate(ev["maxvio_global_per_layer"])})
        self.logger.record({"kind": "eval", "step": step + 1, **ev}, scalars, step + 1)
        if self.logger.tb is not None:
            heatmap = load_heatmap_image(ev["loads"], f"step {step + 1}: load / mean load")
            self.logger.image("val/expert_load", heatmap, step + 1)

    def finish(self) -> TrainResult:
        """Check the run trained, write the final checkpoint, bias checksums and ``summary.json``."""
        cfg, ctx, stats = self.cfg, self.ctx, self.stats
        if stats["last_eval"] is None:
            stats["last_eval"] = evaluate(self.model, self.data, cfg, max_tokens=0, ctx=ctx)
        last_eval = stats["last_eval"]
        steps_done = cfg.train.max_steps - stats["skipped"]
        # A run that learned nothing, or evaluates to NaN, must not end in a summary that looks like one.
        if steps_done == 0:
            raise NonFiniteError(
                f"all {cfg.train.max_steps} steps met a non-finite value and were skipped; nothing was trained"
            )
        if not math.isfinite(last_eval["val_loss"]):
            raise NonFiniteError(
                f"the final validation loss is {last_eval['val_loss']}; no summary or final checkpoint written"
            )
        if not math.isfinite(last_eval["val_ppl"]):
            raise NonFiniteError(
                f"the final validation loss is {last_eval['val_loss']:.1f} nats/token: its perplexity overflows a "
                "float (the run diverged; lower train.lr); no summary or final checkpoint written"
            )
        self._write_final_checkpoint()
        history = stats["maxvio_history"]
        tail = history[-max(1, len(history) // 10) :] if history else [float("nan")]
        result = TrainResult(
            val_loss=last_eval["val_loss"],
            val_ppl=last_eval["val_ppl"],
            maxvio_global=last_eval["maxvio_global"],
            maxvio_global_per_layer=last_eval["maxvio_global_per_layer"],
            maxvio_batch_last=sum(tail) / len(tail),
            tokens_per_s=self.tokens_per_step * steps_done / max(stats["train_time"], 1e-9),
            steps=steps_done,
            tokens=self.tokens_per_step * steps_done,
            skipped_steps=stats["skipped"],
            out_dir=str(self.out),
            extra={"final_loads": last_eval["loads"], "val_split": self.data.val_split}
            # Held-out files are another distribution: name the number so nobody takes it for the paper's.
            | ({"maxvio_global_shift": last_eval["maxvio_global"]} if self.data.val_split == "files" else {}),
        )
        if ctx.is_main:
            write_text(self.out / "summary.json", json.dumps(result.to_dict(), indent=2))
        self.completed = True
        if ctx.is_main:
            drop_stash(self.out)  # the run an --overwrite replaced (or an interrupted one had)
        parallel.shutdown(ctx)
        return result

    def _write_final_checkpoint(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        final_state = self._state(cfg.train.max_steps)
        if self.expert_parallel:
            # The full model, expert shards gathered (a collective); the optimizer state in the file
            # is rank 0's, whose expert part covers rank 0's experts only.
            final_state["model"] = {k: v.cpu() for k, v in parallel.full_state_dict(self.model, ctx).items()}
        if ctx.enabled:
            # SHA-256 of every rank's final biases, so anyone can check they ended bit-identical.
            sums = parallel.gather_bias_checksums(self.model, ctx)
            if ctx.is_main:
                checksums = {"world_size": ctx.world_size, "checksums": sums, "identical": len(set(sums)) == 1}
                write_json(self.out / "bias_checksums.json", checksums)
        if ctx.is_main:
            # Only here: a periodic copy of the same state would be a byte-identical duplicate (58 MB
            # at the default size); resume and extension read checkpoint.pt as the newest state.
            save_checkpoint(self.out / "checkpoint.pt", final_state)


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    data: TokenData | None = None,
    progress: bool = True,
    desc: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train the MoE LM of ``cfg`` and write its outputs into ``out_dir``.

    The seed fixes the initial weights and the data order, so two runs that differ only in
    ``cfg.balance`` see the same model at step 0 and the same batches.

    Args:
        cfg: the run config.
        out_dir: output folder (created).
        data: already prepared tokens (else prepared from ``cfg.data``).
        progress: show a tqdm progress bar.
        desc: label of the progress bar.
        resume: continue from the newest good checkpoint in ``out_dir/checkpoints`` or the final
            ``out_dir/checkpoint.pt`` (bit-identical on CPU to a run that was never stopped; see
            :func:`moebalance.train.resume.latest_training_state`). The folder is checked first
            (:func:`moebalance.train.resume.check_resumable_folder`).
        overwrite: ``out_dir`` holds a run to replace. Only after the data is prepared and
            checked and the model built, right before the first file is written, what it wrote is
            moved aside into ``out_dir/.replaced-run``
            (:func:`~moebalance.train.checkpoint.stash_run`; rank 0 alone); it is removed once the
            new run has written its final files. A run that fails in any way (an exception,
            ``KeyboardInterrupt``, SIGTERM) has what it wrote removed and the old run put back
            (:func:`~moebalance.train.checkpoint.put_back`) before the error propagates, with a
            note saying so (``exc.__notes__``). Only SIGKILL leaves the new run's files beside
            the stash: a later ``resume`` continues the new run, a later ``overwrite`` keeps the stash.

    Raises:
        ValueError: bad data (see :func:`~moebalance.train.data.check_data`); on resume, a
            damaged run file or no usable checkpoint or one made with another config or other
            data; with ``overwrite``, a folder that cannot be cleared; ``resume`` and ``overwrite`` both set.
        FileNotFoundError: on resume, no checkpoint in ``out_dir``.
        OSError: a file cannot be written, or (``overwrite``) the old run cannot be moved aside.
        NonFiniteError: a non-finite loss, router logit or gradient with ``train.on_nonfinite=stop``;
            every step skipped; or a non-finite final validation loss or perplexity.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume and overwrite:
        raise ValueError("train(): resume and overwrite exclude each other")
    run = _Run(cfg, out, data, resume)
    stashed = False  # set only once stash_run says the stash holds a run: put back only then
    try:
        if overwrite and run.ctx.is_main:
            stashed = stash_run(out)
        run.start(resume)
        run.fit(progress, desc)
        return run.finish()
    except BaseException as exc:
        if stashed and not run.completed:
            _add_note(exc, put_back(out))
        raise


def _add_note(exc: BaseException, text: str) -> None:
    """``exc.add_note(text)`` (Python 3.11+; ``__notes__`` by hand on 3.10): the CLI's one-line message shows it."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), text]
