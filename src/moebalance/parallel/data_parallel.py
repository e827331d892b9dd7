"""Data parallelism: the DDP wrapper, accumulation without sync, the global gradient norm and the
bias checksum that shows every rank ended with the same biases.

May import the library and :mod:`moebalance.parallel.process` /
:mod:`moebalance.parallel.expert_parallel`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect

import torch
from torch import nn

from moebalance.balancing import find_routers
from moebalance.parallel.expert_parallel import expert_parameter_names
from moebalance.parallel.process import DistContext, all_reduce_sum_, gather_objects

__all__ = ["bias_checksum", "clip_grad_norm_", "gather_bias_checksums", "no_sync", "wrap_data_parallel"]


def wrap_data_parallel(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` (or return it unchanged for one process).

    Buffers are not synced in ``forward`` (``forward_sync_buffers=False``; ``broadcast_buffers=False``
    on torch < 2.13, which deprecates it with a ``FutureWarning`` per rank): the only router buffer
    is ``expert_bias``, which stays equal because every rank applies the same update from the same
    all-reduced loads (a test checks the checksums), so broadcasting it every forward would only
    cost time. The per-rank ``load_counts`` are not buffers at all, so a user's default
    ``DDP(model)`` (which does broadcast) cannot overwrite them either. Parameters sharded by expert parallelism are excluded from DDP (each rank holds
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
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=device_ids, forward_sync_buffers=False)
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


def bias_checksum(model: nn.Module) -> str:
    """SHA-256 (hex) of the raw float32 bytes of every router's ``expert_bias``, in module order."""
    h = hashlib.sha256()
    for router in find_routers(model):
        h.update(router.expert_bias.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_bias_checksums(model: nn.Module, ctx: DistContext) -> list[str]:
    """Every rank's :func:`bias_checksum`, in rank order (a collective: every rank must call it)."""
    return gather_objects(bias_checksum(model), ctx)
