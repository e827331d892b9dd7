"""Top-K routing with an expert-wise selection bias.

Shape legend used in names and docstrings:
    T tokens, D model dim, E routed experts (``num_experts``), K experts per token (``top_k``).

The routing rule is eq. 1 and eq. 3 of Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy
for Mixture-of-Experts", arXiv 2408.15664 (DeepSeek-AI):

    s_{i,t} = G(u_t . e_i)                                     (eq. 1, G = sigmoid or softmax)
    g_{i,t} = s_{i,t} if s_{i,t} + b_i in TopK({s_{j,t} + b_j}, K) else 0      (eq. 3)

The bias ``b`` only *selects*: gate values always come from the unbiased scores ``s``. The router
module owns ``b`` as the persistent float32 buffer ``expert_bias`` and counts the load it produced
in training mode; it never changes the bias itself. The update (Algorithm 1) lives in
:mod:`moebalance.balancing` and runs once per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moebalance.checks import (
    check_bool,
    check_int,
    check_mask,
    check_number,
    check_score_tensor,
    describe,
    is_finite_number,
    is_integer_tensor,
)
from moebalance.experts import count_pairs, expert_capacity

ScoreFunc = Literal["sigmoid", "softmax"]
BiasMode = Literal["additive", "multiplicative"]

__all__ = [
    "ExpertChoiceOutput",
    "ExpertChoiceRouter",
    "RouterOutput",
    "TopKRouter",
    "chosen_experts",
    "count_tokens_per_expert",
    "expert_choice_capacity",
    "route_expert_choice",
    "route_topk",
]


@dataclass
class RouterOutput:
    """What one routing call produced.

    Attributes:
        gates: ``[T, K]`` float32 gate values ``g_{i,t}`` of the chosen experts, taken from the
            *unbiased* scores (then normalised and scaled if the router says so).
        indices: ``[T, K]`` int64 ids of the chosen experts (chosen with the bias).
        scores: ``[T, E]`` float32 scores ``s_{i,t}`` after the score function.
        logits: ``[T, E]`` float32 router logits ``u_t . e_i`` (for the z-loss).
        tokens_per_expert: ``[E]`` int64, tokens assigned to each expert by this call
            (masked tokens and tokens whose scores are not finite excluded); sums to
            ``K * T_counted``.
        seq_len: length ``S`` of the sequences when the input was ``[B, S, D]`` (``None`` for a
            flat ``[T, D]`` input); the sequence-wise auxiliary loss needs it.
        mask: ``[T]`` bool, ``True`` for real tokens, or ``None`` when every token counts.
        dropped_tokens: 0-dim int64 (token, slot) pairs of real tokens that the MoE layer's
            capacity factor dropped after routing; ``None`` until a :class:`~moebalance.moe.MoELayer`
            dispatched them. ``tokens_per_expert`` counts the load before dropping.
    """

    gates: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor
    tokens_per_expert: torch.Tensor
    seq_len: int | None = None
    mask: torch.Tensor | None = None
    dropped_tokens: torch.Tensor | None = None


def count_tokens_per_expert(
    indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Count how many (token, slot) pairs go to each expert.

    Args:
        indices: ``[T, K]`` int64 expert ids.
        num_experts: ``E``.
        mask: optional ``[T]`` bool, ``False`` for padding tokens (they count for nothing).

    Returns:
        ``[E]`` int64 counts ``c_i`` (Algorithm 1 of arXiv 2408.15664).

    Raises:
        ValueError: ``num_experts`` not an int >= 1, ``indices`` not a 2-D integer tensor of ids in
            ``[0, E)``, or ``mask`` not a ``[T]`` bool tensor. The id range is checked on the
            counts (no extra host synchronisation).
    """
    check_int("num_experts", num_experts, 1)
    if not is_integer_tensor(indices) or indices.dim() != 2:
        raise ValueError(f"indices must be a [T, K] integer tensor of expert ids, got {describe(indices)}")
    flat = indices.reshape(-1)
    flat_mask = check_mask("mask", mask, indices.shape[:1], "[T]")
    if flat_mask is not None:
        flat = flat[flat_mask.reshape(-1, 1).expand_as(indices).reshape(-1)]
    return count_pairs(flat, num_experts, "indices")


