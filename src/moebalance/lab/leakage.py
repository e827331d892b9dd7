"""Future-token leakage of a routing rule, measured (arXiv 2408.15664 §5, Table 1).

The paper rejects Expert Choice routing, and a bias computed from the current batch, because a
token's routing then depends on *later* tokens of its sequence: information from the future leaks
into the prediction. Top-K routing with a bias learnt from past batches (Loss-Free Balancing) is
causal. This module turns the argument into a number:

    for a batch, replace only the tokens after position p of one sequence and report the fraction
    of tokens at positions <= p (of every sequence of the batch) whose chosen experts change in at
    least one MoE layer.

A causal router gives exactly 0. Shape legend: B sequences, S positions, T = B*S, E experts,
L MoE layers.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moebalance.balancing import LossFreeBalancer, rule_from_config
from moebalance.routing import chosen_experts
from moebalance.train.checkpoint import short_reason, write_json
from moebalance.train.config import RunConfig, apply_overrides, override_keys
from moebalance.train.model import MoETransformer

__all__ = [
    "CHECKPOINT_KEYS",
    "changed_fraction",
    "checkpoint_config",
    "current_batch_bias_router",
    "leakage",
    "measure_leakage",
    "model_router",
    "render_leakage_table",
]

#: A routing rule under test: ``[B, S]`` tokens -> ``[L, T, E]`` bool chosen experts.
RouteFn = Callable[[torch.Tensor], torch.Tensor]


def model_router(model: MoETransformer) -> RouteFn:
    """The routing of ``model`` in eval mode (fixed biases; no load is counted)."""

    @torch.no_grad()
    def route(tokens_BS: torch.Tensor) -> torch.Tensor:
        model.eval()
        return torch.stack([chosen_experts(r) for r in model(tokens_BS).routing])

    return route


def current_batch_bias_router(model: MoETransformer, update_rate: float, iterations: int = 8) -> RouteFn:
    """Top-K routing with a bias computed from the batch being routed (the variant §5 rules out).

    Starting from the model's (past) biases, the batch is routed ``iterations`` times; after each
    pass every layer's bias moves by one Loss-Free step ``u * sign(c_mean - c_i)`` computed from
    *this batch's* load ``c``; the batch is then routed with the resulting bias. It is what
    balancing the current batch with its own statistics amounts to. The model's biases are
    restored afterwards.

    Args:
        model: a top-K model.
        update_rate: ``u`` of each step.
        iterations: bias steps computed from the batch (>= 1).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    balancer = LossFreeBalancer(update_rate)

    @torch.no_grad()
    def route(tokens_BS: torch.Tensor) -> torch.Tensor:
        model.eval()
        routers = model.routers
        saved = [r.expert_bias.clone() for r in routers]
        try:
            for _ in range(iterations):
                loads_LE = torch.stack([r.tokens_per_expert for r in model(tokens_BS).routing]).float()
                for router, delta_E in zip(routers, balancer.bias_delta(loads_LE)):
                    router.expert_bias += delta_E
            return torch.stack([chosen_experts(r) for r in model(tokens_BS).routing])
        finally:
            for router, bias in zip(routers, saved):
                router.expert_bias.copy_(bias)

    return route


