"""Section 5 "scaling": time per token as E grows at fixed T, K, D, F (fixed active FLOPs),
uniform routing; the first of ``--dtypes`` and of ``--topk``."""

from __future__ import annotations

import torch
from pieces import DTYPES, fmt, moe_layer, ours_fixed, table, uniform_routing
from timing import Timer, fwd_bwd


def run(args, timer: Timer, device: torch.device) -> list[dict]:
    """One row per ``--scaling-experts`` value, all timed in one round-robin."""
    dtype_name = args.dtypes[0]
    dtype = DTYPES[dtype_name]
    T, D, Fh, K = args.tokens, args.d_model, args.d_ff, args.topk[0]
    fns, layers = {}, {}
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, D, device=device, dtype=dtype)
    gates = torch.softmax(torch.randn(T, K, device=device), -1).requires_grad_()
    for E in args.scaling_experts:
        torch.manual_seed(0)
        layers[E] = moe_layer(D, Fh, E, K, dtype, device)
        idx = uniform_routing(T, E, K, device)
        fns[E] = fwd_bwd(layers[E], lambda m=layers[E], i=idx: ours_fixed(m, x, i, gates), g)
    t = timer.compare(fns)
    base = t[args.scaling_experts[0]]
    rows = [{"dtype": dtype_name, "T": T, "D": D, "F": Fh, "K": K, "E": E, "rows_per_expert": T * K // E,
             "us_per_token": v / T * 1e6, "relative_to_first": v / base} for E, v in t.items()]
    for r in rows:
        print("  scaling " + fmt(r), flush=True)
    return rows


def markdown(rows: list[dict], res: dict) -> str:
    return "\n### 5. Scaling: time per token as E grows at fixed active FLOPs\n\n" + table(
        rows,
        [("dtype", "dtype", ""), ("K", "K", ""), ("E", "E", ""), ("rows_per_expert", "rows/expert", ""),
         ("us_per_token", "µs/token", ".2f"), ("relative_to_first", "relative", ".2f")],
    )
