"""Auxiliary load-balancing losses as pure functions of router outputs.

Shape legend: T tokens (``B*S`` flattened), S tokens per sequence, E experts, K experts per token.

Every function here returns the *unscaled* loss (a 0-dim float32 tensor); the coefficient ``alpha``
is applied by :class:`~moebalance.balancing.Balancing`. Every function accepts a token mask
(``[T]`` bool, ``False`` for padding): padded tokens count neither in the expert counts ``f`` nor in
the mean scores ``P`` nor in the number of tokens that normalises them.

The ``f . P`` family (Switch Transformer eq. 4-6, GShard; arXiv 2408.15664 eq. 2) shares one
normalisation::

    f_i = E / (K * T') * sum_t 1(token t selects expert i)      (no gradient: a discrete choice)
    P_i = 1 / T' * sum_t s_{i,t}                                  (gradient flows through P)
    loss = sum_i f_i * P_i

and they differ only in the set of tokens ``T'`` over which ``f`` (and ``P``) are counted: one
sequence (:func:`sequence_aux_loss`), the whole micro-batch (:func:`batch_aux_loss`) or the whole
global batch (:func:`global_batch_aux_loss`). With ``f_i = 1`` for every expert (perfectly uniform
routing) the loss equals ``sum_i P_i``.

Which scores enter ``P``: the functions take ``s_{i,t}`` as given. With a sigmoid gate the raw
scores do not sum to 1 per token, and ``sum_i f_i P_i`` can then be lowered by shrinking every
score without moving a single token (all logits near -50 put the loss near 1e-21 whatever the
routing). DeepSeek-V3 (arXiv 2412.19437 eq. 19-20), Megatron-Core and OLMo-core therefore
normalise each token's scores over all experts first, ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}``
(:func:`normalize_scores`); :class:`~moebalance.balancing.Balancing` does so unless
``balance.aux_loss_scores="raw"``. With normalised scores (or a softmax gate, whose rows already
sum to 1) ``sum_i P_i = 1`` and the balanced value of every ``f . P`` loss is exactly 1.
"""

from __future__ import annotations

import torch

from moebalance.checks import check_index_tensor, check_int, check_loads, check_mask, check_score_tensor

__all__ = [
    "batch_aux_loss",
    "expert_counts",
    "global_batch_aux_loss",
    "importance_loss",
    "normalize_scores",
    "router_z_loss",
    "sequence_aux_loss",
]


def _token_weights(num_tokens: int, mask_T: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[T]`` float32 weights: 1 for a real token, 0 for padding (``mask_T`` checked: ``[T]`` bool)."""
    flat = check_mask("mask_T", mask_T, (num_tokens,), "[T]")
    if flat is None:
        return torch.ones(num_tokens, device=device)
    return flat.to(device, torch.float32)


def _check_routing(scores_TE: object, indices_TK: object) -> tuple[int, int, int]:
    """``(T, E, K)`` of checked ``[T, E]`` scores and ``[T, K]`` expert ids (K in [1, E])."""
    check_score_tensor("scores_TE", scores_TE)
    num_tokens, num_experts = scores_TE.shape
    check_index_tensor("indices_TK", indices_TK, num_tokens, num_experts, f"expert ids (E={num_experts})")
    if not 1 <= indices_TK.shape[1] <= num_experts:
        raise ValueError(f"indices_TK must have K in [1, E={num_experts}] columns, got shape {tuple(indices_TK.shape)}")
    return num_tokens, num_experts, indices_TK.shape[1]


def normalize_scores(scores_TE: torch.Tensor) -> torch.Tensor:
    """Each token's scores divided by their sum over all experts (DeepSeek-V3 eq. 19).

    ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}``, computed in float32 with the gradient flowing through
    the sum (as Megatron-Core's ``compute_routing_scores_for_aux_loss`` and OLMo-core do for sigmoid
    routers). For softmax scores it is the identity (up to rounding). The sum is clamped at the
    smallest normal float32 (1.2e-38) only to keep an all-zero row finite; Megatron-Core adds 1e-20
    instead, which would swamp rows of tiny sigmoid scores (logits near -50 sum to ~1e-21) and hide
    exactly the collapse this normalisation exists to show.

    Args:
        scores_TE: ``[T, E]`` non-negative scores after the score function.

    Returns:
        ``[T, E]`` float32; each row sums to 1 (to rounding) unless it was all zero.

    Raises:
        ValueError: ``scores_TE`` not a 2-D real floating-point tensor.
    """
    check_score_tensor("scores_TE", scores_TE)
    scores = scores_TE.float()
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def expert_counts(indices_TK: torch.Tensor, num_experts: int, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens that select each expert, as float32 without gradient.

    Args:
        indices_TK: ``[T, K]`` int64 chosen experts.
        num_experts: ``E``.
        mask_T: optional ``[T]`` bool, ``False`` for padding (counts nothing).

    Returns:
        ``[E]`` float32 counts; they sum to ``K * T_unmasked``.

    Raises:
        ValueError: ``num_experts`` not an int >= 1, ``indices_TK`` not a 2-D integer tensor of ids
            in ``[0, E)``, or ``mask_T`` not a ``[T]`` bool tensor.
    """
    check_int("num_experts", num_experts, 1)
    check_index_tensor("indices_TK", indices_TK, None, num_experts, f"expert ids (E={num_experts})")
    weight_T = _token_weights(indices_TK.shape[0], mask_T, indices_TK.device)
    counts = torch.zeros(num_experts, device=indices_TK.device)
    return counts.index_add_(0, indices_TK.reshape(-1), weight_T.repeat_interleave(indices_TK.shape[1]))


