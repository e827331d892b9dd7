"""What the benchmark sections share: the cases, the routings, our layer on fixed routing, the
dense SwiGLU ceiling, the LM FLOP count and the markdown table writer.

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token,
N = T*K (token, slot) pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from moebalance.experts import combine, expert_compute_plan, permute
from moebalance.moe import MoELayer
from moebalance.train.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cases(dtype_names: list[str], args) -> Iterator[tuple[str, torch.dtype, int, int]]:
    """``(dtype_name, dtype, E, K)`` for every dtype, ``--experts`` and ``--topk`` value, in that nesting."""
    for dtype_name in dtype_names:
        for E in args.experts:
            for K in args.topk:
                yield dtype_name, DTYPES[dtype_name], E, K


def moe_layer(D: int, Fh: int, E: int, K: int, dtype: torch.dtype, device: torch.device) -> MoELayer:
    """Our layer with Mixtral's routing (softmax, top-K renormalised), on ``device`` in ``dtype``."""
    return MoELayer(D, Fh, E, K, score_func="softmax", norm_topk_prob=True).to(device, dtype)


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


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of :class:`~moebalance.train.model.MoETransformer`: 6 x active
    matmul parameters + attention (Kaplan et al. 2020 / PaLM appendix B: ``6N + 12 L S D``,
    counted without the causal halving)."""
    D, L = cfg.d_model, cfg.n_layers
    attn = 4 * D * D
    routed = cfg.top_k * 3 * D * cfg.d_expert + cfg.num_experts * D + cfg.num_shared_experts * 3 * D * cfg.d_expert
    active = L * (attn + routed) + cfg.vocab_size * D  # the tied lm_head's product counts once
    return 6 * active + 12 * L * seq_len * D


def fmt(row: dict) -> str:
    """One result row as ``key=value`` pairs for the progress print (shapes left out)."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in ("T", "D", "F"))


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table: ``cols`` are ``(key, header, format)``; a missing value prints "—", or
    "skipped" where the row's ``skipped`` dict names that competitor."""
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for key, _, spec in cols:
            v = r.get(key)
            skipped = v is None and any(key.endswith(name) for name in r.get("skipped", {}))
            cells.append("skipped" if skipped else "—" if v is None else format(v, spec) if spec else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body