def route_topk(
    scores: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None = None,
    *,
    bias_mode: BiasMode = "additive",
    n_group: int = 1,
    topk_group: int = 1,
) -> torch.Tensor:
    """Choose ``top_k`` experts per token from (optionally biased) scores.

    Stateless: the bias is an argument, as in torchtitan's router.

    Args:
        scores: ``[T, E]`` float scores ``s_{i,t}``.
        top_k: ``K``.
        bias: ``[E]`` float32 expert bias ``b_i`` or ``None``. Additive mode selects on
            ``s + b`` (arXiv 2408.15664 eq. 3); multiplicative mode on ``s * b`` (the paper's
            ablation, §5, which it finds worse).
        bias_mode: ``"additive"`` or ``"multiplicative"``.
        n_group, topk_group: group-limited routing (DeepSeek-V3): experts are split into
            ``n_group`` equal groups, groups are ranked by the sum of their two best biased
            scores, and only experts of the ``topk_group`` best groups can be chosen. Dropped
            groups are masked with ``-inf`` (not 0, which would let a dropped group win once the
            biased scores go negative). ``n_group=1`` disables it. This is the selection of
            ``transformers``' ``DeepseekV3TopkRouter`` (sigmoid scores + ``e_score_correction_bias``
            = our additive bias): indices and gates match it exactly (tests/test_conformance.py).
            transformers 4.x filled dropped groups with 0 instead of ``-inf`` and could pick an
            expert of a dropped group once every kept biased score was negative; we deliberately
            do not.

    Returns:
        ``[T, K]`` int64 expert ids, best first.

    Raises:
        ValueError: ``scores`` not a ``[T, E]`` real float tensor, ``bias`` not ``None`` or an ``[E]``
            real float tensor, or ``top_k``, ``bias_mode``, ``n_group``, ``topk_group`` outside
            the ranges of :class:`TopKRouter`.
    """
    check_score_tensor("scores", scores)
    check_routing_args(scores.shape[1], top_k, "sigmoid", 1.0, bias_mode, n_group, topk_group)
    if bias is not None:
        check_score_tensor("bias", bias, (1,), f"[E={scores.shape[1]}]")
        if bias.shape[0] != scores.shape[1]:
            raise ValueError(f"bias must have shape [E={scores.shape[1]}] (as scores), got {tuple(bias.shape)}")
    choice = scores
    if bias is not None:
        choice = scores * bias if bias_mode == "multiplicative" else scores + bias
    if n_group > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        per_group = min(2, grouped.shape[-1])
        group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)  # [T, n_group]
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(
            num_tokens, num_experts
        )
    return choice.topk(top_k, dim=-1, sorted=True).indices