def changed_fraction(before_LTE: torch.Tensor, after_LTE: torch.Tensor, batch: int, position: int) -> tuple[float, list[float]]:
    """Fraction of tokens at positions ``<= position`` whose expert set changed.

    Args:
        before_LTE, after_LTE: ``[L, B*S, E]`` bool chosen experts.
        batch: ``B``.
        position: ``p``; positions ``0..p`` of every sequence are compared.

    Returns:
        ``(fraction changed in any layer, [fraction changed per layer])``.
    """
    num_layers, num_tokens, num_experts = before_LTE.shape
    diff_LBS = (before_LTE != after_LTE).any(-1).view(num_layers, batch, num_tokens // batch)
    past_LBS = diff_LBS[:, :, : position + 1]
    return past_LBS.any(0).float().mean().item(), past_LBS.float().mean(dim=(1, 2)).tolist()


@torch.no_grad()
def measure_leakage(
    route: RouteFn,
    tokens_BS: torch.Tensor,
    position: int,
    vocab_size: int,
    trials: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean leakage of ``route`` over ``trials`` perturbations of ``tokens_BS``.

    Trial ``i`` replaces the tokens after ``position`` of sequence ``i mod B`` with random tokens.

    Args:
        route: the routing rule (:data:`RouteFn`).
        tokens_BS: ``[B, S]`` int64 token ids.
        position: ``p`` in ``[0, S-2]``.
        vocab_size: range of the random replacement tokens.
        trials: number of perturbations averaged.
        seed: seed of the replacement tokens.

    Returns:
        ``{"fraction": float, "per_layer": [float] * L}``.

    Raises:
        ValueError: ``position`` outside ``[0, S-2]`` or ``trials < 1``.
    """
    batch, seq_len = tokens_BS.shape
    if not 0 <= position <= seq_len - 2:
        raise ValueError(f"position must be in [0, seq_len-2={seq_len - 2}], got {position}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    gen = torch.Generator().manual_seed(seed)
    before = route(tokens_BS)
    fractions, per_layer = [], []
    for trial in range(trials):
        changed = tokens_BS.clone()
        tail = seq_len - position - 1
        changed[trial % batch, position + 1 :] = torch.randint(0, vocab_size, (tail,), generator=gen)
        frac, layers = changed_fraction(before, route(changed), batch, position)
        fractions.append(frac)
        per_layer.append(layers)
    return {
        "fraction": sum(fractions) / trials,
        "per_layer": [sum(col) / trials for col in zip(*per_layer)],
    }


#: Keys that ``moebalance leakage --checkpoint`` may still set: how the measurement is taken, not
#: what was trained (model, balancing and data are the checkpoint's own, so its weights fit).
CHECKPOINT_KEYS = frozenset(
    {"train.batch_size", "train.seq_len", "train.seed", "train.threads", "train.device", "data.cache_dir"}
)


def checkpoint_config(checkpoint: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The run config saved in a training checkpoint, with measurement ``overrides`` applied.

    The model is rebuilt from this config, so a checkpoint of any model size or vocabulary loads.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an override outside :data:`CHECKPOINT_KEYS` (it would be ignored: the
            checkpoint decides it), or a file that is corrupt or not a moebalance training
            checkpoint (the message names the file).
    """
    refused = [k for k in override_keys(list(overrides)) if k not in CHECKPOINT_KEYS]
    if refused:
        raise ValueError(
            f"--checkpoint: {refused} would be ignored: model, balancing and data are the checkpoint's own; "
            f"only {sorted(CHECKPOINT_KEYS)} may be set"
        )
    return apply_overrides(_load_trained(checkpoint)[1], list(overrides))


def _load_trained(checkpoint: str | Path) -> tuple[dict[str, Any], RunConfig]:
    """``(state, saved config)`` of a verified training checkpoint (errors: :func:`checkpoint_config`)."""
    from moebalance.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and isinstance(state.get("model"), dict)):
        raise ValueError(f"checkpoint {checkpoint} is not a moebalance training checkpoint (no saved config and model)")
    try:
        return state, RunConfig.from_dict(state["config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {checkpoint}: its saved config is not a moebalance run config: {exc}") from exc


def _trained_state(cfg: RunConfig, checkpoint: str | Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The model weights of ``checkpoint``, checked against ``cfg`` (see :func:`checkpoint_config`)."""
    from moebalance.train.resume import config_differences

    state, saved = _load_trained(checkpoint)
    kept = ("model.", "balance.", "data.")
    differ = [k for k in config_differences(saved.to_dict(), cfg.to_dict()) if k.startswith(kept) and k not in CHECKPOINT_KEYS]
    if differ:
        raise ValueError(f"checkpoint {checkpoint} was trained with other {differ}; measure with checkpoint_config(checkpoint)")
    if state.get("data_fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"checkpoint {checkpoint} was trained on data with fingerprint {state['data_fingerprint']}, "
            f"but its data.path now gives {fingerprint}: the tokens would not be the ones it learnt"
        )
    return state["model"]


def _models(cfg: RunConfig, data, state, warmup_batches: int, gen: torch.Generator) -> tuple[MoETransformer, MoETransformer]:
    """The top-K model (trained weights, or the seeded initial model with ``warmup_batches``
    Loss-Free updates from past batches) and an expert-choice twin with the same parameters."""
    from moebalance.train.data import sample_batch

    torch.manual_seed(cfg.train.seed)
    topk = MoETransformer(cfg.model, cfg.balance)
    if state is not None:
        try:
            topk.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:  # a crafted or foreign checkpoint
            raise ValueError(f"the checkpoint's model weights do not fit its own config: {short_reason(exc)}") from exc
    else:  # a bias learnt from past batches only
        balancer = LossFreeBalancer(cfg.balance.bias_update_rate, rule_from_config(cfg.balance))
        balancer.prepare(topk)  # the quantile rule records the scores
        topk.train()  # with grad enabled: the routers count only training forwards (no backward needed)
        for _ in range(warmup_batches):
            topk(sample_batch(data.train, cfg.train.batch_size, cfg.train.seq_len, gen)[0])
            balancer.step(topk)
    ec_cfg = copy.deepcopy(cfg.model)
    ec_cfg.routing = "expert_choice"
    expert_choice = MoETransformer(ec_cfg)
    expert_choice.load_state_dict(topk.state_dict())  # same parameters; the bias is unused
    return topk, expert_choice


def _measure_all(
    rules: dict[str, RouteFn], tokens_BS: torch.Tensor, position: int, vocab_size: int, trials: int, seed: int, progress: bool
) -> dict[str, dict[str, Any]]:
    """:func:`measure_leakage` of every rule, with a progress bar over the routings (one per call)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(rules) * (trials + 1), desc="leakage", unit="routing", disable=not progress, leave=False) as bar:

        def counted(route: RouteFn) -> RouteFn:
            def call(x_BS: torch.Tensor) -> torch.Tensor:
                out = route(x_BS)
                bar.update(1)
                return out

            return call

        return {name: measure_leakage(counted(rule), tokens_BS, position, vocab_size, trials, seed) for name, rule in rules.items()}


def leakage(
    base: RunConfig,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    position: int | None = None,
    trials: int = 4,
    warmup_batches: int = 20,
    current_batch_rate: float = 1e-2,
    current_batch_iterations: int = 8,
    command: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure future-token leakage of three routing rules on one model and write ``leakage.json``.

    * ``expert_choice``: the same weights with :class:`~moebalance.routing.ExpertChoiceRouter`;
    * ``loss_free``: top-K with the Loss-Free bias of past batches (``warmup_batches`` training
      batches, one Algorithm 1 update after each, without weight updates; or the biases of
      ``checkpoint``);
    * ``current_batch_bias``: top-K whose bias is moved by ``current_batch_iterations`` steps of
      rate ``current_batch_rate`` computed from the current batch's own load
      (:func:`current_batch_bias_router`).

    The model is the seeded initial model of ``base`` or, with ``checkpoint``, a trained one:
    then ``base`` must be that checkpoint's config (:func:`checkpoint_config`, which rebuilds the
    model of any size or vocabulary from it). The batch is ``train.batch_size`` validation windows
    of ``train.seq_len`` tokens; ``position`` defaults to the middle of the sequence.

    ``train.threads`` caps torch's threads as in training; ``progress`` shows a bar over the
    routings measured (``3 * (trials + 1)``).

    Returns:
        the ``leakage.json`` content: ``{"expert_choice": fraction, "loss_free": fraction,
        "current_batch_bias": fraction, "per_layer": {...}, "position": p, ...}``.

    Raises:
        ValueError: bad data, a checkpoint of another model, balancing or data than ``base``,
            ``position`` outside ``[0, seq_len-2]`` or ``trials < 1``.
    """
    from moebalance.train.data import prepare_data, sample_batch

    if base.train.threads:
        torch.set_num_threads(base.train.threads)
    cfg = copy.deepcopy(base)
    batch, seq_len = cfg.train.batch_size, cfg.train.seq_len
    position = seq_len // 2 - 1 if position is None else position
    if not 0 <= position <= seq_len - 2 or trials < 1:
        raise ValueError(f"--position must be in [0, train.seq_len-2={seq_len - 2}] and --trials >= 1, got {position} and {trials}")
    data = prepare_data(cfg.data)
    state = None if checkpoint is None else _trained_state(cfg, checkpoint, data.fingerprint)
    cfg.model.vocab_size = data.vocab_size
    cfg.model.routing = "topk"
    gen = torch.Generator().manual_seed(cfg.train.seed)
    topk, expert_choice = _models(cfg, data, state, warmup_batches, gen)
    tokens_BS = sample_batch(data.val, batch, seq_len, gen)[0]
    rules = {
        "expert_choice": model_router(expert_choice),
        "loss_free": model_router(topk),
        "current_batch_bias": current_batch_bias_router(topk, current_batch_rate, current_batch_iterations),
    }
    measured = _measure_all(rules, tokens_BS, position, data.vocab_size, trials, cfg.train.seed, progress)
    result: dict[str, Any] = {name: m["fraction"] for name, m in measured.items()}
    result |= {
        "per_layer": {name: m["per_layer"] for name, m in measured.items()},
        "position": position,
        "batch_size": batch,
        "seq_len": seq_len,
        "tokens_compared": batch * (position + 1),
        "trials": trials,
        "current_batch_rate": current_batch_rate,
        "current_batch_iterations": current_batch_iterations,
        "bias_source": f"checkpoint {checkpoint}" if checkpoint else f"{warmup_batches} Loss-Free updates from past batches",
        "expert_choice_capacity": cfg.model.expert_choice_capacity,
        "command": command or " ".join(["moebalance"] + sys.argv[1:]),
        "config": cfg.to_dict(),
    }
    write_json(Path(out_dir) / "leakage.json", result)
    return result


def render_leakage_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`leakage`'s result."""
    lines = [
        f"Tokens at positions <= {result['position']} whose experts change when only later tokens of one "
        f"sequence change ({result['batch_size']} x {result['seq_len']} batch, {result['trials']} trials):",
        f"{'routing':22s} {'fraction':>9s}   per layer",
    ]
    for name in ("expert_choice", "loss_free", "current_batch_bias"):
        layers = " ".join(f"{v:.4f}" for v in result["per_layer"][name])
        lines.append(f"{name:22s} {result[name]:9.4f}   {layers}")
    return "\n".join(lines)

