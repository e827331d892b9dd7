"""The one timing helper every benchmark section uses: round-robin medians on one device.

Every competitor of a case runs once as a warm-up, then repeat ``r`` of every competitor runs
before repeat ``r+1`` of any, so a burst of load from other processes hits all of them alike.
Each figure is the median over the repeats; a section reports ratios of medians measured in the
same :meth:`Timer.compare` call (docs/benchmarks.md, "Method"). On CUDA the clock is read after
``torch.cuda.synchronize``.

Memory helpers live here too (:func:`forward_memory`): they measure one forward the same way for
every competitor.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    """Round-robin median timer of closures on one device.

    Args:
        device: where the closures run (CUDA: synchronised before and after each call).
        repeats: timed calls per closure, after one warm-up call each.
    """

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], None]) -> float:
        """Seconds of one call of ``fn``."""
        self._sync()
        t0 = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - t0

    def compare(self, fns: dict[str, Callable[[], None]]) -> dict[str, float]:
        """Median seconds per call of each closure, measured round-robin after one warm-up each."""
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(self.repeats):
            for name, fn in fns.items():
                times[name].append(self.once(fn))
        return {name: statistics.median(ts) for name, ts in times.items()}


def fwd_bwd(module: torch.nn.Module, forward: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    """A closure running ``forward()`` and its backward with upstream gradient ``grad``
    (the parameter gradients of ``module`` reset to ``None`` first)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        forward().backward(grad)

    return run


def saved_bytes(module: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes one forward keeps alive for its backward, parameters excluded: the saved tensors plus
    the output, each distinct storage counted once (a cast copy of a weight counts: it is extra)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    s = out.untyped_storage()
    storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def forward_memory(device: torch.device, module: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """CUDA: peak bytes allocated during one forward above the starting point (activations and
    transients); CPU, which has no allocator peak counter: :func:`saved_bytes`."""
    if device.type != "cuda":
        return saved_bytes(module, forward)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = forward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak
