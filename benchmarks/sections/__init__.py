"""The benchmark sections, one module each, in the order ``benchmarks/run.py`` runs and reports them.

Each module has ``run(args, timer, device)`` (prints a line per case and returns its rows, or one
dict) and ``markdown(result, res)`` (its table for ``bench_<tag>.md``; ``res`` is the whole report,
for the settings and the machine). All timing goes through :class:`timing.Timer`.
"""

from __future__ import annotations

from sections import balancing, ceiling, imbalance, kernels, memory, peers, scaling, trainer

SECTIONS = {
    "kernels": kernels,
    "ceiling": ceiling,
    "imbalance": imbalance,
    "peers": peers,
    "memory": memory,
    "balancing": balancing,
    "scaling": scaling,
    "trainer": trainer,
}
