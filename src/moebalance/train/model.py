"""A small decoder-only Transformer language model with an MoE feed-forward in every layer.

Pre-norm blocks: ``x + Attn(RMSNorm(x))`` then ``x + FFN(RMSNorm(x))``, with rotary position
embeddings (Su et al. 2021) and causal ``scaled_dot_product_attention``. The FFN is a
:class:`~moebalance.moe.MoELayer` (optionally a dense SwiGLU in the first layers, as DeepSeekMoE).

Shape legend: B batch, S sequence length, D model dim, H heads, Dh head dim, V vocabulary.
The model is single-process; parallelism wraps it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moebalance.experts import GroupedExperts, SwiGLU
from moebalance.moe import MoELayer
from moebalance.routing import RouterOutput, TopKRouter
from moebalance.train.config import BalanceConfig, ModelConfig

__all__ = ["LMOutput", "MoETransformer"]


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[S, Dh/2]`` for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` by position-dependent angles."""
    x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x_BHSDh.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dense: bool, bias_mode: str) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.ffn: nn.Module
        if dense:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff_dense)
        else:
            self.ffn = MoELayer(
                cfg.d_model,
                cfg.d_expert,
                cfg.num_experts,
                cfg.top_k,
                num_shared_experts=cfg.num_shared_experts,
                score_func=cfg.score_func,
                norm_topk_prob=cfg.norm_topk_prob,
                route_scale=cfg.route_scale,
                bias_mode=bias_mode,  # type: ignore[arg-type]
                n_group=cfg.n_group,
                topk_group=cfg.topk_group,
                routing=cfg.routing,
                expert_choice_capacity=cfg.expert_choice_capacity,
                capacity_factor=cfg.capacity_factor,
                drop_policy=cfg.drop_policy,
            )

    def forward(self, x, cos, sin, mask=None) -> tuple[torch.Tensor, RouterOutput | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h, mask)
            return x + out.output, out.routing
        return x + self.ffn(h), None


@dataclass
class LMOutput:
    """Result of :meth:`MoETransformer.forward`.

    Attributes:
        logits: ``[B, S, V]``.
        loss: mean next-token cross-entropy (nats) over unmasked targets, or ``None`` without targets.
        routing: one :class:`~moebalance.routing.RouterOutput` per MoE layer, in depth order.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    routing: list[RouterOutput]


class MoETransformer(nn.Module):
    """Decoder-only MoE language model.

    Args:
        cfg: :class:`~moebalance.train.config.ModelConfig`.
        balance: only ``balance.bias_mode`` is read here (multiplicative bias starts at 1).

    With ``cfg.activation_checkpointing`` each block's activations are recomputed in the backward
    pass (``torch.utils.checkpoint``, non-reentrant) instead of stored. The recomputed router
    forward routes the same tokens again; the router does not count them a second time (see
    ``routing._in_backward_recompute``), so the step's load is the same with or without it.
    """

    def __init__(self, cfg: ModelConfig, balance: BalanceConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        bias_mode = balance.bias_mode if balance is not None else "additive"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i < cfg.first_dense_layers, bias_mode) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std), residual projections scaled by 1/sqrt(2*n_layers).

        Routers get N(0, ``router_init_std``) when it is set, else ``init_std`` too: the logits
        ``u_t . e_i`` of a unit-RMS input then start with std ``std * sqrt(d_model)`` (0.23 at
        d_model 128 and 0.02; ``d_model**-0.5`` gives 1). Measured, the larger init did not prevent
        the early collapse nor lower the final MaxVio_global (docs/reproduction.md).
        """
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, std=out_std if last in ("proj", "w2") else std)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w1, std=std)
                nn.init.normal_(module.w3, std=std)
                nn.init.normal_(module.w2, std=out_std)
            elif isinstance(module, TopKRouter):
                router_std = self.cfg.router_init_std
                nn.init.normal_(module.weight, std=std if router_std is None else router_std)

    @property
    def routers(self) -> list[TopKRouter]:
        return [b.ffn.router for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self,
        tokens_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        mask_BS: torch.Tensor | None = None,
    ) -> LMOutput:
        """Next-token prediction.

        Args:
            tokens_BS: ``[B, S]`` int64 token ids, ``S <= max_seq_len``.
            targets_BS: optional ``[B, S]`` int64 next tokens.
            mask_BS: optional ``[B, S]`` bool, ``False`` for padding (no load, no loss).

        Raises:
            ValueError: ``S`` beyond ``max_seq_len``.
        """
        B, S = tokens_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens_BS)
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        routing: list[RouterOutput] = []
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x, r = checkpoint(block, x, cos, sin, mask_BS, use_reentrant=False)
            else:
                x, r = block(x, cos, sin, mask_BS)
            if r is not None:
                routing.append(r)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets_BS is not None:
            flat_targets = targets_BS.reshape(-1)
            if mask_BS is not None:
                flat_targets = flat_targets.masked_fill(~mask_BS.reshape(-1).bool(), -100)
            loss = F.cross_entropy(logits.float().view(B * S, -1), flat_targets, ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, routing=routing)
