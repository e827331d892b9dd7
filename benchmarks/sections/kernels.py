"""Section "kernels": which expert kernel is faster for which shape, grouped_mm against the
per-expert loop (uniform routing); for bf16 on a CPU without bf16 GEMMs, also the native-bf16 run
that the float32 compute replaces."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pieces import cases, fmt, moe_layer, ours_fixed, table, uniform_routing
from timing import Timer, fwd_bwd

from moebalance.experts import expert_compute_plan


def _native_dtype(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``forward`` run as if the CPU had native bf16 GEMMs (so the experts compute in bf16)."""
    from moebalance import experts

    def run() -> torch.Tensor:
        saved = experts._cpu_has_native_bf16
        experts._cpu_has_native_bf16 = lambda: True
        try:
            return forward()
        finally:
            experts._cpu_has_native_bf16 = saved

    return run


def run(args, timer: Timer, device: torch.device) -> list[dict]:
    """One row per ``--dtypes`` x ``--experts`` x ``--topk`` case."""
    rows = []
    for dtype_name, dtype, E, K in cases(args.dtypes, args):
        torch.manual_seed(0)
        T, D, Fh = args.tokens, args.d_model, args.d_ff
        a = moe_layer(D, Fh, E, K, dtype, device)
        b = moe_layer(D, Fh, E, K, dtype, device)
        b.load_state_dict(a.state_dict())
        b.experts.use_grouped_mm = False
        x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
        idx = uniform_routing(T, E, K, device)
        gates = torch.softmax(torch.randn(T, K, device=device), -1).requires_grad_()
        g = torch.randn(T, D, device=device, dtype=dtype)
        fns = {
            "grouped_mm": fwd_bwd(a, lambda: ours_fixed(a, x, idx, gates), g),
            "loop": fwd_bwd(b, lambda: ours_fixed(b, x, idx, gates), g),
        }
        if expert_compute_plan(device, dtype, D, Fh)[1] != dtype:
            # What the float32 compute saves: the same layer made to run bf16 GEMMs natively.
            fns["grouped_mm_native_dtype"] = fwd_bwd(a, _native_dtype(lambda: ours_fixed(a, x, idx, gates)), g)
        t = timer.compare(fns)
        row = {"dtype": dtype_name, "E": E, "K": K, "rows_per_expert": T * K // E,
               "compute_dtype": str(expert_compute_plan(device, dtype, D, Fh)[1]).replace("torch.", ""),
               **{f"ms_{k}": v * 1e3 for k, v in t.items()}, "loop_over_grouped": t["loop"] / t["grouped_mm"]}
        if "grouped_mm_native_dtype" in t:
            row["native_over_grouped"] = t["grouped_mm_native_dtype"] / t["grouped_mm"]
        rows.append(row)
        print(f"  kernels {dtype_name} E={E} K={K}: " + fmt(row), flush=True)
    return rows


def markdown(rows: list[dict], res: dict) -> str:
    return "\n### Expert kernel: grouped_mm against the per-expert loop (uniform routing)\n\n" + table(
        rows,
        [("dtype", "dtype", ""), ("compute_dtype", "computed in", ""), ("E", "E", ""), ("K", "K", ""),
         ("rows_per_expert", "rows/expert", ""), ("ms_grouped_mm", "grouped_mm ms", ".1f"),
         ("ms_loop", "loop ms", ".1f"), ("loop_over_grouped", "loop / grouped", ".2f"),
         ("ms_grouped_mm_native_dtype", "grouped_mm in native bf16 ms", ".1f"),
         ("native_over_grouped", "native bf16 / ours", ".2f")],
    )
