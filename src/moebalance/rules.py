"""Bias update rules for loss-free load balancing: the math of each rule, one place per rule.

Shape legend: L MoE layers (rows), E experts, T tokens of one micro-batch, N pooled tokens,
K experts per token, B histogram bins. ``loads_LE`` are tokens per expert of one optimizer step,
``bias_LE`` the current selection biases (routing picks the top-K of ``s + b``).

Rules (:data:`RULES`; each class cites its source):

* ``sign``: Algorithm 1 of arXiv 2408.15664, ``b += u * sign(mean - c)``.
* ``error``: the paper's ablation (§5), ``b += u * (mean - c) / mean``.
* ``smebu``: Arcee Trinity, arXiv 2602.17004 (tanh soft clamp, mean-centring, momentum).
* ``proportional``: LongCat-Flash, arXiv 2509.01322, ``b += u * (target - share)``.
* ``quantile``: Quantile Balancing (J. Su, kexue.fm/archives/11619; Megatron-LM
  ``moe_utils.qb_dual_update``; Kimi K3's global-batch histogram form), from the router's scores.

Everything here is a pure function of tensors or a small object holding a rule's own state (the
SMEBU momentum, the quantile window), so code outside :class:`~moebalance.balancing.LossFreeBalancer`
(another trainer, the ``transformers`` integration) can call it with its own loads and scores.
:class:`RateSchedule` gives the factor on the rate at a step (constant, decay, freeze after N
steps or tokens).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moebalance.checks import is_finite_number

__all__ = [
    "QB_ESTIMATORS",
    "RULES",
    "SCHEDULES",
    "BiasRule",
    "ErrorRule",
    "ProportionalRule",
    "QuantileRule",
    "RateSchedule",
    "ScoreRecorder",
    "SignRule",
    "SMEBURule",
    "bias_from_histogram",
    "bias_from_histograms",
    "bias_from_margins",
    "make_rule",
    "margin_histogram",
    "parse_target_load",
    "qb_alpha",
    "quantile_bias",
    "row_centered",
]

QB_ESTIMATORS = ("microbatch", "pooled", "histogram")
SCHEDULES = ("constant", "lr", "decay")


_number = is_finite_number  # a finite int or float, not a bool


def _check(cond: bool, name: str, allowed: str, value: object) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def row_centered(x_LE: torch.Tensor, active_L: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` minus its row mean, on the rows where ``active_L`` ([L] bool) is True (all when None).

    Centring a bias row does not change routing: the top-K of ``s + b`` equals that of ``s + b - c``.
    """
    shift = x_LE.mean(dim=-1, keepdim=True)
    if active_L is not None:
        shift = shift * active_L.reshape(shift.shape).to(shift.dtype)
    return x_LE - shift


class BiasRule:
    """A bias update from the loads of one optimizer step.

    Subclasses implement :meth:`delta`. ``needs_scores`` rules (quantile) also record the router's
    scores during the step and implement :meth:`delta_from_stats` instead.
    """

    name = "rule"
    needs_scores = False

    def delta(self, loads_LE: torch.Tensor, bias_LE: torch.Tensor | None, rate: float) -> torch.Tensor:
        """``[L, E]`` float32 change of the biases for ``loads_LE`` at rate ``rate`` (``u`` times
        the schedule's factor). Rows whose load sums to 0 (no forward since the last update) get 0."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The rule's own state (momentum, window), for checkpoints; empty for stateless rules."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s result."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _loaded(loads_LE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loads float32, row mean [L, 1], active [L, 1] bool)``."""
    loads = loads_LE.float()
    mean = loads.mean(dim=-1, keepdim=True)
    return loads, mean, mean > 0


class SignRule(BiasRule):
    """``delta_i = u * sign(c_mean - c_i)``: Algorithm 1 of arXiv 2408.15664 (Wang et al. 2024)."""

    name = "sign"

    def delta(self, loads_LE, bias_LE=None, rate=1e-3):
        loads, mean, _ = _loaded(loads_LE)
        return rate * torch.sign(mean - loads)


class ErrorRule(BiasRule):
    """``delta_i = u * (c_mean - c_i) / c_mean``: the raw-error ablation of arXiv 2408.15664 §5,
    divided by the mean load so that ``u`` does not depend on the batch size."""

    name = "error"

    def delta(self, loads_LE, bias_LE=None, rate=1e-3):
        loads, mean, _ = _loaded(loads_LE)
        return rate * (mean - loads) / mean.clamp_min(1e-12)


