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
    checkpoint.pt   final training state (model with expert biases, optimizer, scheduler, RNG, stats)
    summary.json    the final numbers (see :func:`train`)
    bias_checksums.json  distributed runs only: SHA-256 of every rank's final biases

Under ``torchrun`` (or ``moebalance train --nproc N``) the loop runs data-parallel through the
hooks of :mod:`moebalance.distributed`: each rank trains on its share of the global batch, the
loads are all-reduced before the bias update, evaluation covers the validation set across ranks,
and rank 0 alone writes files. ``train.batch_size`` is per rank.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moebalance import parallel
from moebalance.balancing import Balancing
from moebalance.metrics import max_violation
from moebalance.train.checkpoint import CheckpointDir, save_checkpoint, write_json
from moebalance.train.config import RunConfig
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
from moebalance.train.resume import capture_state, restore_state

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "evaluate", "train"]


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


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``max_steps`` (step is 0-based)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


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
    # foreach: one multi-tensor kernel per update op instead of one per parameter; on CPU it gives
    # the same bits as the per-parameter loop (tests/test_train_speed.py). fused: see the config.
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}}[cfg.train.adamw_impl]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), **impl)


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
        "val_ppl": math.exp(val_loss),
        "val_tokens": total_tokens,
        "loads": loads_LE.tolist(),
        "maxvio_global_per_layer": vio.tolist(),
        "maxvio_global": vio.mean().item(),
    }


