"""Load balancing: the Loss-Free bias update and the auxiliary-loss baselines.

Shape legend: B sequences, S tokens per sequence, T = B*S tokens, E experts, K experts per token,
L MoE layers.

* :class:`LossFreeBalancer` is Algorithm 1 of arXiv 2408.15664: after each optimizer step,
  ``b_i <- b_i + u * sign(c_mean - c_i)`` from the load counted since the previous step.
* :func:`sequence_aux_loss` is eq. 2 of the same paper (sequence-wise, Switch/GShard form);
  :class:`AuxLossBalancer` wraps it for a list of layers.

Every loss here is a pure function of router outputs; nothing is stashed in global lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from moebalance.routing import RouterOutput, TopKRouter

UpdateMode = Literal["sign", "error"]

__all__ = [
    "AuxLossBalancer",
    "Balancing",
    "LossFreeBalancer",
    "find_routers",
    "pop_expert_loads",
    "router_z_loss",
    "sequence_aux_loss",
]


def find_routers(module: nn.Module) -> list[TopKRouter]:
    """Every :class:`TopKRouter` inside ``module`` (``module`` itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, TopKRouter)]


def pop_expert_loads(routers: Sequence[TopKRouter]) -> torch.Tensor:
    """Read and clear the training-mode load counters of ``routers``.

    Returns:
        ``[L, E]`` float32 tokens routed to each expert of each layer since the last call.
        All routers must have the same ``E``.
    """
    if not routers:
        raise ValueError("no TopKRouter found: the model has no MoE layer")
    with torch.no_grad():
        loads_LE = torch.stack([r.load_counts for r in routers]).clone()
        for r in routers:
            r.load_counts.zero_()
    return loads_LE