class SMEBURule(BiasRule):
    """Soft-clamped Momentum Expert Bias Updates (Arcee Trinity Large, arXiv 2602.17004).

    With ``v_i = (c_mean - c_i) / c_mean`` (normalised deviation)::

        d_i = u * (tanh(kappa * v_i) - mean_j tanh(kappa * v_j))    soft clamp, mean-centred
        m_i <- beta * m_i + (1 - beta) * d_i                          momentum
        delta_i = m_i

    The sign rule is its limit ``kappa -> inf``, ``beta = 0`` (up to the centring). A rate of 0
    (a frozen schedule) moves nothing and keeps ``m``. The report's
    constants were not in our sources; ``kappa = 2``, ``beta = 0.5`` are our defaults.

    Args:
        kappa: slope of the soft clamp, a number > 0.
        momentum: ``beta`` in ``[0, 1)``.

    Raises:
        ValueError: ``kappa`` or ``momentum`` out of range, or (in :meth:`delta`) loads of another
            shape than the momentum already held.
    """

    name = "smebu"

    def __init__(self, kappa: float = 2.0, momentum: float = 0.5) -> None:
        _check(_number(kappa) and kappa > 0, "smebu kappa", "a number > 0", kappa)
        _check(_number(momentum) and 0 <= momentum < 1, "smebu momentum", "a number in [0, 1)", momentum)
        self.kappa = float(kappa)
        self.momentum = float(momentum)
        self.momentum_LE: torch.Tensor | None = None

    def delta(self, loads_LE, bias_LE=None, rate=1e-3):
        loads, mean, active = _loaded(loads_LE)
        if rate == 0:  # frozen (schedule at 0): no move, and the momentum is kept for later
            return torch.zeros_like(loads)
        clamped = torch.tanh(self.kappa * (mean - loads) / mean.clamp_min(1e-12))
        step = rate * (clamped - clamped.mean(dim=-1, keepdim=True)) * active
        if self.momentum_LE is None:
            self.momentum_LE = torch.zeros_like(step)
        if self.momentum_LE.shape != step.shape:
            raise ValueError(f"smebu: loads of shape {tuple(step.shape)}, momentum held for {tuple(self.momentum_LE.shape)}")
        m = self.momentum_LE.to(step.device)
        m = torch.where(active, self.momentum * m + (1 - self.momentum) * step, m)
        self.momentum_LE = m
        return m * active

    def state_dict(self):
        return {"momentum": None if self.momentum_LE is None else self.momentum_LE.detach().cpu().clone()}

    def load_state_dict(self, state):
        self.momentum_LE = None if state.get("momentum") is None else state["momentum"].clone()

    def __repr__(self):
        return f"SMEBURule(kappa={self.kappa}, momentum={self.momentum})"


def parse_target_load(text: str | Sequence[float] | None, num_experts: int | None = None) -> torch.Tensor | None:
    """A target share per expert from ``"w0,w1,..."`` or a sequence of weights, normalised to sum to 1.

    Raises:
        ValueError: a weight that is not a finite number >= 0, all weights 0, or (with
            ``num_experts``) another count than ``num_experts``.
    """
    if text is None or (isinstance(text, str) and text.strip() == ""):
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        weights = [float(w) for w in items]
    except (TypeError, ValueError):
        raise ValueError(f"target_load must be comma-separated numbers >= 0, got {text!r}") from None
    _check(all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0, "target_load", "finite weights >= 0, not all 0", text)
    if num_experts is not None:
        _check(len(weights) == num_experts, "target_load", f"{num_experts} weights (one per expert)", text)
    total = sum(weights)
    return torch.tensor([w / total for w in weights], dtype=torch.float32)


