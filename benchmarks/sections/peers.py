"""Section 3 "peers": full blocks, router included, same weights and inputs: ours (softmax, top-K
renormalised) against transformers 5.x ``MixtralSparseMoeBlock`` with each experts
implementation, and ours with one shared expert against ``Qwen2MoeSparseMoeBlock`` (grouped_mm).
The blocks themselves are built in ``benchmarks/peers.py``."""

from __future__ import annotations

import peers
import torch
from pieces import cases, fmt, table
from timing import Timer, fwd_bwd


def run(args, timer: Timer, device: torch.device) -> list[dict]:
    """One row per ``--peer-dtypes`` x ``--experts`` x ``--topk`` case."""
    rows = []
    for dtype_name, dtype, E, K in cases(args.peer_dtypes, args):
        T, D, Fh = args.tokens, args.d_model, args.d_ff
        x = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(1, T, D, device=device, dtype=dtype)
        blocks, skipped = peers.peer_blocks(x, Fh, E, K, args.mixtral_impls, args.max_gather_gb)
        with torch.no_grad():  # same weights: Mixtral outputs must match ours
            ref = blocks["ours"][1]()
            err = {n: (f() - ref).abs().max().item() for n, (_, f) in blocks.items() if n.startswith("mixtral")}
        t = timer.compare({n: fwd_bwd(m, f, g) for n, (m, f) in blocks.items()})
        row = {"dtype": dtype_name, "T": T, "D": D, "F": Fh, "E": E, "K": K, "skipped": skipped,
               "max_abs_diff_vs_mixtral": max(err.values()) if err else None,
               **{f"ms_{n}": v * 1e3 for n, v in t.items()}}
        for n in t:
            if n.startswith("mixtral"):
                row[f"speedup_vs_{n}"] = t[n] / t["ours"]
        row["speedup_vs_qwen2_grouped_mm"] = t["qwen2_grouped_mm"] / t["ours_shared"]
        rows.append(row)
        print(f"  peers {dtype_name} E={E} K={K}: " + fmt(row), flush=True)
    return rows


def markdown(rows: list[dict], res: dict) -> str:
    cols = [("dtype", "dtype", ""), ("E", "E", ""), ("K", "K", ""), ("ms_ours", "ours ms", ".1f")]
    for impl in res["settings"]["mixtral_impls"]:
        cols.append((f"speedup_vs_mixtral_{impl}", f"vs Mixtral {impl}", ".2f"))
    cols += [("ms_ours_shared", "ours+shared ms", ".1f"), ("speedup_vs_qwen2_grouped_mm", "vs Qwen2-MoE grouped_mm", ".2f"),
             ("max_abs_diff_vs_mixtral", "max abs diff vs Mixtral", ".1e")]
    return "\n### 3. Peers: our layer's speed-up over transformers' blocks (same weights; router included)\n\n" + table(rows, cols)