class TopKRouter(nn.Module):
    """Linear top-K router with a Loss-Free Balancing bias (arXiv 2408.15664 eq. 1, eq. 3).

    Args:
        d_model: ``D``.
        num_experts: ``E >= 1``.
        top_k: ``K`` in ``[1, E]``.
        score_func: ``"sigmoid"`` (the paper's default gate) or ``"softmax"``.
        norm_topk_prob: divide the K gate values of a token by their sum (DeepSeek-V3 with
            sigmoid; Mixtral/Qwen-MoE with softmax). Refused with ``top_k=1``: normalising one
            gate makes it 1 for every token, so the language-model loss gives the router no
            gradient (transformers does normalise there; see docs/transformers.md).
        route_scale: multiply gate values by this factor (DeepSeek-V3's routed scaling factor).
        bias_mode: ``"additive"`` (eq. 3) or ``"multiplicative"`` (ablation, §5). The bias starts
            at 0 (additive) or 1 (multiplicative), so an untouched bias changes nothing.
        n_group, topk_group: group-limited routing, see :func:`route_topk`.

    Buffers:
        ``expert_bias`` ``[E]`` float32, persistent (saved in ``state_dict``), no gradient. It stays
        float32 when the module is cast (``.to(torch.bfloat16)``, ``.half()``): an update of
        ``1e-3`` on a bias near 1 vanishes in bfloat16.
        ``load_counts`` ``[E]`` float32: tokens routed to each expert *by this rank* since the
        balancer last read them. Filled only by forwards in training mode with grad enabled. A plain
        tensor attribute, not a buffer, so that ``DistributedDataParallel`` (which broadcasts rank
        0's buffers at every forward by default) cannot overwrite one rank's counts with
        another's under gradient accumulation; it is not in the ``state_dict``, follows the
        weight's device and is zero after ``to_empty``.

    Attributes:
        score_recorder: ``None``, or a callable ``(scores_TE, bias_E, mask_T)`` that a score-based
            bias rule sets (Quantile Balancing, :class:`moebalance.rules.ScoreRecorder`); called
            with the detached scores when and only when the load is counted (training mode, not
            in a recomputation).
        bias_frozen: when True, :class:`~moebalance.balancing.LossFreeBalancer` leaves this
            router's bias unchanged (per-router freezing, as Megatron-LM's ``frozen_expert_bias``).

    Meta-device initialisation works: build under ``torch.device("meta")``, then
    ``to_empty(device=...)`` gives a zero ``expert_bias`` (one for multiplicative mode) and zero
    counts; ``load_state_dict`` then reads a saved bias.

    Precision: logits, scores, gates and the top-K choice are computed in float32 whatever the
    input dtype (bf16 and float16 are widened; float64 is narrowed, so a float64 ``gradcheck``
    of the router needs float32 tolerances).

    Raises:
        ValueError: for a field outside its range (the message names it).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        score_func: ScoreFunc = "sigmoid",
        norm_topk_prob: bool = False,
        route_scale: float = 1.0,
        bias_mode: BiasMode = "additive",
        n_group: int = 1,
        topk_group: int = 1,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_bool("norm_topk_prob", norm_topk_prob)
        check_routing_args(num_experts, top_k, score_func, route_scale, bias_mode, n_group, topk_group)
        if norm_topk_prob and top_k == 1 and type(self)._normalises_top1:
            raise ValueError(
                "norm_topk_prob=True with top_k=1 makes every gate 1 (times route_scale), so the "
                "router gets no gradient from the loss; set norm_topk_prob=False for top-1 routing"
            )
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.route_scale = route_scale
        self.bias_mode = bias_mode
        self.n_group = n_group
        self.topk_group = topk_group
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # expert centroids e_i
        init_bias = 1.0 if bias_mode == "multiplicative" else 0.0
        self.register_buffer("expert_bias", torch.full((num_experts,), init_bias), persistent=True)
        self.load_counts = torch.zeros(num_experts)  # per-rank: deliberately not a buffer
        self.score_recorder = None  # set by a score-based bias rule (moebalance.rules.ScoreRecorder)
        self.bias_frozen = False  # True: bias updates leave this router's bias as it is
        self.reset_parameters()

    #: ``norm_topk_prob`` with ``top_k=1`` is refused (token choice); expert choice normalises
    #: over the experts that took a token, which is not constant.
    _normalises_top1 = True

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.d_model**-0.5)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep the balancing state float32 through dtype casts; follow the weight's device.
        init = 1.0 if self.bias_mode == "multiplicative" else 0.0
        bias = self._buffers.pop("expert_bias")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["expert_bias"] = float32_state_after_apply(bias, fn, self.weight.device, init)
            self.load_counts = float32_state_after_apply(self.load_counts, fn, self.weight.device, 0.0)
        return self

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """Route tokens.

        Args:
            x: ``[T, D]`` or ``[B, S, D]`` token representations ``u_t``.
            mask: optional bool of ``x``'s shape without ``D`` (``[T]`` or ``[B, S]``), ``False``
                for padding tokens.

        Returns:
            :class:`RouterOutput` over the ``T = B*S`` flattened tokens. A token whose scores are
            not finite (a NaN or inf input) is routed, but counts for no load
            (``tokens_per_expert``, ``load_counts``): the Loss-Free bias must not move on it.

        Raises:
            ValueError: ``x`` not a real floating-point ``[T, D]`` / ``[B, S, D]`` tensor with
                ``D = d_model``, or ``mask`` not of shape ``x.shape[:-1]`` (``[B, S]`` for
                ``[B, S, D]``: an ``[S, B]`` mask is refused) or not bool (or integer 0/1).
        """
        seq_len, x_TD, flat_mask = self._check_input(x, mask)
        # Router math in float32, also under bf16 autocast: top-K on bf16 scores ties easily.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            if self.score_func == "sigmoid":
                scores_TE = torch.sigmoid(logits_TE)
            else:
                scores_TE = torch.softmax(logits_TE, dim=-1)
            indices_TK = route_topk(
                scores_TE.detach(),
                self.top_k,
                self.expert_bias,
                bias_mode=self.bias_mode,
                n_group=self.n_group,
                topk_group=self.topk_group,
            )
            gates_TK = scores_TE.gather(1, indices_TK)  # unbiased: b_i never enters g_{i,t}
            if self.norm_topk_prob and self.top_k > 1:
                gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
            if self.route_scale != 1.0:
                gates_TK = gates_TK * self.route_scale
        with torch.no_grad():
            counted_T = _finite_tokens(scores_TE, flat_mask)
            tokens_per_expert = count_tokens_per_expert(indices_TK, self.num_experts, counted_T)
        if self._count_load(tokens_per_expert) and self.score_recorder is not None:
            with torch.no_grad():  # the tokens the load counts: real, finite scores
                self.score_recorder(scores_TE.detach(), self.expert_bias, counted_T)
        return RouterOutput(
            gates=gates_TK,
            indices=indices_TK,
            scores=scores_TE,
            logits=logits_TE,
            tokens_per_expert=tokens_per_expert,
            seq_len=seq_len,
            mask=flat_mask,
        )

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[int | None, torch.Tensor, torch.Tensor | None]:
        """``(seq_len, x_TD, mask_T)`` of a checked router input (see :meth:`forward`'s errors)."""
        shape_text = f"[T, d_model={self.d_model}] or [B, S, d_model={self.d_model}]"
        check_score_tensor("x (the router input)", x, (2, 3), shape_text)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x (the router input) must have shape {shape_text}, got shape {tuple(x.shape)}")
        flat_mask = check_mask("mask", mask, x.shape[:-1], "[T]" if x.dim() == 2 else "[B, S] (as x's [B, S, D])")
        return (x.shape[1] if x.dim() == 3 else None), x.reshape(-1, self.d_model), flat_mask

    def _count_load(self, tokens_per_expert: torch.Tensor) -> bool:
        """Add a forward's load to ``load_counts``: in training mode with grad enabled only (as
        Megatron-Core: a ``torch.no_grad()`` forward in training mode, an RL rollout or
        ``generate()``, trains nothing), and not during an activation-checkpoint recomputation
        (the same tokens again). ``tokens_per_expert`` carries no graph, so no ``no_grad`` here.
        Returns whether it counted."""
        if not (self.training and torch.is_grad_enabled()) or _in_backward_recompute():
            return False
        if self.load_counts.device != tokens_per_expert.device:  # moved without _apply (FSDP2)
            self.load_counts = self.load_counts.to(tokens_per_expert.device)
        self.load_counts += tokens_per_expert.to(self.load_counts.dtype)
        return True

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score_func={self.score_func}, norm_topk_prob={self.norm_topk_prob}, "
            f"route_scale={self.route_scale}, bias_mode={self.bias_mode}, "
            f"n_group={self.n_group}, topk_group={self.topk_group}"
        )


