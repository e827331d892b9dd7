"""Process set-up of a CPU training run: the C allocator.

Training on a CPU allocates and frees the same large tensors every step: the ``[B*S, V]`` logits
of the language-model head and their gradient (32 MiB each at the default 8 x 128 tokens and
V = 8192), the expert activations and weight gradients. glibc's ``malloc`` serves every block
above its ``mmap`` threshold (at most 32 MiB, adjusted as blocks are freed) with a fresh ``mmap``
and returns it to the kernel on ``free``, so each step page-faults and zeroes those pages again;
it also trims the heap top back to the kernel. :func:`keep_freed_memory` turns both off, as
jemalloc and tcmalloc (which PyTorch's CPU performance-tuning guide recommends) do by design.
Numerics do not change: only where the memory comes from.

Measured in ``benchmarks/sections/trainer.py`` (docs/benchmarks.md, section 7).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

# glibc <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> str:
    """Make glibc ``malloc`` keep freed memory for reuse instead of returning it to the kernel.

    No ``mmap`` below 2 GiB, no trimming below 2 GiB, and a 256 MiB top pad. Process-wide and
    irreversible (the process keeps its peak heap); calling it again changes nothing.

    Returns:
        what was set, for the run's records; ``"system"`` where the C library is not glibc (or
        ``mallopt`` refused), in which case nothing changed.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    big = 2**31 - 1  # mallopt takes an int: at most 2 GiB
    ok = [libc.mallopt(M_MMAP_THRESHOLD, big), libc.mallopt(M_TRIM_THRESHOLD, big), libc.mallopt(M_TOP_PAD, 256 << 20)]
    if not all(ok):
        return "system"
    return "glibc mallopt: mmap threshold 2 GiB, trim threshold 2 GiB, top pad 256 MiB"
