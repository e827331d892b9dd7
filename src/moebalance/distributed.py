"""Everything that talks to other processes: ``torch.distributed`` set-up, data parallelism (DDP),
the global load all-reduce, sharded evaluation, the all-to-all of expert parallelism, bias
checksums and the ``torchrun`` launcher.

The model code stays single-process; this module wraps it from outside (torchtitan's layout).
With one process every function here is a no-op or the plain single-process operation, so the
training loop calls them unconditionally.

Shape legend: L MoE layers, E experts, N routed (token, slot) rows, D model dim.

Why the loads are all-reduced (arXiv 2408.15664 §3, Algorithm 1, and §4.3 on expert parallelism):
the bias update ``b_i += u * sign(mean(c) - c_i)`` must see the load ``c`` of the *global* batch.
Every rank sums its micro-batches' counts, one all-reduce sums the ``[L, E]`` matrix over the
data-parallel group, and every rank applies the same update to the same biases, so the biases
stay bit-identical without ever being broadcast. The counts are reduced in float32 (exact for
integers below 2**24 per entry), never in bfloat16, whose 8-bit mantissa rounds a count of ~40k
to a multiple of 256 and can flip the sign of ``mean(c) - c_i``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "all_reduce_sum_",
    "all_to_all_rows",
    "bias_checksum",
    "clip_grad_norm_",
    "exchange_counts",
    "init_distributed",
    "launch",
    "main_first",
    "sample_local_batch",
    "shutdown",
    "wrap_data_parallel",
    "write_bias_checksums",
]

_EXACT_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank, world_size, local_rank: as ``torchrun`` sets them (``0, 1, 0`` for one process).
        device: the device string this rank computes on (``cuda:<local_rank>`` for CUDA jobs).
        backend: ``"gloo"`` or ``"nccl"``, ``None`` for one process.
        owns_group: this context created the default process group and destroys it in
            :func:`shutdown` (``False`` when the caller had already initialised it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    def loads_all_reduce(self) -> Callable[[torch.Tensor], None] | None:
        """The ``all_reduce`` callable for :class:`~moebalance.balancing.Balancing` (``None`` alone)."""
        return all_reduce_sum_ if self.enabled else None


def init_distributed(device: str = "cpu", timeout_s: float = 300.0) -> DistContext:
    """Join the job ``torchrun`` (or a test) described in the environment, if any.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through
    the ``env://`` rendezvous). Without them, or with ``WORLD_SIZE=1``, returns a one-process
    context and starts nothing. The backend follows the device: NCCL for CUDA, gloo for CPU
    (torchrun's and PyTorch's usual pairing). A CUDA rank computes on ``cuda:<LOCAL_RANK>``.

    Args:
        device: the configured ``train.device`` (``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``).
        timeout_s: collective timeout, so a rank that died does not hang the others forever.

    Raises:
        ValueError: malformed ``RANK``/``WORLD_SIZE``, or a CUDA device without CUDA.
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from None
    if world_size <= 1:
        return DistContext(device=device)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r} but CUDA is not available")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if is_cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistContext(rank, world_size, local_rank, device, backend, owns)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if ``ctx`` created it (a barrier first, so no rank leaves early)."""
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        ctx.owns_group = False


