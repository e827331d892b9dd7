"""Section 6 "memory": memory per token of one forward of the section-3 blocks (see
:func:`timing.forward_memory`: on CUDA the allocator's peak; on CPU the bytes the forward keeps for
its backward, parameters excluded)."""

from __future__ import annotations

import peers
import torch
from pieces import cases, fmt, table
from timing import Timer, forward_memory


def run(args, timer: Timer, device: torch.device) -> list[dict]:
    """One row per ``--peer-dtypes`` x ``--experts`` x ``--topk`` case (``timer`` is not used: nothing is timed)."""
    rows = []
    for dtype_name, dtype, E, K in cases(args.peer_dtypes, args):
        T = args.tokens
        x = torch.randn(1, T, args.d_model, device=device, dtype=dtype, requires_grad=True)
        blocks, skipped = peers.peer_blocks(x, args.d_ff, E, K, args.mixtral_impls, args.max_gather_gb)
        mem = {n: forward_memory(device, m, f) / T for n, (m, f) in blocks.items()}
        row = {"dtype": dtype_name, "E": E, "K": K, "skipped": skipped, **{f"bytes_per_token_{n}": v for n, v in mem.items()}}
        rows.append(row)
        print(f"  memory {dtype_name} E={E} K={K}: " + fmt(row), flush=True)
    return rows


def markdown(rows: list[dict], res: dict) -> str:
    on_cuda = res["machine"]["device"] == "cuda"
    mem_kind = "peak bytes allocated in one forward" if on_cuda else "bytes one forward keeps for backward, parameters excluded"
    mrows = [{**r, **{k: v / 1024 for k, v in r.items() if k.startswith("bytes_per_token_")}} for r in rows]
    cols = [("dtype", "dtype", ""), ("E", "E", ""), ("K", "K", ""), ("bytes_per_token_ours", "ours", ".1f")]
    cols += [(f"bytes_per_token_mixtral_{i}", f"Mixtral {i}", ".1f") for i in res["settings"]["mixtral_impls"]]
    cols += [("bytes_per_token_ours_shared", "ours+shared", ".1f"), ("bytes_per_token_qwen2_grouped_mm", "Qwen2-MoE", ".1f")]
    return f"\n### 6. Memory per token ({mem_kind}; KiB per token)\n\n" + table(mrows, cols)
