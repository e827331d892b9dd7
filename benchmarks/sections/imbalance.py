"""Section 2 "imbalance": section 1 with skewed routing (each token draws K distinct experts with
Zipf weights 1/(e+1)^1.5), beside a padded batched-matmul layer that gives every expert as many
rows as the busiest one, and our layer on uniform routing in the same round-robin (what skew
costs it, as one side-by-side ratio)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pieces import cases, fmt, ours_fixed, skewed_routing, table, uniform_routing
from timing import Timer, fwd_bwd

from moebalance.experts import expert_compute_plan
from moebalance.moe import MoELayer
from sections.ceiling import routed_case, routed_row


def padded_bmm(layer: MoELayer, x_TD: torch.Tensor, idx_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """A padded batched-matmul layer: every expert gets a ``[C, D]`` block with ``C`` = the largest load.

    This is the layout of capacity-based implementations run without dropping; its cost follows the
    busiest expert, which makes the price of imbalance visible.
    """
    e = layer.experts
    E = e.num_experts
    T, K = idx_TK.shape
    flat = idx_TK.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(order.numel(), device=order.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    cap = int(counts.max())
    _, compute = expert_compute_plan(x_TD.device, x_TD.dtype, x_TD.shape[1], e.w1.shape[1], False)
    x = x_TD.to(compute)
    buf = x.new_zeros(E, cap, x.shape[1])
    buf = buf.index_put((flat[order], rank), x[order // K])
    w1, w3, w2 = (w.to(compute) for w in (e.w1, e.w3, e.w2))
    h = F.silu(torch.bmm(buf, w1.transpose(1, 2))) * torch.bmm(buf, w3.transpose(1, 2))
    y = torch.bmm(h, w2.transpose(1, 2))[flat[order], rank]
    weighted = y * gates_TK.reshape(-1)[order, None].to(y.dtype)
    out = weighted.new_zeros(T, x.shape[1]).index_add(0, order // K, weighted)
    return out.to(x_TD.dtype)


def padded_peak_bytes(E: int, capacity: int, D: int, Fh: int) -> int:
    """Rough peak of :func:`padded_bmm`'s forward+backward activations, float32: ``E*C`` rows of
    the input and output (``2D``) and of about seven ``F``-wide tensors alive at once."""
    return E * capacity * (2 * D + 7 * Fh) * 4


def run(args, timer: Timer, device: torch.device) -> list[dict]:
    """One row per ``--peer-dtypes`` x ``--experts`` x ``--topk`` case."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    T, D, Fh = args.tokens, args.d_model, args.d_ff
    for dtype_name, dtype, E, K in cases(args.peer_dtypes, args):
        fns, ctx = routed_case(args, device, dtype, E, K, lambda: skewed_routing(T, E, K, device, gen))
        layer, x, gates, g, idx = ctx["layer"], ctx["x"], ctx["gates"], ctx["g"], ctx["idx"]
        loads = torch.bincount(idx.reshape(-1), minlength=E)
        # Our layer on uniform routing in the same round-robin: the direct measure of what skew costs it.
        uniform = uniform_routing(T, E, K, device)
        fns["ours_uniform"] = fwd_bwd(layer, lambda: ours_fixed(layer, x, uniform, gates), g)
        skipped = {}
        need = padded_peak_bytes(E, int(loads.max()), D, Fh)
        if need > args.max_padded_gb * 2**30:
            skipped["padded_bmm"] = f"needs about {need / 2**30:.0f} GiB of activations"
        else:
            fns["padded_bmm"] = fwd_bwd(layer, lambda: padded_bmm(layer, x, idx, gates), g)
        t = timer.compare(fns)
        row = routed_row(args, device, dtype_name, E, K, idx, t)
        row["skewed_over_uniform"] = t["ours"] / t["ours_uniform"]
        row["padded_rows"] = int(loads.max()) * E
        row["skipped"] = skipped
        if "padded_bmm" in t:
            row["padded_over_ours"] = t["padded_bmm"] / t["ours"]
        rows.append(row)
        print(f"  skewed {dtype_name} E={E} K={K}: " + fmt(row), flush=True)
    return rows


def markdown(rows: list[dict], res: dict) -> str:
    return "\n### 2. Imbalance: skewed routing (Zipf 1.5), beside a padded batched-matmul layer\n\n" + table(
        rows,
        [("dtype", "dtype", ""), ("E", "E", ""), ("K", "K", ""), ("maxvio", "MaxVio", ".2f"),
         ("ms_ours", "ours ms", ".1f"), ("ms_dense", "dense ms", ".1f"), ("ms_padded_bmm", "padded ms", ".1f"),
         ("ours_over_ceiling", "fraction of ceiling", ".2f"), ("skewed_over_uniform", "ours skewed / uniform", ".2f"),
         ("padded_over_ours", "padded / ours", ".2f")],
    )
