"""Start a few gloo processes on localhost for the multi-process tests.

Starting processes costs seconds (each imports torch), so every multi-process test of the suite
shares one 2-rank job (:func:`run_shared_job`, used by the session fixture ``dist_job`` in
``conftest.py``); each test module contributes a ``dist_job_part(rank, world, out_dir)``.
"""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    # The same environment torchrun gives its workers; moebalance.parallel reads it.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    fn(rank, world_size, *args)


def run_ranks(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; raise if one fails.

    ``fn`` must be importable (a module-level function); results go through files.
    """
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


DIST_WORLD = 2
_PARTS = ("test_expert_parallel", "test_distributed", "test_rules")


def _shared_job(rank: int, world_size: int, out_dir: str) -> None:
    import importlib

    from moebalance.parallel import init_distributed, shutdown

    ctx = init_distributed("cpu")
    for name in _PARTS:
        importlib.import_module(name).dist_job_part(rank, world_size, out_dir)
    shutdown(ctx)


def run_shared_job(out_dir: str) -> None:
    """Run every test module's ``dist_job_part`` in one set of ``DIST_WORLD`` processes."""
    run_ranks(_shared_job, DIST_WORLD, out_dir)
