"""moebalance benchmark suite: one command, ratios measured side by side in one run.

    python benchmarks/run.py            # the issue's default shapes (T=8192, D=512, F=1024, E=16/64, K=2/6)
    python benchmarks/run.py --quick    # tiny shapes, one repeat: a smoke test, not a measurement

Every case builds its competitors with identical weights and inputs and times forward+backward
(upstream gradient a fixed dense random tensor, parameter gradients reset to ``None`` before each
run) round-robin: repeat ``r`` of every competitor runs before repeat ``r+1`` of any, so a burst of
load from other processes hits all of them alike. Each figure is the median over ``--repeats``
after one warm-up run; ratios are ratios of medians measured in the same run.

Sections (see docs/benchmarks.md for the results and how to read them):
  1 ceiling    our layer (uniform routing) against dense SwiGLU GEMMs of the same active FLOPs
  2 imbalance  the same with skewed routing, beside a padded batched-matmul layer
  3 peers      our full layer against transformers' Mixtral (eager / batched_mm / grouped_mm) and
               Qwen2-MoE blocks with the same weights
  6 memory     memory per token of one forward of the same blocks
  4 balancing  a training step of the small LM with loss_free / none / aux_loss, the bias update
               alone (64 layers x 256 experts), and training tokens/s against the dense ceiling
  5 scaling    time per token as E grows at fixed active FLOPs

On CUDA the same script runs unchanged (``--device cuda``, the default when a GPU is present):
times are synchronised and memory is the peak of ``torch.cuda.max_memory_allocated`` over one
forward. On CPU, which has no allocator peak counter, memory is the bytes one forward keeps for
its backward (saved tensors plus output, distinct storages, parameters excluded), measured with
``torch.autograd.graph.saved_tensors_hooks``.

Writes ``<out-dir>/bench_<tag>.json`` (every raw median, settings, machine) and
``<out-dir>/bench_<tag>.md`` (the tables); the tag defaults to the device type.

Allocator (CPU): by default (``--malloc reuse``) the script asks glibc to keep freed memory for
reuse (``mallopt``: no ``mmap`` below 2 GiB, no trimming), as jemalloc or tcmalloc do and as
PyTorch's CPU performance-tuning guide recommends. With glibc's defaults every tensor above 32 MiB
(the ``[T*K, F]`` activations and ``[E, F, D]`` weight gradients here) is a fresh ``mmap`` whose
pages the kernel faults in and zeroes on every step; in the two scaling runs of
docs/benchmarks.md (separate runs, so only roughly) a forward+backward took 1.4-2.0x as long
under glibc's defaults, more the more and larger tensors a competitor allocates.
``--malloc system`` measures glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import peers  # noqa: E402

from moebalance.balancing import Balancing, LossFreeBalancer  # noqa: E402
from moebalance.experts import combine, expert_compute_plan, permute  # noqa: E402
from moebalance.metrics import max_violation  # noqa: E402
from moebalance.moe import MoELayer  # noqa: E402
from moebalance.routing import TopKRouter  # noqa: E402
from moebalance.train.config import ModelConfig  # noqa: E402
from moebalance.train.model import MoETransformer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SECTIONS = ("kernels", "ceiling", "imbalance", "peers", "memory", "balancing", "scaling")


# ---------------------------------------------------------------- timing


class Timer:
    """Round-robin median timer of forward+backward closures on one device."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], None]) -> float:
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
    """A closure running ``forward()`` and its backward with upstream gradient ``grad``."""
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


# ---------------------------------------------------------------- routed-layer pieces


def uniform_routing(T: int, E: int, K: int, device: torch.device) -> torch.Tensor:
    """``[T, K]`` ids with every expert getting exactly ``T*K/E`` pairs (up to rounding), K distinct per token."""
    t = torch.arange(T, device=device)[:, None]
    k = torch.arange(K, device=device)[None, :]
    return (t * K + k) % E