def float32_state_after_apply(state: torch.Tensor, fn, device: torch.device, init: float) -> torch.Tensor:
    """Where a float32 balancing tensor (bias, load counts) goes when its module's ``_apply(fn)``
    runs: to ``device`` (the router weight's, after ``fn``), staying float32 through dtype casts.

    A meta tensor is passed through ``fn``; when that materialises it (``to_empty``), its
    uninitialised memory is filled with ``init`` (0 for an additive bias and for counts), because
    ``to_empty`` leaves memory uninitialised and ``reset_parameters`` does not cover buffers.
    Used by :class:`TopKRouter` and by the transformers integration's patched routers.

    Args:
        state: ``[E]`` tensor. fn: the function ``Module._apply`` was given.
        device: the device of the router's weight after ``fn``. init: the value of a fresh tensor.

    Returns:
        ``[E]`` float32 tensor on ``device`` (or still on meta when ``fn`` kept it there).
    """
    if state.is_meta:
        moved = fn(state)
        if moved.is_meta:
            return moved.to(torch.float32)
        return torch.full(moved.shape, init, dtype=torch.float32, device=moved.device)
    return state.to(device=device, dtype=torch.float32)


def _finite_tokens(scores_TE: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    """``[T]`` bool: the tokens that carry load, real (``mask_T``) and with finite scores.

    A NaN or inf input gives non-finite scores, and ``topk`` still picks experts for them (NaN
    ranks first); counting those picks would move the Loss-Free bias on garbage.
    """
    finite_T = torch.isfinite(scores_TE).all(dim=-1)
    return finite_T if mask_T is None else finite_T & mask_T


def _in_backward_recompute() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation).

    A recomputed forward routes the same tokens a second time; counting them again would double
    the step's load. The sign update would survive the doubling, the ``error`` variant and the
    metrics would not, so the recomputation is simply not counted.
    """
    return torch._C._current_graph_task_id() != -1


def check_routing_args(
    num_experts: int,
    top_k: int,
    score_func: str,
    route_scale: float,
    bias_mode: str,
    n_group: int,
    topk_group: int,
) -> None:
    """Validate routing hyper-parameters; raise ``ValueError`` naming the field and its range."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    if not is_finite_number(route_scale) or route_scale <= 0:
        raise ValueError(f"route_scale must be a number > 0 and finite, got {route_scale!r}")
    if bias_mode not in ("additive", "multiplicative"):
        raise ValueError(f"bias_mode must be 'additive' or 'multiplicative', got {bias_mode!r}")
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"n_group must be >= 1 and divide num_experts={num_experts}, got {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if n_group > 1 and top_k > topk_group * (num_experts // n_group):
        raise ValueError(
            f"top_k={top_k} exceeds the experts left by group-limited routing "
            f"(topk_group * num_experts / n_group = {topk_group * (num_experts // n_group)})"
        )


