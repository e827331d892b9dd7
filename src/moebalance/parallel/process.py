"""Process groups and every collective: ``torch.distributed`` set-up, the load all-reduce, the
all-to-all exchanges of expert parallelism and the ``torchrun`` launcher.

The model code stays single-process; this package wraps it from outside (torchtitan's layout).
With one process every function here is a no-op or the plain single-process operation, so the
training loop calls them unconditionally.

Shape legend: L MoE layers, E experts, N routed (token, slot) rows, D model dim, R ranks.

Why the loads are all-reduced (arXiv 2408.15664 §3, Algorithm 1, and §4.3 on expert parallelism):
the bias update ``b_i += u * sign(mean(c) - c_i)`` must see the load ``c`` of the *global* batch.
Every rank sums its micro-batches' counts, one all-reduce sums the ``[L, E]`` matrix over the
data-parallel group, and every rank applies the same update to the same biases, so the biases
stay bit-identical without ever being broadcast. The counts are reduced in float32 (exact for
integers below 2**24 per entry), never in bfloat16, whose 8-bit mantissa rounds a count of ~40k
to a multiple of 256 and can flip the sign of ``mean(c) - c_i``.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_reduce_sum_",
    "all_to_all_rows",
    "any_rank_reason",
    "exchange_counts",
    "gather_expert_shards",
    "gather_objects",
    "init_distributed",
    "launch",
    "main_first",
    "mean_over_ranks",
    "shard_rows",
    "shutdown",
    "torchrun_command",
]

_EXACT_FLOAT_DTYPES = (torch.float32, torch.float64)
_TIMEOUT_S = [300.0]  # the timeout init_distributed gave the process group, for error messages


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
    _TIMEOUT_S[0] = float(timeout_s)
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
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        except RuntimeError as exc:  # gloo/NCCL timeouts are RuntimeErrors (DistBackendError)
            raise RuntimeError(
                f"rank {dist.get_rank()} of {dist.get_world_size()}: an all-reduce did not complete "
                f"(train.dist_timeout_s={_TIMEOUT_S[0]:g} s); another rank is hung or died: {exc}"
            ) from exc


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


def shard_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rows ``rank, rank + world, ...`` of ``x`` (how evaluation batches are split over ranks)."""
    return x[ctx.rank :: ctx.world_size] if ctx.enabled else x


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process. A collective."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


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
    """Run ``moebalance <args>`` under torchrun's launcher (``torch.distributed.run``, in this
    process) with ``nproc`` processes; return 0, or the exit status of the first rank that failed.

    Each worker reports its own failure in one line; the launcher's report of it (its log record
    and a Python traceback of ``ChildFailedError``) is not shown.

    Raises:
        ChildProcessError: a worker was killed by a signal (naming the rank and the signal).
        KeyboardInterrupt: the launcher was stopped by SIGINT or SIGTERM (the workers get it too).
    """
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its ERROR record of a failed worker repeats what the worker said
    try:
        run(parse_args(torchrun_command(nproc, args)[3:]))  # the arguments after `python -m torch.distributed.run`
    except ChildFailedError as exc:
        # The root cause: the first rank that exited with a status of its own (the launcher then
        # stops the others with SIGTERM), else the first one killed by a signal.
        failures = sorted(exc.failures.items(), key=lambda item: (item[1].exitcode <= 0, item[1].timestamp))
        rank, failure = failures[0]
        if failure.exitcode < 0:
            try:
                name = signal.Signals(-failure.exitcode).name
            except ValueError:
                name = str(-failure.exitcode)
            raise ChildProcessError(f"rank {rank} of {nproc} was killed by signal {name}") from None
        return failure.exitcode
    except SignalException as exc:
        raise KeyboardInterrupt(str(exc)) from None
    finally:
        quiet.setLevel(level)
    return 0