def skewed_routing(T: int, E: int, K: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[T, K]`` distinct ids per token drawn with Zipf weights ``1/(e+1)^1.5``: a few experts take most pairs."""
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
    idx = torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)
    return idx.to(device)


def ours_fixed(layer: MoELayer, x_TD: torch.Tensor, idx_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """Our dispatch + experts + combine on given routing (the router's cost is left out on both sides)."""
    x_ND, d = permute(x_TD, idx_TK, gates_TK, layer.router.num_experts)
    return combine(layer.experts(x_ND, d.counts), d, x_TD.shape[0]).to(x_TD.dtype)


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


class DenseSwiGLU(torch.nn.Module):
    """The ceiling: one SwiGLU over all ``N = T*K`` rows, i.e. the same GEMM FLOPs with no routing."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(d_ff, d_model) * d_model**-0.5)
        self.w3 = torch.nn.Parameter(torch.randn(d_ff, d_model) * d_model**-0.5)
        self.w2 = torch.nn.Parameter(torch.randn(d_model, d_ff) * d_ff**-0.5)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        # Same compute dtype as our experts (float32 for bf16 on a CPU without bf16 GEMMs).
        _, compute = expert_compute_plan(x_ND.device, x_ND.dtype, x_ND.shape[1], self.w1.shape[0], False)
        x, w1, w3, w2 = (t.to(compute) for t in (x_ND, self.w1, self.w3, self.w2))
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2).to(x_ND.dtype)


def cases(dtype_names: list[str], args) -> Iterator[tuple[str, torch.dtype, int, int]]:
    """``(dtype_name, dtype, E, K)`` for every dtype, ``--experts`` and ``--topk`` value, in that nesting."""
    for dtype_name in dtype_names:
        for E in args.experts:
            for K in args.topk:
                yield dtype_name, DTYPES[dtype_name], E, K


def _layer(D: int, Fh: int, E: int, K: int, dtype: torch.dtype, device: torch.device) -> MoELayer:
    return MoELayer(D, Fh, E, K, score_func="softmax", norm_topk_prob=True).to(device, dtype)


def bench_routed(args, timer: Timer, device: torch.device, skewed: bool) -> list[dict]:
    """Sections 1 (uniform) and 2 (skewed): ours vs the dense ceiling (and the padded layer when skewed)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype_name, dtype, E, K in cases(args.peer_dtypes if skewed else args.dtypes, args):
        torch.manual_seed(0)
        T, D, Fh = args.tokens, args.d_model, args.d_ff
        layer = _layer(D, Fh, E, K, dtype, device)
        dense = DenseSwiGLU(D, Fh).to(device, dtype)
        x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
        x_dense = torch.randn(T * K, D, device=device, dtype=dtype, requires_grad=True)
        idx = skewed_routing(T, E, K, device, gen) if skewed else uniform_routing(T, E, K, device)
        gates = torch.softmax(torch.randn(T, K, device=device), -1).requires_grad_()
        g = torch.randn(T, D, device=device, dtype=dtype)
        g_dense = torch.randn(T * K, D, device=device, dtype=dtype)
        fns = {
            "ours": fwd_bwd(layer, lambda: ours_fixed(layer, x, idx, gates), g),
            "dense": fwd_bwd(dense, lambda: dense(x_dense), g_dense),
        }
        loads = torch.bincount(idx.reshape(-1), minlength=E)
        skipped = {}
        if skewed:
            # Our layer on uniform routing in the same round-robin: the direct measure of what skew costs it.
            uniform = uniform_routing(T, E, K, device)
            fns["ours_uniform"] = fwd_bwd(layer, lambda: ours_fixed(layer, x, uniform, gates), g)
            need = padded_peak_bytes(E, int(loads.max()), D, Fh)
            if need > args.max_padded_gb * 2**30:
                skipped["padded_bmm"] = f"needs about {need / 2**30:.0f} GiB of activations"
            else:
                fns["padded_bmm"] = fwd_bwd(layer, lambda: padded_bmm(layer, x, idx, gates), g)
        t = timer.compare(fns)
        row = {
            "dtype": dtype_name, "T": T, "D": D, "F": Fh, "E": E, "K": K,
            "kernel": "/".join(str(v).replace("torch.", "") for v in expert_compute_plan(device, dtype, D, Fh)),
            "maxvio": round(max_violation(loads).item(), 3),
            **{f"ms_{k}": v * 1e3 for k, v in t.items()},
            "ours_over_ceiling": t["dense"] / t["ours"],
            "tokens_per_s_ours": T / t["ours"],
        }
        if skewed:
            row["skewed_over_uniform"] = t["ours"] / t["ours_uniform"]
            row["padded_rows"] = int(loads.max()) * E
            row["skipped"] = skipped
            if "padded_bmm" in t:
                row["padded_over_ours"] = t["padded_bmm"] / t["ours"]
        rows.append(row)
        print(f"  {'skewed' if skewed else 'uniform'} {dtype_name} E={E} K={K}: " + _fmt(row), flush=True)
    return rows


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


def bench_kernels(args, timer: Timer, device: torch.device) -> list[dict]:
    """Which expert kernel is faster for which shape: grouped_mm against the per-expert loop (uniform routing)."""
    rows = []
    for dtype_name, dtype, E, K in cases(args.dtypes, args):
        torch.manual_seed(0)
        T, D, Fh = args.tokens, args.d_model, args.d_ff
        a = _layer(D, Fh, E, K, dtype, device)
        b = _layer(D, Fh, E, K, dtype, device)
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
        print(f"  kernels {dtype_name} E={E} K={K}: " + _fmt(row), flush=True)
    return rows


def _peer_blocks(args, device: torch.device, dtype: torch.dtype, E: int, K: int, x: torch.Tensor):
    """Our layer and the transformers blocks with the same weights: ``{name: (module, forward)}``, skipped."""
    T, D, Fh = args.tokens, args.d_model, args.d_ff
    torch.manual_seed(0)
    mix = peers.ours_like_mixtral(D, Fh, E, K)
    qwen = peers.ours_like_qwen2(D, Fh, E, K)
    blocks = {"ours": (mix, lambda m=mix: m(x).output)}
    skipped = {}
    for impl in args.mixtral_impls:
        # batched_mm gathers one [2F, D] and one [D, F] weight matrix per (token, slot) pair.
        gathered = T * K * 3 * Fh * D * torch.empty((), dtype=dtype).element_size()
        if impl == "batched_mm" and gathered > args.max_gather_gb * 2**30:
            skipped[f"mixtral_{impl}"] = f"would gather {gathered / 2**30:.1f} GiB of expert weights"
            continue
        blk = peers.mixtral_block(mix, impl)
        blocks[f"mixtral_{impl}"] = (blk, lambda m=blk: m(x))
    blocks["ours_shared"] = (qwen, lambda m=qwen: m(x).output)
    blk = peers.qwen2_block(qwen, "grouped_mm")
    blocks["qwen2_grouped_mm"] = (blk, lambda m=blk: m(x))
    for m, _ in blocks.values():
        m.to(device, dtype)
    return blocks, skipped


def bench_peers(args, timer: Timer, device: torch.device) -> list[dict]:
    """Section 3: full blocks, router included, same weights and inputs."""
    rows = []
    for dtype_name, dtype, E, K in cases(args.peer_dtypes, args):
        T, D, Fh = args.tokens, args.d_model, args.d_ff
        x = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(1, T, D, device=device, dtype=dtype)
        blocks, skipped = _peer_blocks(args, device, dtype, E, K, x)
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
        print(f"  peers {dtype_name} E={E} K={K}: " + _fmt(row), flush=True)
    return rows


def bench_memory(args, timer: Timer, device: torch.device) -> list[dict]:
    """Section 6: memory per token of one forward of each block of section 3 (see :func:`forward_memory`)."""
    rows = []
    for dtype_name, dtype, E, K in cases(args.peer_dtypes, args):
        T = args.tokens
        x = torch.randn(1, T, args.d_model, device=device, dtype=dtype, requires_grad=True)
        blocks, skipped = _peer_blocks(args, device, dtype, E, K, x)
        mem = {n: forward_memory(device, m, f) / T for n, (m, f) in blocks.items()}
        row = {"dtype": dtype_name, "E": E, "K": K, "skipped": skipped, **{f"bytes_per_token_{n}": v for n, v in mem.items()}}
        rows.append(row)
        print(f"  memory {dtype_name} E={E} K={K}: " + _fmt(row), flush=True)
    return rows


def bench_scaling(args, timer: Timer, device: torch.device) -> list[dict]:
    """Section 5: E grows at fixed T, K, D, F (fixed active FLOPs), uniform routing, first dtype."""
    dtype_name = args.dtypes[0]
    dtype = DTYPES[dtype_name]
    T, D, Fh, K = args.tokens, args.d_model, args.d_ff, args.topk[0]
    fns, layers = {}, {}
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, D, device=device, dtype=dtype)
    gates = torch.softmax(torch.randn(T, K, device=device), -1).requires_grad_()
    for E in args.scaling_experts:
        torch.manual_seed(0)
        layers[E] = _layer(D, Fh, E, K, dtype, device)
        idx = uniform_routing(T, E, K, device)
        fns[E] = fwd_bwd(layers[E], lambda m=layers[E], i=idx: ours_fixed(m, x, i, gates), g)
    t = timer.compare(fns)
    base = t[args.scaling_experts[0]]
    rows = [{"dtype": dtype_name, "T": T, "D": D, "F": Fh, "K": K, "E": E, "rows_per_expert": T * K // E,
             "us_per_token": v / T * 1e6, "relative_to_first": v / base} for E, v in t.items()]
    for r in rows:
        print("  scaling " + _fmt(r), flush=True)
    return rows


# ---------------------------------------------------------------- section 4: the price of balancing


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + attention (Kaplan et al. 2020 / PaLM
    appendix B: ``6N + 12 L S D``, counted without the causal halving)."""
    D, L = cfg.d_model, cfg.n_layers
    attn = 4 * D * D
    routed = cfg.top_k * 3 * D * cfg.d_expert + cfg.num_experts * D + cfg.num_shared_experts * 3 * D * cfg.d_expert
    active = L * (attn + routed) + cfg.vocab_size * D  # the tied lm_head's product counts once
    return 6 * active + 12 * L * seq_len * D


def bench_balancing(args, timer: Timer, device: torch.device) -> dict:
    """A full training step (forward, backward, AdamW, balancing) of the small LM per strategy."""
    cfg = ModelConfig(**args.lm)
    B, S = args.lm_batch, args.lm_seq
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    dtype = DTYPES[args.dtypes[0]]
    fns = {}
    after_step_s: dict[str, list[float]] = {}  # the balancing call at the end of each step, timed inside it
    for strategy in ("none", "loss_free", "aux_loss"):
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(device)  # float32 weights; bf16 runs under autocast, as train.py does
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        bal = Balancing(strategy)

        def step(model=model, opt=opt, bal=bal, times=after_step_s.setdefault(strategy, [])) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(x, y)
            extra, _ = bal.loss(out.routing)
            loss = out.loss if extra is None else out.loss + extra
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(timer.once(lambda: bal.after_step(model)))

        fns[strategy] = step
    t = timer.compare(fns)

    # The bias update alone: Algorithm 1 for 64 layers x 256 experts (the loads read, the sign
    # update, the counters cleared), median of many calls.
    routers = torch.nn.ModuleList(TopKRouter(8, 256, 8) for _ in range(64)).to(device)
    for r in routers:
        r.load_counts.copy_(torch.randint(0, 100, (256,), generator=gen).float())
    lf = LossFreeBalancer(1e-3)
    upd = [timer.once(lambda: lf.step(routers)) for _ in range(args.bias_calls)]

    # Dense ceiling of the machine: fwd+bwd of a [B*S, D] x [D, 4D] GEMM pair, autocast as the model.
    n, D = B * S, cfg.d_model
    a = torch.randn(n, D, device=device, requires_grad=True)
    w = torch.randn(4 * D, D, device=device, requires_grad=True)
    v = torch.randn(D, 4 * D, device=device, requires_grad=True)
    gd = torch.randn(n, D, device=device)
    gemm_module = torch.nn.ParameterList([w, v])

    def gemm_pair() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return F.linear(F.linear(a, w), v).float()

    gemm = timer.compare({"gemm": fwd_bwd(gemm_module, gemm_pair, gd)})["gemm"]
    gemm_flops = 2 * n * D * 4 * D * 2 * 3  # two GEMMs, forward + two backward products each
    flops_tok = model_flops_per_token(cfg, S)
    res = {
        "model": args.lm, "batch": B, "seq_len": S, "dtype": args.dtypes[0],
        **{f"ms_step_{k}": v * 1e3 for k, v in t.items()},
        "loss_free_over_none": t["loss_free"] / t["none"],
        "aux_loss_over_none": t["aux_loss"] / t["none"],
        "bias_update_us_in_step": statistics.median(after_step_s["loss_free"]) * 1e6,
        "bias_update_share_of_step": statistics.median(after_step_s["loss_free"]) / t["loss_free"],
        "bias_update_us_64x256": statistics.median(upd) * 1e6,
        "tokens_per_s": B * S / t["loss_free"],
        "model_tflops_per_token": flops_tok / 1e12,
        "dense_gemm_gflops": gemm_flops / gemm / 1e9,
        "fraction_of_dense_ceiling": flops_tok * B * S / t["loss_free"] / (gemm_flops / gemm),
    }
    print("  balancing " + _fmt(res), flush=True)
    return res


# ---------------------------------------------------------------- report


def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in ("T", "D", "F"))


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            skipped = v is None and any(key.endswith(name) for name in r.get("skipped", {}))
            cells.append("skipped" if skipped else "—" if v is None else format(v, fmt) if fmt else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def to_markdown(res: dict) -> str:
    m = res["machine"]
    s = res["settings"]
    out = [
        f"Device: {m['device']} ({m['device_name']}), torch {m['torch']}, threads {m['threads']}, "
        f"native bf16 GEMM: {m['native_bf16']}, allocator: {m.get('malloc', 'system')}. Shapes: T={s['tokens']}, D={s['d_model']}, F={s['d_ff']}; "
        f"median of {s['repeats']} round-robin repeats after a warm-up; forward+backward "
        f"(section 4 runs its own small LM; see its table).\n",
    ]
    if "kernels" in res:
        out.append("\n### Expert kernel: grouped_mm against the per-expert loop (uniform routing)\n\n")
        out.append(_table(res["kernels"], [("dtype", "dtype", ""), ("compute_dtype", "computed in", ""), ("E", "E", ""), ("K", "K", ""),
                                            ("rows_per_expert", "rows/expert", ""), ("ms_grouped_mm", "grouped_mm ms", ".1f"),
                                            ("ms_loop", "loop ms", ".1f"), ("loop_over_grouped", "loop / grouped", ".2f"),
                                            ("ms_grouped_mm_native_dtype", "grouped_mm in native bf16 ms", ".1f"),
                                            ("native_over_grouped", "native bf16 / ours", ".2f")]))
    if "ceiling" in res:
        out.append("\n### 1. Ceiling: our layer against dense GEMMs of the same active FLOPs (uniform routing)\n\n")
        out.append(_table(res["ceiling"], [("dtype", "dtype", ""), ("kernel", "kernel/compute", ""), ("E", "E", ""), ("K", "K", ""),
                                            ("ms_ours", "ours ms", ".1f"), ("ms_dense", "dense ms", ".1f"),
                                            ("ours_over_ceiling", "fraction of ceiling", ".2f"), ("tokens_per_s_ours", "ours tokens/s", ".0f")]))
    if "imbalance" in res:
        out.append("\n### 2. Imbalance: skewed routing (Zipf 1.5), beside a padded batched-matmul layer\n\n")
        out.append(_table(res["imbalance"], [("dtype", "dtype", ""), ("E", "E", ""), ("K", "K", ""), ("maxvio", "MaxVio", ".2f"),
                                              ("ms_ours", "ours ms", ".1f"), ("ms_dense", "dense ms", ".1f"), ("ms_padded_bmm", "padded ms", ".1f"),
                                              ("ours_over_ceiling", "fraction of ceiling", ".2f"), ("skewed_over_uniform", "ours skewed / uniform", ".2f"),
                                              ("padded_over_ours", "padded / ours", ".2f")]))
    if "peers" in res:
        out.append("\n### 3. Peers: our layer's speed-up over transformers' blocks (same weights; router included)\n\n")
        cols = [("dtype", "dtype", ""), ("E", "E", ""), ("K", "K", ""), ("ms_ours", "ours ms", ".1f")]
        for impl in s["mixtral_impls"]:
            cols.append((f"speedup_vs_mixtral_{impl}", f"vs Mixtral {impl}", ".2f"))
        cols += [("ms_ours_shared", "ours+shared ms", ".1f"), ("speedup_vs_qwen2_grouped_mm", "vs Qwen2-MoE grouped_mm", ".2f"),
                 ("max_abs_diff_vs_mixtral", "max abs diff vs Mixtral", ".1e")]
        out.append(_table(res["peers"], cols))
    if "memory" in res:
        mem_kind = "peak bytes allocated in one forward" if m["device"] == "cuda" else "bytes one forward keeps for backward, parameters excluded"
        out.append(f"\n### 6. Memory per token ({mem_kind}; KiB per token)\n\n")
        mrows = [{**r, **{k: v / 1024 for k, v in r.items() if k.startswith("bytes_per_token_")}} for r in res["memory"]]
        cols = [("dtype", "dtype", ""), ("E", "E", ""), ("K", "K", ""), ("bytes_per_token_ours", "ours", ".1f")]
        cols += [(f"bytes_per_token_mixtral_{i}", f"Mixtral {i}", ".1f") for i in s["mixtral_impls"]]
        cols += [("bytes_per_token_ours_shared", "ours+shared", ".1f"), ("bytes_per_token_qwen2_grouped_mm", "Qwen2-MoE", ".1f")]
        out.append(_table(mrows, cols))
    if "balancing" in res:
        b = res["balancing"]
        out.append("\n### 4. The price of balancing: one training step of the small LM\n\n")
        out.append(_table([b], [("ms_step_none", "none ms", ".1f"), ("ms_step_loss_free", "loss_free ms", ".1f"), ("ms_step_aux_loss", "aux_loss ms", ".1f"),
                                ("loss_free_over_none", "loss_free / none", ".3f"), ("aux_loss_over_none", "aux_loss / none", ".3f"),
                                ("bias_update_us_in_step", "bias update in the step (µs)", ".0f"),
                                ("bias_update_share_of_step", "its share of the step", ".2%"),
                                ("bias_update_us_64x256", "bias update, 64x256 (µs)", ".0f")]))
        out.append("\nTraining throughput (loss_free): " + f"{b['tokens_per_s']:.0f} tokens/s, {b['model_tflops_per_token'] * 1e6:.2f} MFLOP/token, "
                   f"{b['fraction_of_dense_ceiling']:.2f} of the dense GEMM rate ({b['dense_gemm_gflops']:.1f} GFLOP/s).\n")
    if "scaling" in res:
        out.append("\n### 5. Scaling: time per token as E grows at fixed active FLOPs\n\n")
        out.append(_table(res["scaling"], [("dtype", "dtype", ""), ("K", "K", ""), ("E", "E", ""), ("rows_per_expert", "rows/expert", ""),
                                            ("us_per_token", "µs/token", ".2f"), ("relative_to_first", "relative", ".2f")]))
    return "".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--tag", default=None, help="output name: bench_<tag>.json/.md (default: the device type)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", default="16,64")
    p.add_argument("--topk", default="2,6")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--peer-dtypes", default=None, help="dtypes of sections 2, 3 and 6: imbalance, peers, memory (default: --dtypes)")
    p.add_argument("--mixtral-impls", default=",".join(peers.MIXTRAL_IMPLEMENTATIONS))
    p.add_argument("--max-gather-gb", type=float, default=2.0, help="skip Mixtral batched_mm above this gathered-weight size")
    p.add_argument("--max-padded-gb", type=float, default=12.0,
                   help="skip the padded layer of section 2 when its activations would exceed this")
    p.add_argument("--lm-batch", type=int, default=16, help="sequences per training step in section 4")
    p.add_argument("--scaling-experts", default="8,16,32,64,128,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--malloc", choices=("reuse", "system"), default="reuse",
                   help="CPU: keep freed memory for reuse (glibc mallopt; default) or glibc's defaults")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.d_model, a.d_ff, a.repeats = 128, 32, 64, 1
        a.experts, a.topk, a.scaling_experts = "4,8", "2", "4,8,16"
    def ints(flag: str, text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            p.error(f"{flag} must be comma-separated integers >= 1, got {text!r}")
        if min(values) < 1:
            p.error(f"{flag} must be integers >= 1, got {text!r}")
        return values

    a.experts = ints("--experts", a.experts)
    a.topk = ints("--topk", a.topk)
    a.scaling_experts = ints("--scaling-experts", a.scaling_experts)
    for flag in ("tokens", "d_model", "d_ff", "repeats", "lm_batch"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.threads < 0:
        p.error(f"--threads must be >= 0 (0: torch's default), got {a.threads}")
    for flag in ("max_gather_gb", "max_padded_gb"):
        if not 0 <= getattr(a, flag) < math.inf:
            p.error(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(a, flag)}")
    if max(a.topk) > min(a.experts):
        p.error(f"--topk {max(a.topk)} exceeds the smallest of --experts, {min(a.experts)}")
    if a.topk[0] > min(a.scaling_experts):  # section 5 runs the first top-K
        p.error(f"--topk {a.topk[0]} exceeds the smallest of --scaling-experts, {min(a.scaling_experts)}")
    a.dtypes = a.dtypes.split(",")
    a.peer_dtypes = a.peer_dtypes.split(",") if a.peer_dtypes else a.dtypes
    a.mixtral_impls = [v for v in a.mixtral_impls.split(",") if v]
    a.sections = a.sections.split(",")
    for flag, names in (("--dtypes", a.dtypes), ("--peer-dtypes", a.peer_dtypes)):
        for d in names:
            if d not in DTYPES:
                p.error(f"{flag}: dtype must be one of {sorted(DTYPES)}, got {d!r}")
    # Checked here, not when a section reaches them: a bad value must not cost a long run.
    unknown = [name for name in a.sections if name not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    bad_impls = [v for v in a.mixtral_impls if v not in peers.MIXTRAL_IMPLEMENTATIONS]
    if bad_impls:
        p.error(f"--mixtral-impls: unknown {bad_impls}; choose from {list(peers.MIXTRAL_IMPLEMENTATIONS)}")
    if a.tag is not None and (not a.tag or any(c in a.tag for c in "/\\") or a.tag in (".", "..")):
        p.error(f"--tag must be a plain name (it becomes bench_<tag>.json), got {a.tag!r}")
    try:
        device = torch.device(a.device)
    except RuntimeError as exc:
        p.error(f"--device: {exc}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device must be cpu, or cuda where torch sees a GPU (it sees {torch.cuda.device_count()}), got {a.device!r}")
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        p.error(f"--out-dir {out} is a file, not a folder")
    # The small LM of section 4: the default preset's model (quick: a tiny one).
    a.lm = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4, d_expert=32) if a.quick else dict(vocab_size=8192)
    a.lm_batch, a.lm_seq = (2, 32) if a.quick else (a.lm_batch, 128)
    a.bias_calls = 5 if a.quick else 200
    return a


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and :func:`run` the benchmarks."""
    return run(parse_args(argv))


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>


def keep_freed_memory() -> str:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS.

    Process-wide and irreversible: the benchmark's own process calls it, tests do not.

    Returns:
        what was set, for the report; ``"system"`` where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return "system"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    big = 2**31 - 1  # mallopt takes an int: at most 2 GiB
    ok = [libc.mallopt(M_MMAP_THRESHOLD, big), libc.mallopt(M_TRIM_THRESHOLD, big), libc.mallopt(M_TOP_PAD, 256 << 20)]
    if not all(ok):
        return "system"
    return "glibc mallopt: mmap threshold 2 GiB, trim threshold 2 GiB, top pad 256 MiB"


def run(args: argparse.Namespace) -> dict:
    """Run the selected sections and write the JSON and markdown files; returns the results."""
    device = torch.device(args.device)
    malloc = keep_freed_memory() if args.malloc == "reuse" and device.type == "cpu" else "system"
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(device, args.repeats)
    from moebalance.experts import _cpu_has_native_bf16

    res: dict = {
        "machine": {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_native_bf16(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "malloc": malloc,
        },
        "settings": {k: v for k, v in vars(args).items()},
    }
    sections = {
        "kernels": lambda: bench_kernels(args, timer, device),
        "ceiling": lambda: bench_routed(args, timer, device, skewed=False),
        "imbalance": lambda: bench_routed(args, timer, device, skewed=True),
        "peers": lambda: bench_peers(args, timer, device),
        "memory": lambda: bench_memory(args, timer, device),
        "balancing": lambda: bench_balancing(args, timer, device),
        "scaling": lambda: bench_scaling(args, timer, device),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # before the work: a folder that cannot be made fails now
    t_start = time.perf_counter()
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        res[name] = sections[name]()
        res.setdefault("seconds", {})[name] = time.perf_counter() - t0
    res["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["seconds"]["total"] = time.perf_counter() - t_start
    name = f"bench_{args.tag or device.type}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    (out / f"{name}.md").write_text(to_markdown(res))
    print(f"wrote {out / name}.json and .md ({res['seconds']['total']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