def main_first(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0, then on the other ranks (e.g. tokenizing the corpus into the cache once)."""
    if not ctx.enabled:
        return fn()
    result = fn() if ctx.is_main else None
    dist.barrier()
    return result if ctx.is_main else fn()


def all_reduce_sum_(tensor: torch.Tensor, group: Any = None) -> None:
    """Sum ``tensor`` over the ranks of ``group`` (default: all), in place.

    Used for the ``[L, E]`` load matrix of the bias update and for evaluation sums.

    Raises:
        TypeError: a float dtype with fewer than 24 mantissa bits (bfloat16, float16): their sums
            of token counts are not exact, and a rounded count can flip the sign of the
            Loss-Free update.
    """
    if tensor.is_floating_point() and tensor.dtype not in _EXACT_FLOAT_DTYPES:
        raise TypeError(f"all_reduce_sum_ needs an integer, float32 or float64 tensor, got {tensor.dtype}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def any_rank_reason(reason: str | None, ctx: DistContext) -> str | None:
    """Skip a step on every rank if any rank wants to skip it (e.g. a non-finite loss).

    Returns ``reason`` where this rank has one, a note naming another rank's trouble where only
    others have one, and ``None`` where no rank does. One all-reduce; identity for one process.
    """
    if not ctx.enabled:
        return reason
    t = torch.tensor([0 if reason is None else 1], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if reason is None and t.item():
        return "a non-finite value on another rank"
    return reason


def mean_over_ranks(values: list[float], ctx: DistContext) -> list[float]:
    """Average per-rank scalars (e.g. the logged training loss) over the ranks; identity alone."""
    if not ctx.enabled or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def sample_local_batch(
    data: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator, ctx: DistContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch of ``batch_size * world_size`` random windows.

    Every rank draws the same global offsets from its (identically seeded) generator and keeps
    rows ``[rank * batch_size, (rank + 1) * batch_size)``, so the ranks see different data and a
    2-rank run sees exactly the batch a 1-process run with twice the batch size sees. With one
    process this is :func:`moebalance.data.sample_batch`, draw for draw.

    Returns:
        inputs and targets ``[batch_size, seq_len]`` int64.

    Raises:
        ValueError: the split is shorter than one window.
    """
    from moebalance.data import batch_at

    high = len(data) - seq_len - 1
    if high < 1:
        raise ValueError(f"the training split has {len(data)} tokens, fewer than train.seq_len+2={seq_len + 2}")
    offsets = torch.randint(0, high, (batch_size * ctx.world_size,), generator=generator)
    return batch_at(data, offsets[ctx.rank * batch_size : (ctx.rank + 1) * batch_size], seq_len)


def shard_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rows ``rank, rank + world, ...`` of ``x`` (how evaluation batches are split over ranks)."""
    return x[ctx.rank :: ctx.world_size] if ctx.enabled else x


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that expert parallelism shards (DDP must leave them alone)."""
    from moebalance.expert_parallel import ExpertParallelMoELayer

    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoELayer):
            names += [f"{mod_name}.experts.{p}" for p, _ in mod.experts.named_parameters()]
    return names