class ProportionalRule(BiasRule):
    """``delta_i = u * (target_i - share_i)``, ``share_i = c_i / sum_j c_j``: the proportional bias
    update of LongCat-Flash (arXiv 2509.01322 §2; there with a target below ``1/E`` for the FFN
    experts when zero-computation experts share the top-K). Also the dual ascent step with a
    constant step size of Han & Zhong (arXiv 2512.03915).

    Args:
        target_load: ``[E]`` shares (any non-negative weights; normalised to sum to 1), or
            ``None`` for the uniform ``1/E``.

    Raises:
        ValueError: a bad ``target_load``; in :meth:`delta`, loads with another ``E``.
    """

    name = "proportional"

    def __init__(self, target_load: str | Sequence[float] | None = None) -> None:
        self.target_E = parse_target_load(target_load)

    def delta(self, loads_LE, bias_LE=None, rate=1e-3):
        loads, mean, active = _loaded(loads_LE)
        share = loads / (loads.sum(dim=-1, keepdim=True)).clamp_min(1e-12)
        num_experts = loads.shape[-1]
        if self.target_E is None:
            target = torch.full_like(share, 1.0 / num_experts)
        else:
            _check(self.target_E.numel() == num_experts, "target_load", f"{num_experts} weights (the loads' E)", self.target_E.tolist())
            target = self.target_E.to(share.device).expand_as(share)
        return rate * (target - share) * active

    def __repr__(self):
        return f"ProportionalRule(target_load={None if self.target_E is None else self.target_E.tolist()})"


# --- Quantile Balancing --------------------------------------------------------------------------