def _autocast(cfg: RunConfig):
    enabled = cfg.train.dtype == "bfloat16"
    return torch.autocast(device_type=torch.device(cfg.train.device).type, dtype=torch.bfloat16, enabled=enabled)


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    data: TokenData | None = None,
    progress: bool = True,
    desc: str | None = None,
    resume: bool = False,
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
        resume: continue from the newest good checkpoint in ``out_dir/checkpoints`` (bit-identical
            on CPU to a run that was never stopped; see :mod:`moebalance.train.resume`).

    Raises:
        ValueError: bad data (see :func:`~moebalance.train.data.check_data`); on resume, no usable
            checkpoint or one made with another config or other data.
        FileNotFoundError: on resume, no checkpoint in ``out_dir/checkpoints``.
        NonFiniteError: a non-finite loss, router logit or gradient with ``train.on_nonfinite=stop``;
            every step skipped; or a non-finite final validation loss.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.malloc == "reuse" and torch.device(cfg.train.device).type == "cpu":
        keep_freed_memory()
    dist_ctx = parallel.init_distributed(cfg.train.device)  # one-process context without torchrun
    data = data if data is not None else parallel.main_first(dist_ctx, lambda: prepare_data(cfg.data))
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = data.vocab_size  # the model embeds exactly the tokenizer's ids
    cfg.train.device = dist_ctx.device  # cuda:<LOCAL_RANK> on a CUDA job
    check_data(data, cfg.train.seq_len)
    expert_parallel = cfg.train.expert_parallel and dist_ctx.enabled
    if expert_parallel and (resume or cfg.train.checkpoint_every):
        # Resumable checkpoints hold one model and one optimizer state; sharded experts are not in them.
        raise ValueError("train.checkpoint_every and resume are not supported with train.expert_parallel yet")

    torch.manual_seed(cfg.train.seed)  # same seed on every rank: identical initial weights
    device = torch.device(cfg.train.device)
    model = MoETransformer(cfg.model, cfg.balance).to(device)
    if expert_parallel:
        parallel.apply_expert_parallel(model)
    train_model = parallel.wrap_data_parallel(model, dist_ctx)  # the model itself for one process
    routers = model.routers
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.train.lr)
    data_gen = torch.Generator().manual_seed(cfg.train.seed)

    # The bias update uses the global batch's load: all-reduced over the ranks before the update.
    balancing = Balancing.from_config(cfg.balance, all_reduce=dist_ctx.loads_all_reduce())

    ckpts = CheckpointDir(out / "checkpoints", cfg.train.keep_checkpoints)
    objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, data_gen=data_gen)
    start_step, stats = 0, {"skipped": 0, "maxvio_history": [], "last_eval": None, "train_time": 0.0}
    if resume:
        ckpt_path, state = ckpts.load_latest()
        start_step, stats = restore_state(
            state, **objects, config=cfg.to_dict(), data_fingerprint=data.fingerprint, source=str(ckpt_path)
        )
        log.info("resumed from %s after step %d", ckpt_path, start_step)
    # Written only now: a refused resume must leave the run's config.json as it was.
    if dist_ctx.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))

    def state_now(steps_done: int) -> dict[str, Any]:
        run_stats = {"skipped": skipped, "maxvio_history": maxvio_history, "last_eval": last_eval, "train_time": train_time}
        return capture_state(
            **objects, config=cfg.to_dict(), data_fingerprint=data.fingerprint, step=steps_done, stats=run_stats
        )

    logger = RunLogger(out, cfg.train.tensorboard, start_step if resume else None, enabled=dist_ctx.is_main)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len * dist_ctx.world_size
    maxvio_history: list[float] = stats["maxvio_history"]
    skipped: int = stats["skipped"]
    last_eval: dict[str, Any] | None = stats["last_eval"]
    train_time: float = stats["train_time"]
    bar = tqdm(
        range(start_step, cfg.train.max_steps),
        initial=start_step,
        total=cfg.train.max_steps,
        desc=desc or cfg.balance.strategy,
        disable=not (progress and dist_ctx.is_main),
        dynamic_ncols=True,
    )
    model.train()
    try:
        for step in bar:
            # Periodic checkpoint of the state after `step` iterations, taken at the top of the loop
            # so that a skipped step cannot jump over it.
            if cfg.train.checkpoint_every and step > start_step and step % cfg.train.checkpoint_every == 0:
                logger.sync()
                state = state_now(step)  # every rank holds the same state (data parallel only)
                if dist_ctx.is_main:
                    ckpts.save(step, state)
            t0 = time.perf_counter()
            lm_sum, reason, dropped = 0.0, None, 0
            parts_sum: dict[str, float] = {}
            for micro in range(cfg.train.grad_accum):
                if dist_ctx.enabled:  # this rank's slice of the global batch
                    x, y = sample_local_batch(data.train, cfg.train.batch_size, cfg.train.seq_len, data_gen, dist_ctx)
                else:
                    x, y = sample_batch(data.train, cfg.train.batch_size, cfg.train.seq_len, data_gen)
                x, y = x.to(device), y.to(device)
                # DDP all-reduces gradients in the last micro-batch's backward only.
                with parallel.no_sync(train_model, sync=micro == cfg.train.grad_accum - 1):
                    with _autocast(cfg):
                        res = train_model(x, y)
                    extra, parts = balancing.loss(res.routing)
                    loss = res.loss if extra is None else res.loss + extra
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v
                    reason = reason or nonfinite_reason(loss, res.routing)
                    if reason is not None and not dist_ctx.enabled:
                        break
                    # Several ranks: the others wait in this backward's collectives; join them and
                    # skip the step on every rank below.
                    (loss / cfg.train.grad_accum).backward()
                lm_sum += res.loss.item()
                dropped += sum(int(r.dropped_tokens) for r in res.routing if r.dropped_tokens is not None)
            reason = parallel.any_rank_reason(reason, dist_ctx)
            if reason is None:
                # max_norm=inf measures without scaling (the clip coefficient clamps to exactly 1).
                max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
                # The global norm (sharded experts included), the same on every rank.
                grad_norm = parallel.clip_grad_norm_(model, max_norm, dist_ctx)
                if not math.isfinite(grad_norm):
                    reason = f"gradient norm is {grad_norm}"
            if reason is not None:
                # Skip the whole step: no weight update, and neither the bias nor the load
                # counters take anything from it (its counts, all micro-batches, are dropped).
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                balancing.discard_step(model)
                if cfg.train.on_nonfinite == "stop":
                    raise NonFiniteError(f"step {step + 1}: {reason} (train.on_nonfinite=stop)")
                log.warning("step %d: %s; step skipped", step + 1, reason)
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # Algorithm 1: one bias update per optimizer step, from the loads of this step's batch.
            loads_LE = balancing.after_step(model)
            dt = time.perf_counter() - t0
            train_time += dt
            vio_L = max_violation(loads_LE)
            maxvio_history.append(vio_L.mean().item())
            biases = torch.stack([r.expert_bias for r in routers])
            n = cfg.train.grad_accum
            # Logged losses are means over the global batch (over the ranks as well).
            lm_sum, dropped, *part_sums = parallel.mean_over_ranks([lm_sum, dropped, *parts_sum.values()], dist_ctx)
            parts_sum = dict(zip(parts_sum, part_sums))
            dropped *= dist_ctx.world_size  # all ranks' dropped pairs, like the all-reduced loads
            rec = {
                "kind": "train",
                "step": step + 1,
                "lr": scheduler.get_last_lr()[0],
                "loss": lm_sum / n,
                **{k: v / n for k, v in parts_sum.items()},
                "grad_norm": grad_norm,
                "maxvio_batch": maxvio_history[-1],
                "maxvio_batch_per_layer": vio_L.tolist(),
                "loads": loads_LE.long().tolist(),
                "bias_min": biases.min().item(),
                "bias_max": biases.max().item(),
                "tokens_per_s": tokens_per_step / dt,
                # Capacity factor: share of the step's (token, slot) pairs dropped, over all MoE layers.
                "dropped_frac": dropped / max(1.0, loads_LE.sum().item()),
            }
            scalars = {
                "train/loss": rec["loss"],
                "train/lr": rec["lr"],
                "train/maxvio_batch": rec["maxvio_batch"],
                "train/bias_min": rec["bias_min"],
                "train/bias_max": rec["bias_max"],
                "train/tokens_per_s": rec["tokens_per_s"],
                "train/dropped_frac": rec["dropped_frac"],
            }
            scalars.update({f"train/{k}": rec[k] for k in parts_sum})
            scalars.update({f"maxvio_batch/layer{i}": v for i, v in enumerate(rec["maxvio_batch_per_layer"])})
            span_L = biases.max(-1).values - biases.min(-1).values
            scalars.update({f"bias_range/layer{i}": v for i, v in enumerate(span_L.tolist())})
            logger.record(rec, scalars, step + 1)
            if (step + 1) % cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", maxvio=f"{rec['maxvio_batch']:.2f}")
            last_step = step + 1 == cfg.train.max_steps
            if (step + 1) % cfg.train.eval_every == 0 or last_step:
                # The final evaluation reads the whole validation split: MaxVio_global (paper §4.1).
                last_eval = evaluate(model, data, cfg, max_tokens=0 if last_step else None, ctx=dist_ctx)
                erec = {"kind": "eval", "step": step + 1, **last_eval}
                escalars = {
                    "val/loss": last_eval["val_loss"],
                    "val/ppl": last_eval["val_ppl"],
                    "val/maxvio_global": last_eval["maxvio_global"],
                }
                escalars.update({f"maxvio_global/layer{i}": v for i, v in enumerate(last_eval["maxvio_global_per_layer"])})
                logger.record(erec, escalars, step + 1)
                if logger.tb is not None:
                    heatmap = load_heatmap_image(last_eval["loads"], f"step {step + 1}: load / mean load")
                    logger.image("val/expert_load", heatmap, step + 1)
    finally:
        bar.close()
        logger.close()

    if last_eval is None:
        last_eval = evaluate(model, data, cfg, max_tokens=0, ctx=dist_ctx)
    steps_done = cfg.train.max_steps - skipped
    # A run that learned nothing, or evaluates to NaN, must not end in a summary that looks like one.
    if steps_done == 0:
        raise NonFiniteError(f"all {cfg.train.max_steps} steps met a non-finite value and were skipped; nothing was trained")
    if not math.isfinite(last_eval["val_loss"]):
        raise NonFiniteError(f"the final validation loss is {last_eval['val_loss']}; no summary or final checkpoint written")
    final_state = state_now(cfg.train.max_steps)
    if expert_parallel:
        # The full model, expert shards gathered (a collective); the optimizer state in the file
        # is rank 0's, whose expert part covers rank 0's experts only.
        final_state["model"] = {k: v.cpu() for k, v in parallel.full_state_dict(model, dist_ctx).items()}
    if dist_ctx.enabled:
        # SHA-256 of every rank's final biases, so anyone can check they ended bit-identical.
        sums = parallel.gather_bias_checksums(model, dist_ctx)
        if dist_ctx.is_main:
            write_json(out / "bias_checksums.json", {"world_size": dist_ctx.world_size, "checksums": sums, "identical": len(set(sums)) == 1})
    if dist_ctx.is_main:
        if cfg.train.checkpoint_every:
            ckpts.save(cfg.train.max_steps, final_state)
        save_checkpoint(out / "checkpoint.pt", final_state)
    tail = maxvio_history[-max(1, len(maxvio_history) // 10) :] if maxvio_history else [float("nan")]
    result = TrainResult(
        val_loss=last_eval["val_loss"],
        val_ppl=last_eval["val_ppl"],
        maxvio_global=last_eval["maxvio_global"],
        maxvio_global_per_layer=last_eval["maxvio_global_per_layer"],
        maxvio_batch_last=sum(tail) / len(tail),
        tokens_per_s=tokens_per_step * steps_done / max(train_time, 1e-9),
        steps=steps_done,
        tokens=tokens_per_step * steps_done,
        skipped_steps=skipped,
        out_dir=str(out),
        extra={"final_loads": last_eval["loads"]},
    )
    if dist_ctx.is_main:
        (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    parallel.shutdown(dist_ctx)
    return result