# --- Expert Choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing") ---


@dataclass
class ExpertChoiceOutput(RouterOutput):
    """What one expert-choice routing call produced.

    Same fields as :class:`RouterOutput`, but expert-major: ``indices`` is ``[E, C]`` int64 *token*
    ids (the ``C`` tokens each expert took, best first) and ``gates`` is ``[E, C]`` float32 their
    gate values. ``tokens_per_expert`` is ``C`` for every expert. A token may be taken by any
    number of experts, including none. Use :func:`chosen_experts` for a ``[T, E]`` view.

    Attributes:
        capacity: ``C``, tokens per expert.
        num_tokens: ``T``.
    """

    capacity: int = 0
    num_tokens: int = 0
    is_expert_choice: bool = True


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert takes: ``ceil(capacity_factor * K * T / E)``, at most ``T``.

    With ``capacity_factor = 1`` expert choice does the same expert computation as top-``K``
    token choice (``E * C = K * T`` pairs). Zhou et al. 2022 §3.1 write ``k = n * c / e``.
    The rule (and its rounding and errors) is :func:`moebalance.experts.expert_capacity`'s, the
    capacity of token-choice dispatch: one rule for both.
    """
    return expert_capacity(num_tokens, top_k, num_experts, capacity_factor)


def route_expert_choice(scores_TE: torch.Tensor, capacity: int, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Each expert takes the ``capacity`` tokens of the batch with the highest scores.

    Not causal: whether expert i takes token t depends on the scores of every other token of the
    batch, later tokens of t's own sequence included (arXiv 2408.15664 §5, "future token leakage").

    Args:
        scores_TE: ``[T, E]`` scores.
        capacity: ``C``, at most the number of unmasked tokens.
        mask_T: optional ``[T]`` bool; padding tokens are never taken.

    Returns:
        ``[E, C]`` int64 token ids, best first.

    Raises:
        ValueError: ``scores_TE`` not a ``[T, E]`` real float tensor, ``capacity`` not an int in
            ``[0, T]``, or ``mask_T`` not a ``[T]`` bool tensor.
    """
    check_score_tensor("scores_TE", scores_TE)
    check_int("capacity", capacity, 0, scores_TE.shape[0])
    mask_T = check_mask("mask_T", mask_T, scores_TE.shape[:1], "[T]")
    choice_ET = scores_TE.detach().t()
    if mask_T is not None:
        choice_ET = choice_ET.masked_fill(~mask_T.reshape(1, -1), float("-inf"))
    return choice_ET.topk(capacity, dim=-1, sorted=True).indices