def qb_alpha(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[T]`` token thresholds ``alpha_t``: the (K+1)-th largest of ``s_t + b`` (the token dual of
    Quantile Balancing; Megatron-LM ``qb_dual_update`` with ``b = -beta``)."""
    return (scores_TE + bias_E).topk(top_k + 1, dim=-1).values[:, -1]


def _capacity(num_tokens: int, top_k: int, num_experts: int) -> int:
    """``C = T * K / E``; raises ``ValueError`` unless it is an integer below ``T``."""
    if (num_tokens * top_k) % num_experts != 0:
        raise ValueError(
            f"quantile balancing needs tokens * top_k divisible by num_experts (Megatron-LM's guard): "
            f"{num_tokens} tokens * top_k={top_k} is not a multiple of num_experts={num_experts}"
        )
    if top_k >= num_experts:
        raise ValueError(f"quantile balancing needs top_k < num_experts, got top_k={top_k}, num_experts={num_experts}")
    return num_tokens * top_k // num_experts


def bias_from_margins(margins_NE: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[E]`` expert duals: ``b_j = -[(C+1)-th largest over tokens of m_tj]``, ``C = N*K/E``.

    With ``m_tj = s_tj - alpha_t`` exactly ``C`` tokens then have ``s_tj + b_j > alpha_t`` (no ties).

    Raises:
        ValueError: ``N * K`` not divisible by ``E``, or ``K >= E``.
    """
    num_tokens, num_experts = margins_NE.shape
    capacity = _capacity(num_tokens, top_k, num_experts)
    # Along the last dimension of a contiguous [E, N] copy: ~30% faster on CPU than along dim 0.
    return -margins_NE.t().contiguous().kthvalue(num_tokens - capacity, dim=-1).values


def quantile_bias(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """One Quantile Balancing step on a batch of scores (not centred, no EMA).

    ``alpha_t`` = (K+1)-th largest of ``s_t + b``; ``b_j`` = -[(C+1)-th largest over tokens of
    ``s_tj - alpha_t``], ``C = T*K/E``. Source: J. Su, kexue.fm/archives/11619 (the dual of the
    assignment LP: each token K experts, each expert C tokens); Megatron-LM ``qb_dual_update``
    (which routes on ``s - beta``: ``beta = -b``).

    Args:
        scores_TE: ``[T, E]`` router scores of real tokens. bias_E: ``[E]`` current bias.
        top_k: ``K``.

    Returns:
        ``[E]`` float32 new bias.
    """
    scores = scores_TE.float()
    return bias_from_margins(scores - qb_alpha(scores, bias_E.float(), top_k)[:, None], top_k)


def histogram_range(bias_E: torch.Tensor) -> tuple[float, float]:
    """``(lo, hi)`` of the margin histogram for scores in ``[0, 1]``: ``s - alpha`` lies in
    ``[-1 - max(b), 1 - min(b)]``. The same on every rank and micro-batch of a step (the bias only
    changes between steps); margins outside (scores not in [0, 1]) go to the end bins."""
    return -1.0 - float(bias_E.max()), 1.0 - float(bias_E.min())


def margin_histogram(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, bins: int) -> torch.Tensor:
    """``[E, B]`` float32 counts of the margins ``s_tj - alpha_t`` in ``bins`` equal bins over
    :func:`histogram_range` (Kimi K3's global-batch estimator; torchtitan's
    ``QuantileBalancedTopKRouter``, Megatron-LM ``--moe-router-qb-num-bins``)."""
    scores = scores_TE.float()
    lo, hi = histogram_range(bias_E)
    margins = scores - qb_alpha(scores, bias_E.float(), top_k)[:, None]
    idx = ((margins - lo) * (bins / (hi - lo))).floor().clamp_(0, bins - 1).long()
    num_experts = scores.shape[1]
    flat = idx + torch.arange(num_experts, device=idx.device) * bins
    return torch.bincount(flat.reshape(-1), minlength=num_experts * bins).float().view(num_experts, bins)


def _range_of(bias_LE: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo [L, 1], hi [L, 1])`` of :func:`histogram_range` for every layer."""
    return -1.0 - bias_LE.amax(-1, keepdim=True).to(dtype), 1.0 - bias_LE.amin(-1, keepdim=True).to(dtype)


def _above_edges(counts_LEB: torch.Tensor) -> torch.Tensor:
    """``[L, E, B+1]`` margins above each bin edge (edge 0 = lo: all of them; edge B = hi: none)."""
    cum = counts_LEB.cumsum(-1)
    return torch.cat([cum[..., -1:], cum[..., -1:] - cum], dim=-1)


def _above_at(counts_LEB: torch.Tensor, lo_L1: torch.Tensor, hi_L1: torch.Tensor, points_LJ: torch.Tensor) -> torch.Tensor:
    """``[L, E, J]`` margins above each of ``points_LJ`` in histograms binned over ``[lo, hi]``,
    linear within a bin (a histogram of another step, whose bias set other edges)."""
    bins = counts_LEB.shape[-1]
    above = _above_edges(counts_LEB)
    pos = ((points_LJ - lo_L1) * (bins / (hi_L1 - lo_L1))).clamp(0, bins)
    k = pos.floor().clamp(max=bins - 1)
    frac = (pos - k)[:, None, :]
    k = k.long()[:, None, :].expand(-1, counts_LEB.shape[1], -1)
    a0, a1 = above.gather(2, k), above.gather(2, k + 1)
    return a0 + (a1 - a0) * frac


def bias_from_histograms(entries, bias_LE: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[L, E]`` expert duals from margin histograms of one or more steps: ``b_j = -v_j`` with
    ``v_j`` the point above which ``C + 1`` margins lie (``C = N*K/E``, ``N`` every token of every
    histogram), linear within a bin: the (C+1)-th largest margin to within about a bin width, the
    histogram form of :func:`bias_from_margins`.

    Args:
        entries: ``(counts [L, E, B], tokens [L], lo [L, 1], hi [L, 1])`` per step, each binned over
            its own :func:`histogram_range`; histograms of other steps are read at the current
            edges (linear within their bins).
        bias_LE: the current biases: they set the edges the quantile is read on. top_k: ``K``.
    """
    counts0 = entries[-1][0]
    num_layers, num_experts, bins = counts0.shape
    lo, hi = _range_of(bias_LE, counts0.dtype)
    points = lo + (hi - lo) / bins * torch.arange(bins + 1, dtype=counts0.dtype, device=counts0.device)
    above, tokens = 0, 0
    for counts, tok, e_lo, e_hi in entries:
        same = torch.equal(e_lo, lo) and torch.equal(e_hi, hi)
        above = above + (_above_edges(counts) if same else _above_at(counts, e_lo, e_hi, points))
        tokens = tokens + tok
    capacity = [_capacity(int(round(t)), top_k, num_experts) + 1 for t in tokens.tolist()]  # the (C+1)-th largest
    target = torch.tensor(capacity, dtype=counts0.dtype, device=counts0.device)[:, None]
    j = ((above >= target[..., None]).sum(-1) - 1).clamp_(0, bins - 1)  # [L, E]: last edge with enough above
    a0, a1 = above.gather(2, j[..., None]).squeeze(2), above.gather(2, j[..., None] + 1).squeeze(2)
    frac = ((a0 - target) / (a0 - a1).clamp_min(1e-12)).clamp(0, 1)
    return -(lo + (j.to(counts0.dtype) + frac) * (hi - lo) / bins)


def bias_from_histogram(counts_LEB: torch.Tensor, tokens_L: torch.Tensor, bias_LE: torch.Tensor, top_k: int) -> torch.Tensor:
    """:func:`bias_from_histograms` of one step's ``[L, E, B]`` histograms, ``[L]`` tokens, binned
    with ``bias_LE``."""
    lo, hi = _range_of(bias_LE, counts_LEB.dtype)
    return bias_from_histograms([(counts_LEB, tokens_L, lo, hi)], bias_LE, top_k)


class ScoreRecorder:
    """What a router records for Quantile Balancing during a step: one object per router, set as
    its ``score_recorder``; the router calls it under ``no_grad`` in training mode only (not in
    evaluation, not in an activation-checkpoint recomputation), as it counts loads.

    Args:
        estimator: ``"microbatch"`` (sum of per-micro-batch biases and their number, ``[E + 1]``),
            ``"histogram"`` (margin counts and tokens, ``[E * B + 1]``) or ``"pooled"`` (the
            scores, ``[N, E]``).
        top_k: ``K`` of the router. bins: ``B`` (histogram only).
    """

    def __init__(self, estimator: str, top_k: int, bins: int = 1000) -> None:
        _check(estimator in QB_ESTIMATORS, "qb_estimator", f"one of {list(QB_ESTIMATORS)}", estimator)
        self.estimator, self.top_k, self.bins = estimator, top_k, bins
        self.stat: torch.Tensor | None = None
        self.pooled: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, scores_TE: torch.Tensor, bias_E: torch.Tensor, mask_T: torch.Tensor | None = None) -> None:
        """Record one forward's ``[T, E]`` scores (masked tokens dropped) routed with bias ``[E]``.

        A forward with no token left (all masked: padding, non-finite scores) records nothing: it
        gives no estimate and does not count in the mean over micro-batches. Raises nothing for it.
        """
        scores = scores_TE.detach().float()
        if mask_T is not None:
            scores = scores[mask_T.reshape(-1).to(device=scores.device, dtype=torch.bool)]
        if scores.shape[0] == 0:
            return
        if self.estimator == "pooled":
            _capacity(scores.shape[0], self.top_k, scores.shape[1])
            self.pooled.append(scores.clone())
            return
        if self.estimator == "microbatch":
            stat = torch.cat([quantile_bias(scores, bias_E, self.top_k), scores.new_ones(1)])
        else:
            _capacity(scores.shape[0], self.top_k, scores.shape[1])
            hist = margin_histogram(scores, bias_E, self.top_k, self.bins).reshape(-1)
            stat = torch.cat([hist, scores.new_full((1,), scores.shape[0])])
        self.stat = stat if self.stat is None else self.stat + stat

    def clear(self) -> None:
        """Forget what was recorded since the last :meth:`pop` (a skipped step, forwards before training)."""
        self.stat, self.pooled = None, []

    def pop(self, num_experts: int, device: torch.device) -> torch.Tensor:
        """The step's record, cleared: ``[E+1]`` / ``[E*B+1]`` (zeros when nothing was recorded) or
        ``[N, E]`` pooled scores (``[0, E]`` when none)."""
        if self.estimator == "pooled":
            out = torch.cat(self.pooled) if self.pooled else torch.zeros(0, num_experts, device=device)
            self.pooled = []
            return out
        size = num_experts + 1 if self.estimator == "microbatch" else num_experts * self.bins + 1
        out = self.stat if self.stat is not None else torch.zeros(size, device=device)
        self.stat = None
        return out


class QuantileRule(BiasRule):
    """Quantile Balancing: the bias from a quantile of the scores, no rate to tune.

    Per micro-batch (:func:`quantile_bias`): ``alpha_t`` = (K+1)-th largest of ``s_t + b``;
    ``b_j = -[(C+1)-th largest over tokens of (s_tj - alpha_t)]``, ``C = T*K/E``. At the step's
    end the estimate ``b_est`` is mean-centred and blended, ``b <- ema*b + (1-ema)*b_est``, then
    the row is mean-centred again (Megatron-LM, ``--moe-router-load-balancing-type
    quantile_balancing --moe-router-quantile-balancing-ema``; J. Su, kexue.fm/archives/11619).

    Estimators of ``b_est`` (``estimator``):

    * ``microbatch``: Megatron-LM's: the mean of the per-micro-batch biases over the step's
      micro-batches and data-parallel ranks (one all-reduce of ``[L, E+1]``), and over the last
      ``window`` steps.
    * ``histogram``: Kimi K3 / torchtitan / Megatron-LM ``estimation-scope global_batch``: the
      margins ``s_tj - alpha_t`` of the whole global batch in ``bins`` bins per expert, summed over
      micro-batches and ranks (one all-reduce of ``[L, E*B+1]``), then the quantile from the
      histogram (:func:`bias_from_histograms`), with the histograms of the last ``window`` steps
      read at the current edges (their margins were measured against the bias of their step).
    * ``pooled``: the exact quantile over the pooled scores of the step (all micro-batches, all
      ranks: gathered over ``torch.distributed``'s default group) and of the last ``window``
      steps, with ``alpha`` recomputed from the current bias (the estimator of issue 21's
      frozen-weight measurements).

    ``rate`` (``u`` times the schedule) multiplies the step towards the blended bias; the trainer's
    ``u`` is ignored (QB has none) and only the schedule's factor enters: 0 freezes the bias.

    Args:
        estimator: one of :data:`QB_ESTIMATORS`. ema: in ``[0, 1)``; 0 replaces the bias.
        window: steps pooled, ``>= 1``. bins: histogram bins, in ``[2, 100000]``.

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    name = "quantile"
    needs_scores = True

    def __init__(self, estimator: str = "microbatch", ema: float = 0.0, window: int = 1, bins: int = 1000) -> None:
        _check(estimator in QB_ESTIMATORS, "qb_estimator", f"one of {list(QB_ESTIMATORS)}", estimator)
        _check(_number(ema) and 0 <= ema < 1, "qb_ema", "a number in [0, 1)", ema)
        _check(isinstance(window, int) and not isinstance(window, bool) and 1 <= window <= 100000, "qb_window", "an integer in [1, 100000]", window)
        _check(isinstance(bins, int) and not isinstance(bins, bool) and 2 <= bins <= 100000, "qb_bins", "an integer in [2, 100000]", bins)
        self.estimator, self.ema, self.window, self.bins = estimator, float(ema), window, bins
        self.history: deque[torch.Tensor] = deque(maxlen=window)

    def recorder(self, top_k: int) -> ScoreRecorder:
        """A fresh :class:`ScoreRecorder` for a router with ``top_k``."""
        return ScoreRecorder(self.estimator, top_k, self.bins)

    def delta(self, loads_LE, bias_LE=None, rate=1e-3):
        raise ValueError("the quantile rule needs the routers' scores, not only loads: use LossFreeBalancer.step(model) or QuantileRule.delta_from_stats")

    def estimate(self, stats, bias_LE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b_est [L, E], active [L] bool)`` from one step's reduced record.

        Args:
            stats: ``[L, E+1]`` (microbatch), ``[L, E*B+1]`` (histogram) or ``[L, N, E]`` (pooled),
                summed / gathered over micro-batches and ranks; this call adds it to the window.
            bias_LE: current biases. top_k: ``K``.
        """
        if self.estimator == "pooled" and stats.shape[1] == 0:
            return torch.zeros_like(bias_LE), torch.zeros(bias_LE.shape[0], dtype=torch.bool)
        self.history.append(stats.detach().clone())
        if self.estimator == "pooled":
            pooled = torch.cat(list(self.history), dim=1)
            rows = [quantile_bias(s, b, top_k) for s, b in zip(pooled, bias_LE)]
            return torch.stack(rows), torch.ones(bias_LE.shape[0], dtype=torch.bool)
        if self.estimator == "microbatch":
            total = torch.stack(list(self.history)).sum(0)
            count_L = total[:, -1]
            return total[:, :-1] / count_L.clamp_min(1)[:, None], count_L > 0
        return self._histogram_estimate(bias_LE, top_k)

    def _histogram_estimate(self, bias_LE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``histogram`` estimator over the window (each entry: ``[L, E*B+1]`` and its ``lo, hi``)."""
        num_layers, num_experts = bias_LE.shape
        if self.history[-1].shape[1] == num_experts * self.bins + 1:  # the step just added: store its edges
            lo, hi = _range_of(bias_LE, self.history[-1].dtype)
            self.history[-1] = torch.cat([self.history[-1], lo.to(self.history[-1].device), hi.to(self.history[-1].device)], dim=1)
        entries = [(h[:, :-3].reshape(num_layers, num_experts, self.bins), h[:, -3], h[:, -2:-1], h[:, -1:]) for h in self.history]
        active = sum(e[1] for e in entries) > 0
        est = torch.zeros_like(bias_LE)
        if bool(active.any()):
            rows = [(c[active], t[active], lo[active], hi[active]) for c, t, lo, hi in entries]
            est[active] = bias_from_histograms(rows, bias_LE[active], top_k).to(est)
        return est, active

    def delta_from_stats(self, stats, bias_LE: torch.Tensor, top_k: int, rate: float = 1.0) -> torch.Tensor:
        """``[L, E]`` change that takes ``bias_LE`` to ``centre(b + rate*(1-ema)*(centre(b_est) - b))``;
        0 on rows with no record and everywhere when ``rate == 0`` (frozen)."""
        bias = bias_LE.float()
        est, active = self.estimate(stats, bias, top_k)
        if rate == 0:
            return torch.zeros_like(bias)
        active = active.to(bias.device)
        target = row_centered(est.to(bias.device))
        blended = bias + rate * (1 - self.ema) * (target - bias)
        return (row_centered(blended) - bias) * active[:, None]

    def state_dict(self):
        return {"history": [h.cpu().clone() for h in self.history]}

    def load_state_dict(self, state):
        self.history = deque((h.clone() for h in state.get("history", [])), maxlen=self.window)

    def __repr__(self):
        return f"QuantileRule(estimator={self.estimator!r}, ema={self.ema}, window={self.window}, bins={self.bins})"


RULES: dict[str, Callable[..., BiasRule]] = {
    "sign": SignRule,
    "error": ErrorRule,
    "smebu": SMEBURule,
    "proportional": ProportionalRule,
    "quantile": QuantileRule,
}


def make_rule(name: str, **options) -> BiasRule:
    """The rule called ``name`` (:data:`RULES`) with its options (unknown options are an error).

    Raises:
        ValueError: unknown name or option, or an option out of range.
    """
    _check(name in RULES, "bias_update", f"one of {list(RULES)}", name)
    try:
        return RULES[name](**options)
    except TypeError as exc:
        raise ValueError(f"bias_update={name!r} takes no option among {sorted(options)}: {exc}") from None


@dataclass(frozen=True)
class RateSchedule:
    """The factor on the bias update rate at an optimizer step.

    ``kind``: ``"constant"`` (Algorithm 1: 1); ``"decay"``: ``1 / (1 + step / decay_steps)``, the
    decaying step of the primal-dual analysis of Loss-Free Balancing (Han & Zhong, arXiv
    2512.03915); ``"lr"``: the trainer's learning-rate ratio, passed in as ``lr_ratio``.
    ``freeze_after_steps`` / ``freeze_after_tokens`` (0: never): the factor is 0 once that many
    updates ran / tokens were trained (DeepSeek-V3 sets the rate to 0 for its last 500B tokens).

    Raises:
        ValueError: a field out of range.
    """

    kind: str = "constant"
    decay_steps: int = 1000
    freeze_after_steps: int = 0
    freeze_after_tokens: int = 0

    def __post_init__(self) -> None:
        _check(self.kind in SCHEDULES, "bias_update_schedule", f"one of {list(SCHEDULES)}", self.kind)
        for name in ("decay_steps", "freeze_after_steps", "freeze_after_tokens"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= (1 if name == "decay_steps" else 0), name, "an integer >= 1" if name == "decay_steps" else "an integer >= 0 (0: never)", value)

    def scale(self, step: int, tokens: int = 0, lr_ratio: float = 1.0) -> float:
        """Factor in ``[0, 1]`` for the update after optimizer step ``step`` (0-based), when
        ``tokens`` tokens (this step's included) have been trained."""
        if self.freeze_after_steps and step >= self.freeze_after_steps:
            return 0.0
        if self.freeze_after_tokens and tokens > self.freeze_after_tokens:
            return 0.0
        if self.kind == "decay":
            return 1.0 / (1.0 + step / self.decay_steps)
        if self.kind == "lr":
            return min(1.0, max(0.0, float(lr_ratio)))
        return 1.0