class LossFreeBalancer:
    """Auxiliary-Loss-Free Load Balancing bias update (arXiv 2408.15664 §3, Algorithm 1).

    Call :meth:`step` once per optimizer step, after ``optimizer.step()``. It reads the load each
    router counted in training mode since the previous call (all gradient-accumulation
    micro-batches of the step), updates every router's ``expert_bias`` and clears the counts.
    Because only loads of *past* batches enter the bias, a token's routing never depends on later
    tokens of its own batch (§5 of the paper).

    Args:
        update_rate: ``u > 0`` (paper default 1e-3; its ablation tries 1e-4 and 1e-2).
        update: ``"sign"`` (Algorithm 1: ``b += u * sign(e)``) or ``"error"`` (the paper's
            ablation, ``b += u * e / c_mean``: the raw error, divided by the mean load so that the
            rate does not depend on the batch size).
        all_reduce: optional function applied in place to the ``[L, E]`` float32 load matrix
            before the update, e.g. a data-parallel all-reduce, so every rank updates from the
            global batch's load and keeps identical biases.

    Raises:
        ValueError: ``update_rate <= 0`` or an unknown ``update``.
    """

    def __init__(
        self,
        update_rate: float = 1e-3,
        update: UpdateMode = "sign",
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if not update_rate > 0:
            raise ValueError(f"update_rate must be > 0, got {update_rate}")
        if update not in ("sign", "error"):
            raise ValueError(f"update must be 'sign' or 'error', got {update!r}")
        self.update_rate = float(update_rate)
        self.update = update
        self.all_reduce = all_reduce

    @torch.no_grad()
    def step(self, model: nn.Module) -> torch.Tensor:
        """Apply one bias update to every router in ``model`` and clear their load counts.

        Args:
            model: a model, an MoE layer or a single :class:`TopKRouter`.

        Returns:
            ``[L, E]`` float32 loads the update used (global loads when ``all_reduce`` is set).
            A layer whose load is all zero (no training forward since the last step) is left as is.
        """
        routers = find_routers(model)
        loads_LE = pop_expert_loads(routers)
        if self.all_reduce is not None:
            self.all_reduce(loads_LE)
        delta_LE = self.bias_delta(loads_LE)
        for router, delta_E in zip(routers, delta_LE):
            router.expert_bias += delta_E.to(router.expert_bias.device)
        return loads_LE

    def bias_delta(self, loads_LE: torch.Tensor) -> torch.Tensor:
        """The change Algorithm 1 makes to the biases for loads ``c`` (``[E]`` or ``[L, E]``).

        ``e_i = c_mean - c_i`` with ``c_mean = K*T/E``, the mean of the row; ``delta = u*sign(e)``
        (or ``u * e / c_mean``). Rows that sum to 0 give a zero delta.
        """
        loads = loads_LE.float()
        mean = loads.mean(dim=-1, keepdim=True)
        error = mean - loads
        if self.update == "sign":
            return self.update_rate * torch.sign(error)
        return self.update_rate * error / mean.clamp_min(1e-12)


def sequence_aux_loss(
    scores_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    seq_len: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-wise auxiliary balance loss ``sum_i f_i P_i`` (arXiv 2408.15664 eq. 2), unscaled.

    For each sequence of length ``S`` (paper: ``T``):
    ``f_i = E/(K*S) * sum_t 1(token t selects expert i)`` and ``P_i = 1/S * sum_t s_{i,t}``;
    the loss is ``sum_i f_i * P_i``, averaged over the ``B`` sequences. ``f`` carries no gradient
    (it counts a discrete choice); the gradient flows through ``P``. With perfectly uniform routing
    ``f_i = 1`` and the loss is ``sum_i P_i`` = the mean over tokens of ``sum_i s_{i,t}`` (1 for a
    softmax gate). With a mask, padding tokens count for nothing and ``S`` is the number of real
    tokens of each sequence.

    Args:
        scores_TE: ``[B*S, E]`` scores ``s_{i,t}`` (after sigmoid/softmax), with gradient.
        indices_TK: ``[B*S, K]`` chosen experts.
        seq_len: ``S``; the tokens are ``B`` consecutive sequences of it.
        mask_T: optional ``[B*S]`` bool, ``False`` for padding.

    Returns:
        0-dim float32 tensor.
    """
    num_tokens, num_experts = scores_TE.shape
    top_k = indices_TK.shape[1]
    if seq_len < 1 or num_tokens % seq_len != 0:
        raise ValueError(f"seq_len must divide the {num_tokens} tokens, got {seq_len}")
    num_seqs = num_tokens // seq_len
    weight_T = (
        torch.ones(num_tokens, device=scores_TE.device)
        if mask_T is None
        else mask_T.to(scores_TE.device, torch.float32)
    )
    with torch.no_grad():
        onehot_TE = torch.zeros_like(scores_TE).scatter_(1, indices_TK, 1.0)
        counts_BE = (onehot_TE * weight_T[:, None]).view(num_seqs, seq_len, num_experts).sum(1)
    tokens_B = weight_T.view(num_seqs, seq_len).sum(1).clamp_min(1.0)
    f_BE = counts_BE * (num_experts / top_k) / tokens_B[:, None]
    p_BE = (scores_TE.float() * weight_T[:, None]).view(num_seqs, seq_len, num_experts).sum(1)
    p_BE = p_BE / tokens_B[:, None]
    return (f_BE * p_BE).sum(-1).mean()


class AuxLossBalancer:
    """Auxiliary-loss load balancing, sequence-wise as in the paper (arXiv 2408.15664 eq. 2).

    ``loss = coeff * sum over MoE layers of sequence_aux_loss(layer)``: the coefficient applies to
    each layer and the layers' losses add, as in DeepSeekMoE and Megatron-Core.

    Args:
        coeff: ``alpha >= 0`` (paper baseline 1e-3; its Figure 2 sweeps 0, 1e-4, 1e-3, 1e-2).

    Raises:
        ValueError: ``coeff < 0``.
    """

    def __init__(self, coeff: float = 1e-3) -> None:
        if not coeff >= 0:
            raise ValueError(f"coeff must be >= 0, got {coeff}")
        self.coeff = float(coeff)

    def __call__(self, routing: RouterOutput | Iterable[RouterOutput]) -> torch.Tensor:
        """The scaled loss for one layer's or several layers' router outputs.

        Each output must come from a ``[B, S, D]`` input (``seq_len`` set).

        Returns:
            0-dim float32 tensor to add to the language-model loss.
        """
        outputs = [routing] if isinstance(routing, RouterOutput) else list(routing)
        if not outputs:
            raise ValueError("AuxLossBalancer needs at least one RouterOutput")
        total = None
        for out in outputs:
            if out.seq_len is None:
                raise ValueError("sequence-wise aux loss needs router outputs from [B, S, D] inputs")
            layer = sequence_aux_loss(out.scores, out.indices, out.seq_len, out.mask)
            total = layer if total is None else total + layer
        return self.coeff * total


def router_z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5), unscaled: mean over tokens of
    ``logsumexp_i(logits_{t,i})**2``.

    ``logsumexp`` keeps it finite for logits of magnitude 100 and more.

    Args:
        logits_TE: ``[T, E]`` router logits (before the score function).
        mask_T: optional ``[T]`` bool, ``False`` for padding.

    Returns:
        0-dim float32 tensor.
    """
    z_T = torch.logsumexp(logits_TE.float(), dim=-1) ** 2
    if mask_T is None:
        return z_T.mean()
    weight = mask_T.to(z_T.dtype)
    return (z_T * weight).sum() / weight.sum().clamp_min(1.0)


class Balancing:
    """The balancing of one training run, built from :class:`~moebalance.config.BalanceConfig`.

    The training loop asks it for the extra loss of each micro-batch (:meth:`loss`) and calls
    :meth:`after_step` once after each optimizer step (the bias update, and the reset of the load
    counters). Adding a strategy means adding a branch here, not touching the loop.

    Args:
        strategy: ``"loss_free"``, ``"aux_loss"`` or ``"none"``.
        bias_update_rate, bias_update: see :class:`LossFreeBalancer`.
        aux_loss_coeff: see :class:`AuxLossBalancer`.
        z_loss_coeff: coefficient of :func:`router_z_loss`, summed over layers; 0 disables it.
        all_reduce: see :class:`LossFreeBalancer`.
    """

    def __init__(
        self,
        strategy: str = "loss_free",
        bias_update_rate: float = 1e-3,
        bias_update: UpdateMode = "sign",
        aux_loss_coeff: float = 1e-3,
        z_loss_coeff: float = 0.0,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if strategy not in ("loss_free", "aux_loss", "none"):
            raise ValueError(f"strategy must be 'loss_free', 'aux_loss' or 'none', got {strategy!r}")
        if not z_loss_coeff >= 0:
            raise ValueError(f"z_loss_coeff must be >= 0, got {z_loss_coeff}")
        self.strategy = strategy
        self.all_reduce = all_reduce
        self.bias = LossFreeBalancer(bias_update_rate, bias_update, all_reduce) if strategy == "loss_free" else None
        self.aux = AuxLossBalancer(aux_loss_coeff) if strategy == "aux_loss" else None
        self.z_loss_coeff = float(z_loss_coeff)

    @classmethod
    def from_config(cls, cfg, all_reduce: Callable[[torch.Tensor], None] | None = None) -> Balancing:
        """From a :class:`~moebalance.config.BalanceConfig`."""
        return cls(cfg.strategy, cfg.bias_update_rate, cfg.bias_update, cfg.aux_loss_coeff, cfg.z_loss_coeff, all_reduce)

    def loss(self, routing: Sequence[RouterOutput]) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Extra loss for one micro-batch, and its parts as floats for logging (``aux_loss``, ``z_loss``).

        Returns ``(None, {})`` when the strategy adds no loss.
        """
        total, parts = None, {}
        if self.aux is not None:
            total = self.aux(routing)
            parts["aux_loss"] = total.item()
        if self.z_loss_coeff > 0:
            z = self.z_loss_coeff * sum(router_z_loss(r.logits, r.mask) for r in routing)
            parts["z_loss"] = z.item()
            total = z if total is None else total + z
        return total, parts

    def after_step(self, model: nn.Module) -> torch.Tensor:
        """Once per optimizer step: update the biases (Loss-Free) and clear the load counters.

        Returns:
            ``[L, E]`` loads of the step (all-reduced when ``all_reduce`` is set).
        """
        if self.bias is not None:
            return self.bias.step(model)
        loads_LE = pop_expert_loads(find_routers(model))
        if self.all_reduce is not None:
            self.all_reduce(loads_LE)
        return loads_LE

    def discard_step(self, model: nn.Module) -> None:
        """Forget the loads counted in a step that was skipped (non-finite loss)."""
        pop_expert_loads(find_routers(model))