def chosen_experts(out: RouterOutput) -> torch.Tensor:
    """``[T, E]`` bool: which experts each token went to, for top-K and expert-choice outputs.

    Raises:
        ValueError: ``out`` is not a :class:`RouterOutput`.
    """
    if not isinstance(out, RouterOutput):
        raise ValueError(f"out must be a RouterOutput (what a router returns), got {type(out).__name__}")
    if isinstance(out, ExpertChoiceOutput):
        num_experts = out.indices.shape[0]
        chosen = torch.zeros(num_experts, out.num_tokens, dtype=torch.bool, device=out.indices.device)
        return chosen.scatter_(1, out.indices, True).t()
    chosen = torch.zeros_like(out.scores, dtype=torch.bool)
    return chosen.scatter_(1, out.indices, True)


class ExpertChoiceRouter(TopKRouter):
    """Expert Choice router (Zhou et al. 2022): each expert takes its top ``C`` tokens of the batch.

    Perfectly balanced by construction (every expert gets ``C`` tokens) but not causal, which is
    why arXiv 2408.15664 (§5, Table 1) rules it out for language modelling; ``moebalance leakage``
    measures it. It has the same parameters and buffers as :class:`TopKRouter`, so weights can be
    moved between the two; ``expert_bias`` is kept (for checkpoints) but never used.

    Args:
        d_model, num_experts, top_k, score_func, norm_topk_prob, route_scale: as
            :class:`TopKRouter`; ``top_k`` sets the capacity (:func:`expert_choice_capacity`).
            ``norm_topk_prob`` divides each token's gates by their sum over the experts that took it.
        capacity_factor: ``> 0``; 1 gives the compute of top-``K`` routing.

    Raises:
        ValueError: for a field outside its range.
    """

    _normalises_top1 = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        score_func: ScoreFunc = "sigmoid",
        norm_topk_prob: bool = False,
        route_scale: float = 1.0,
        capacity_factor: float = 1.0,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, score_func, norm_topk_prob, route_scale)
        self.capacity_factor = check_number("capacity_factor", capacity_factor, 0.0, low_open=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> ExpertChoiceOutput:
        """Route a batch.

        Args:
            x: ``[T, D]`` or ``[B, S, D]``. mask: optional ``[T]`` / ``[B, S]`` bool.

        Returns:
            :class:`ExpertChoiceOutput` (expert-major ``[E, C]`` token ids and gates).

        Raises:
            ValueError: as :meth:`TopKRouter.forward`.
        """
        seq_len, x_TD, flat_mask = self._check_input(x, mask)
        num_tokens = x_TD.shape[0]
        real_tokens = num_tokens if flat_mask is None else int(flat_mask.sum())
        capacity = expert_choice_capacity(real_tokens, self.num_experts, self.top_k, self.capacity_factor)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            scores_TE = torch.sigmoid(logits_TE) if self.score_func == "sigmoid" else torch.softmax(logits_TE, dim=-1)
            token_ids_EC = route_expert_choice(scores_TE, capacity, flat_mask)
            gates_EC = scores_TE.t().gather(1, token_ids_EC)
            if self.norm_topk_prob:
                per_token = scores_TE.new_zeros(num_tokens).index_add(0, token_ids_EC.reshape(-1), gates_EC.reshape(-1))
                gates_EC = gates_EC / (per_token[token_ids_EC] + 1e-20)
            if self.route_scale != 1.0:
                gates_EC = gates_EC * self.route_scale
        tokens_per_expert = torch.full((self.num_experts,), capacity, dtype=torch.int64, device=x.device)
        self._count_load(tokens_per_expert)
        return ExpertChoiceOutput(
            gates=gates_EC,
            indices=token_ids_EC,
            scores=scores_TE,
            logits=logits_TE,
            tokens_per_expert=tokens_per_expert,
            seq_len=seq_len,
            mask=flat_mask,
            capacity=capacity,
            num_tokens=num_tokens,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", capacity_factor={self.capacity_factor} (expert choice)"