def sequence_aux_loss(
    scores_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    seq_len: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-wise auxiliary balance loss ``sum_i f_i P_i`` (arXiv 2408.15664 eq. 2), unscaled.

    ``f`` and ``P`` are counted per sequence of length ``S`` (the paper's ``T``), the loss is the
    mean over the ``B`` sequences. DeepSeek-V3's complementary sequence-wise loss has this form
    too (with a very small ``alpha``). With a mask, ``S`` is the number of real tokens of each
    sequence; a sequence of padding only contributes 0.

    Args:
        scores_TE: ``[B*S, E]`` scores ``s_{i,t}`` (after sigmoid/softmax), with gradient.
        indices_TK: ``[B*S, K]`` chosen experts.
        seq_len: ``S``; the tokens are ``B`` consecutive sequences of it.
        mask_T: optional ``[B*S]`` bool, ``False`` for padding.

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: ``scores_TE`` not a ``[T, E]`` real float tensor, ``indices_TK`` not ``[T, K]``
            integer expert ids in ``[0, E)`` with ``K`` in ``[1, E]``, ``seq_len`` not an int >= 1
            dividing ``T``, or ``mask_T`` not ``[T]`` bool. An empty batch (``T = 0``) gives 0.
    """
    num_tokens, num_experts, top_k = _check_routing(scores_TE, indices_TK)
    check_int("seq_len", seq_len, 1)
    if num_tokens % seq_len != 0:
        raise ValueError(f"seq_len must divide the {num_tokens} tokens, got {seq_len}")
    num_seqs = num_tokens // seq_len
    weight_T = _token_weights(num_tokens, mask_T, scores_TE.device)
    if num_seqs == 0:
        return (scores_TE.float().sum() * 0.0).reshape(())  # keeps the graph; mean of nothing is NaN
    with torch.no_grad():
        onehot_TE = torch.zeros_like(scores_TE, dtype=torch.float32).scatter_(1, indices_TK, 1.0)
        counts_BE = (onehot_TE * weight_T[:, None]).view(num_seqs, seq_len, num_experts).sum(1)
    tokens_B = weight_T.view(num_seqs, seq_len).sum(1).clamp_min(1.0)
    f_BE = counts_BE * (num_experts / top_k) / tokens_B[:, None]
    p_BE = (scores_TE.float() * weight_T[:, None]).view(num_seqs, seq_len, num_experts).sum(1)
    p_BE = p_BE / tokens_B[:, None]
    return (f_BE * p_BE).sum(-1).mean()


def batch_aux_loss(
    scores_TE: torch.Tensor, indices_TK: torch.Tensor, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Batch-level Switch/GShard auxiliary loss ``sum_i f_i P_i`` over all tokens of a micro-batch.

    Switch Transformer (Fedus et al. 2022, eq. 4-6) writes ``alpha * E * sum_i f_i P_i`` with
    ``f_i`` the *fraction* of tokens sent to expert i (top-1); here the factor ``E/K`` is folded
    into ``f_i`` (module docstring), so K > 1 keeps the balanced value at ``sum_i P_i``.
    ``transformers``' Mixtral ``load_balancing_loss_func`` equals ``K *`` this loss with a softmax
    gate, computed on all layers' tokens concatenated (tests/test_conformance.py).

    Args:
        scores_TE: ``[T, E]`` scores with gradient. indices_TK: ``[T, K]`` chosen experts.
        mask_T: optional ``[T]`` bool, ``False`` for padding.

    Returns:
        0-dim float32 tensor (0 for an empty batch).

    Raises:
        ValueError: as :func:`sequence_aux_loss`.
    """
    _check_routing(scores_TE, indices_TK)
    return sequence_aux_loss(scores_TE, indices_TK, max(scores_TE.shape[0], 1), mask_T)


def global_batch_aux_loss(
    scores_TE: torch.Tensor,
    global_counts_E: torch.Tensor,
    top_k: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global-batch auxiliary loss: ``f`` from the global batch, ``P`` from the local tokens.

    ``f_i = E / (K * T_G) * c_i`` with ``c`` the expert counts of the global batch (all
    micro-batches and data-parallel ranks; Qiu et al. 2025, "Demons in the Detail: On Implementing
    Load Balancing Loss for Training Specialized Mixture-of-Expert Models") and
    ``T_G = sum_i c_i / K``; ``P_i`` is the mean score over this micro-batch's (unmasked) tokens.
    Averaging this loss over equally sized micro-batches gives ``sum_i f_i P_i^global`` exactly,
    because ``f`` carries no gradient. How ``global_counts_E`` is gathered is the caller's business
    (see :class:`~moebalance.balancing.GlobalBatchCounts`).

    Args:
        scores_TE: ``[T, E]`` local scores with gradient.
        global_counts_E: ``[E]`` float expert counts of the global batch (masked tokens excluded).
        top_k: ``K``.
        mask_T: optional ``[T]`` bool, ``False`` for padding.

    Returns:
        0-dim float32 tensor (0 when the global batch has no token).

    Raises:
        ValueError: ``scores_TE`` not a ``[T, E]`` real float tensor, ``global_counts_E`` not
            ``[E]`` finite counts >= 0, ``top_k`` not an int in ``[1, E]``, or ``mask_T`` not
            ``[T]`` bool.
    """
    check_score_tensor("scores_TE", scores_TE)
    num_tokens, num_experts = scores_TE.shape
    check_loads("global_counts_E", global_counts_E)
    if global_counts_E.shape != (num_experts,):
        raise ValueError(f"global_counts_E must have shape [{num_experts}], got {tuple(global_counts_E.shape)}")
    check_int("top_k", top_k, 1, num_experts)
    weight_T = _token_weights(num_tokens, mask_T, scores_TE.device)
    counts = global_counts_E.detach().float().to(scores_TE.device)
    total_tokens = counts.sum() / top_k
    f_E = counts * (num_experts / top_k) / total_tokens.clamp_min(1.0)
    p_E = (scores_TE.float() * weight_T[:, None]).sum(0) / weight_T.sum().clamp_min(1.0)
    return (f_E * p_E).sum()


def importance_loss(scores_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """CV² importance loss (Shazeer et al. 2017, eq. 6): squared coefficient of variation of ``P``.

    ``P_i = 1/T * sum_t s_{i,t}`` (dense scores, every expert gets a gradient) and the loss is
    ``Var(P) / mean(P)**2`` with the population variance. For a softmax gate ``mean(P) = 1/E`` and
    this is ``E * sum_i (P_i - 1/E)**2``, the form of SPEC §3; dividing by ``mean(P)**2`` makes it
    scale-free for sigmoid gates too. It is 0 when all experts have the same mean score and at most
    ``E - 1`` (all the score mass on one expert). Shazeer sums the sparse gates instead; the dense
    scores are the SPEC's choice and avoid a loss that ignores unselected experts.

    Args:
        scores_TE: ``[T, E]`` scores with gradient.
        mask_T: optional ``[T]`` bool, ``False`` for padding.

    Returns:
        0-dim float32 tensor (0 for an empty batch).

    Raises:
        ValueError: ``scores_TE`` not a ``[T, E]`` real float tensor, or ``mask_T`` not ``[T]`` bool.
    """
    check_score_tensor("scores_TE", scores_TE)
    weight_T = _token_weights(scores_TE.shape[0], mask_T, scores_TE.device)
    p_E = (scores_TE.float() * weight_T[:, None]).sum(0) / weight_T.sum().clamp_min(1.0)
    mean = p_E.mean()
    return ((p_E - mean) ** 2).mean() / (mean**2).clamp_min(1e-20)


def router_z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5), unscaled: mean over tokens of
    ``logsumexp_i(logits_{t,i})**2``.

    ``logsumexp`` keeps it finite for logits of magnitude 100 and more.

    Args:
        logits_TE: ``[T, E]`` router logits (before the score function).
        mask_T: optional ``[T]`` bool, ``False`` for padding.

    Returns:
        0-dim float32 tensor (0 for an empty batch, like the other losses; ``mean`` would be NaN).

    Raises:
        ValueError: ``logits_TE`` not a ``[T, E]`` real float tensor, or ``mask_T`` not ``[T]`` bool.
    """
    check_score_tensor("logits_TE", logits_TE)
    weight_T = _token_weights(logits_TE.shape[0], mask_T, logits_TE.device)
    z_T = torch.logsumexp(logits_TE.float(), dim=-1) ** 2
    return (z_T * weight_T).sum() / weight_T.sum().clamp_min(1.0)
