"""Section 1 "ceiling": our dispatch + experts + combine on uniform routing (every expert gets
exactly T*K/E rows) against one dense SwiGLU over the same T*K rows, i.e. the same GEMM FLOPs with
no routing. Section 2 (imbalance) builds on :func:`routed_case`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pieces import DTYPES, DenseSwiGLU, cases, fmt, moe_layer, ours_fixed, table, uniform_routing
from timing import Timer, fwd_bwd

from moebalance.experts import expert_compute_plan
from moebalance.metrics import max_violation


def routed_case(args, device: torch.device, dtype: torch.dtype, E: int, K: int, routing: Callable[[], torch.Tensor]):
    """Our layer and the dense ceiling with their inputs, seeded alike for every case.

    Returns:
        ``(fns, ctx)``: the ``ours`` and ``dense`` forward+backward closures, and a dict with the
        layer, its input ``x``, ``gates``, upstream gradient ``g`` and routing ``idx`` (``[T, K]``).
    """
    torch.manual_seed(0)
    T, D, Fh = args.tokens, args.d_model, args.d_ff
    layer = moe_layer(D, Fh, E, K, dtype, device)
    dense = DenseSwiGLU(D, Fh).to(device, dtype)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    x_dense = torch.randn(T * K, D, device=device, dtype=dtype, requires_grad=True)
    idx = routing()
    gates = torch.softmax(torch.randn(T, K, device=device), -1).requires_grad_()
    g = torch.randn(T, D, device=device, dtype=dtype)
    g_dense = torch.randn(T * K, D, device=device, dtype=dtype)
    fns = {
        "ours": fwd_bwd(layer, lambda: ours_fixed(layer, x, idx, gates), g),
        "dense": fwd_bwd(dense, lambda: dense(x_dense), g_dense),
    }
    return fns, {"layer": layer, "x": x, "gates": gates, "g": g, "idx": idx}


def routed_row(args, device: torch.device, dtype_name: str, E: int, K: int, idx: torch.Tensor, t: dict[str, float]) -> dict:
    """The columns sections 1 and 2 share, from the medians ``t`` (seconds)."""
    T, D, Fh = args.tokens, args.d_model, args.d_ff
    loads = torch.bincount(idx.reshape(-1), minlength=E)
    return {
        "dtype": dtype_name, "T": T, "D": D, "F": Fh, "E": E, "K": K,
        "kernel": "/".join(str(v).replace("torch.", "") for v in expert_compute_plan(device, DTYPES[dtype_name], D, Fh)),
        "maxvio": round(max_violation(loads).item(), 3),
        **{f"ms_{k}": v * 1e3 for k, v in t.items()},
        "ours_over_ceiling": t["dense"] / t["ours"],
        "tokens_per_s_ours": T / t["ours"],
    }


def run(args, timer: Timer, device: torch.device) -> list[dict]:
    """One row per ``--dtypes`` x ``--experts`` x ``--topk`` case."""
    rows = []
    for dtype_name, dtype, E, K in cases(args.dtypes, args):
        fns, ctx = routed_case(args, device, dtype, E, K, lambda: uniform_routing(args.tokens, E, K, device))
        row = routed_row(args, device, dtype_name, E, K, ctx["idx"], timer.compare(fns))
        rows.append(row)
        print(f"  uniform {dtype_name} E={E} K={K}: " + fmt(row), flush=True)
    return rows


def markdown(rows: list[dict], res: dict) -> str:
    return "\n### 1. Ceiling: our layer against dense GEMMs of the same active FLOPs (uniform routing)\n\n" + table(
        rows,
        [("dtype", "dtype", ""), ("kernel", "kernel/compute", ""), ("E", "E", ""), ("K", "K", ""),
         ("ms_ours", "ours ms", ".1f"), ("ms_dense", "dense ms", ".1f"),
         ("ours_over_ceiling", "fraction of ceiling", ".2f"), ("tokens_per_s_ours", "ours tokens/s", ".0f")],
    )