def wrap_data_parallel(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` (or return it unchanged for one process).

    ``broadcast_buffers=False``: the routers' ``load_counts`` are per-rank buffers that DDP must
    not overwrite with rank 0's before the all-reduce, and the ``expert_bias`` buffers stay equal
    because every rank applies the same update from the same all-reduced loads (a test checks the
    checksums). Parameters sharded by expert parallelism are excluded from DDP (each rank holds
    different experts; their gradients already arrive through the all-to-all backward) and get a
    gradient hook dividing by the data-parallel size, so they see the same ``mean over the global
    batch`` scale as the averaged replicated parameters.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    sharded = expert_parameter_names(model)
    if sharded:
        DDP._set_params_and_buffers_to_ignore_for_model(model, sharded)
        params = dict(model.named_parameters())
        scale = 1.0 / ctx.world_size
        for name in sharded:
            params[name].register_hook(lambda g: g * scale)
    device_ids = [torch.device(ctx.device).index] if torch.device(ctx.device).type == "cuda" else None
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for gradient-accumulation micro-batches other than the last one."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: DistContext) -> float:
    """Clip all gradients to a global L2 norm of ``max_norm``; return the norm before clipping.

    Replicated gradients are already equal on every rank after DDP; the gradients of sharded
    experts differ per rank, so their squared norms are summed over the ranks first. Every rank
    then computes the same norm and the same clip factor (``torch.nn.utils.clip_grad_norm_``
    applied per rank would clip replicated weights differently on each rank and split them).
    Without sharded parameters this is ``torch.nn.utils.clip_grad_norm_``.
    """
    sharded = set(expert_parameter_names(model)) if ctx.enabled else set()
    own, other = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (own if name.removeprefix("module.") in sharded else other).append(p.grad)
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    sq = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for g in own:
        sq += g.float().pow(2).sum()
    all_reduce_sum_(sq)
    for g in other:
        sq += g.float().pow(2).sum()
    total = sq.sqrt().item()
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in own + other:
            g.mul_(coef)
    return total


# -- expert parallelism: the two exchanges ---------------------------------------------------------


def exchange_counts(send_counts_RE: torch.Tensor, group: Any) -> torch.Tensor:
    """Tell every rank how many rows it will receive for each of its local experts.

    Args:
        send_counts_RE: ``[R, E_local]`` int64, rows this rank sends to rank ``r``'s expert ``e``.
        group: the expert-parallel group (``R`` ranks).

    Returns:
        ``[R, E_local]`` int64: rows this rank receives from rank ``r`` for its local expert ``e``.
    """
    recv = torch.empty_like(send_counts_RE)
    dist.all_to_all_single(recv, send_counts_RE.contiguous(), group=group)
    return recv


def all_to_all_rows(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any) -> torch.Tensor:
    """Send rows ``[sum(send_splits[:r]), sum(send_splits[:r+1]))`` of ``x_ND`` to rank ``r``, with autograd.

    Uses ``torch.distributed._functional_collectives.all_to_all_single_autograd`` (PyTorch's
    differentiable all-to-all, the one torchtitan's expert parallelism uses; its backward is the
    reverse exchange) with uneven splits: gloo's list form of ``all_to_all`` does not take uneven
    sizes.

    Returns:
        ``[sum(recv_splits), D]``: rows from rank 0 first, then rank 1, ...
    """
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    out = all_to_all_single_autograd(x_ND.contiguous(), recv_splits, send_splits, group or dist.group.WORLD)
    return wait_tensor(out)


def gather_expert_shards(local: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate the ``[E_local, ...]`` expert shards of all ranks of ``group`` into ``[E, ...]``."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The single-process ``state_dict`` of ``model`` (a collective under expert parallelism).

    Sharded expert weights are gathered into the full ``[E, ...]`` stacks, so the checkpoint
    loads into a plain :class:`~moebalance.model.MoETransformer`.
    """
    from moebalance.expert_parallel import ExpertParallelMoELayer

    state = model.state_dict()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoELayer):
            for p_name, p in mod.experts.named_parameters():
                state[f"{mod_name}.experts.{p_name}"] = gather_expert_shards(p, mod.group)
    return state


# -- checks from outside -----------------------------------------------------------------------------


def bias_checksum(model: nn.Module) -> str:
    """SHA-256 (hex) of the raw float32 bytes of every router's ``expert_bias``, in module order."""
    from moebalance.balancing import find_routers

    h = hashlib.sha256()
    for router in find_routers(model):
        h.update(router.expert_bias.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def write_bias_checksums(model: nn.Module, out_dir: str | Path, ctx: DistContext) -> list[str]:
    """Gather every rank's :func:`bias_checksum`; rank 0 writes ``bias_checksums.json``.

    The file holds ``{"world_size", "checksums": [rank 0, rank 1, ...], "identical"}``, so anyone
    can check from outside that all ranks ended with bit-identical biases. A collective: every
    rank must call it.

    Returns:
        the checksums of all ranks, in rank order.
    """
    mine = bias_checksum(model)
    sums = [mine]
    if ctx.enabled:
        sums = [None] * ctx.world_size  # type: ignore[list-item]
        dist.all_gather_object(sums, mine)
    if ctx.is_main:
        from moebalance.reporting import write_json

        write_json(
            Path(out_dir) / "bias_checksums.json",
            {"world_size": ctx.world_size, "checksums": sums, "identical": len(set(sums)) == 1},
        )
    return sums


# -- launcher ----------------------------------------------------------------------------------------


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The ``torchrun`` command that runs ``moebalance <args>`` on ``nproc`` local processes.

    ``--standalone`` makes torchrun pick a free port on localhost (single-node rendezvous).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "moebalance",
        *args,
    ]


def launch(nproc: int, args: list[str]) -> int:
    """Run ``moebalance <args>`` under ``torchrun`` with ``nproc`` processes; return its exit code."""
    return subprocess.call(torchrun_command(nproc, args))


def iter_rank_batches(batches: Iterator, ctx: DistContext) -> Iterator:
    """Each rank's rows of each ``(inputs, targets)`` batch (see :func:`shard_rows`)."""
    for x, y in batches:
        yield shard_rows(x, ctx), shard_rows(y, ctx)

