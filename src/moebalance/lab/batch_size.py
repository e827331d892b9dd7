"""The batch-size study (``moebalance sweep batch-size``): balance against tokens per step.

Every balancing method of :data:`STUDY_METHODS` (the bias rules of :mod:`moebalance.rules` and
the auxiliary-loss baselines) trains once at each of several tokens per step, all on the same
number of tokens in total (the base config's ``max_steps * tokens per step``): a step of ``T``
tokens runs ``total / T`` steps. What changes with ``T`` besides the batch: the step count, and
with it the warm-up, the evaluation and the logging intervals, all scaled to stay at the same
token counts. The learning rate is the base config's at every ``T`` (nothing is retuned: the
question is what the balancing does, and a rule that needs a retuned rate per batch size says so
in the table).

Run names: ``METHOD_tT`` (``sign_t1024``); with ``seeds > 1`` the base size also trains
``METHOD_tT_seedS`` for the next ``seeds - 1`` seeds.
"""

from __future__ import annotations

from moebalance.train.config import RunConfig

__all__ = ["DEFAULT_TOKENS_PER_STEP", "STUDY_METHODS", "base_tokens_per_step", "batch_size_runs", "check_tokens_per_step"]

#: Tokens per step of the study: from 256 (2 sequences of 128) to 20,480 (160 sequences), each a
#: divisor of the default run's 614,400 tokens (600 steps of 8 x 128).
DEFAULT_TOKENS_PER_STEP = (256, 512, 1024, 2048, 4096, 8192, 20480)

_LF = ["balance.strategy=loss_free", "balance.bias_mode=additive", "balance.bias_update_schedule=constant"]

#: The methods of the study: name -> overrides. The bias rules at their usual settings: ``sign``
#: (Algorithm 1, u = 1e-3), ``error`` (§5 ablation, same u), ``smebu`` (u = 1e-3, kappa 2, momentum
#: 0.5), ``proportional`` (u = 1.6e-2 = E * 1e-3 for 16 experts, the step of ``error``),
#: ``quantile`` (Megatron-LM's micro-batch estimator, ema 0.9) and ``quantile_pooled`` (the exact
#: quantile over the last 8 steps' scores, ema 0.9); the auxiliary-loss baselines: ``aux_loss``
#: (eq. 2, alpha 1e-3), ``global_aux_loss`` (Qiu et al., alpha 1e-3) and ``deepseek_v3`` (sign rule
#: + sequence-wise loss at 1e-4).
STUDY_METHODS = {
    "sign": _LF + ["balance.bias_update=sign", "balance.bias_update_rate=1e-3"],
    "error": _LF + ["balance.bias_update=error", "balance.bias_update_rate=1e-3"],
    "smebu": _LF + ["balance.bias_update=smebu", "balance.bias_update_rate=1e-3"],
    "proportional": _LF + ["balance.bias_update=proportional", "balance.bias_update_rate=1.6e-2"],
    "quantile": _LF + ["balance.bias_update=quantile", "balance.qb_estimator=microbatch", "balance.qb_ema=0.9", "balance.qb_window=1"],
    "quantile_pooled": _LF + ["balance.bias_update=quantile", "balance.qb_estimator=pooled", "balance.qb_ema=0.9", "balance.qb_window=8"],
    "aux_loss": ["balance.strategy=aux_loss", "balance.aux_loss_coeff=1e-3"],
    "global_aux_loss": ["balance.strategy=global_aux_loss", "balance.aux_loss_coeff=1e-3"],
    "deepseek_v3": ["balance.strategy=deepseek_v3", "balance.bias_update=sign", "balance.bias_update_rate=1e-3", "balance.seq_aux_coeff=1e-4"],
}

#: The most extra seeds the study trains at the base size (``--seeds``).
MAX_STUDY_SEEDS = 10


def base_tokens_per_step(base: RunConfig) -> int:
    """Tokens of one optimizer step of ``base``: ``batch_size * grad_accum * seq_len``."""
    t = base.train
    return t.batch_size * t.grad_accum * t.seq_len


def check_tokens_per_step(base: RunConfig, sizes) -> tuple[int, ...]:
    """``sizes`` as a sorted tuple, checked against ``base``.

    Raises:
        ValueError: an empty list, a size twice, or a size that is not a multiple of
            ``seq_len * grad_accum`` or does not divide the base run's total tokens
            (``max_steps * tokens per step``); the message names ``--tokens-per-step``.
    """
    sizes = tuple(sizes)
    t = base.train
    total = t.max_steps * base_tokens_per_step(base)
    unit = t.seq_len * t.grad_accum
    if not sizes:
        raise ValueError("--tokens-per-step needs at least one size")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--tokens-per-step names a size twice: {sizes}")
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size < unit or size % unit or total % size:
            raise ValueError(
                f"--tokens-per-step: each size must be a multiple of train.seq_len * train.grad_accum = {unit} "
                f"that divides the base run's {total} tokens (train.max_steps * tokens per step), got {size!r}"
            )
    return tuple(sorted(sizes))


def _size_overrides(base: RunConfig, size: int) -> list[str]:
    """The ``train.*`` overrides that make ``base`` a run of ``size`` tokens per step on the same
    total tokens, with warm-up, evaluation and logging at the same token counts."""
    t = base.train
    base_size = base_tokens_per_step(base)
    steps = t.max_steps * base_size // size

    def scaled(n: int) -> int:
        return max(1, min(steps, round(n * base_size / size)))

    return [
        f"train.batch_size={size // (t.seq_len * t.grad_accum)}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={min(scaled(t.warmup_steps), steps - 1) if steps > 1 else 0}",
        f"train.eval_every={scaled(t.eval_every)}",
        f"train.log_every={scaled(t.log_every)}",
    ]


def batch_size_runs(base: RunConfig, sizes=None, seeds: int = 1) -> dict[str, list[str]]:
    """The study's runs: name -> overrides on ``base`` (see the module docstring).

    Args:
        base: the shared config; its tokens per step is the base size, its ``max_steps`` times
            that the total tokens of every run.
        sizes: tokens per step (default :data:`DEFAULT_TOKENS_PER_STEP`), see
            :func:`check_tokens_per_step`.
        seeds: seeds at the base size, 1 to :data:`MAX_STUDY_SEEDS` (the extra ones:
            ``train.seed + 1``, ...); a base size not in ``sizes`` trains no extra seed.

    Raises:
        ValueError: see :func:`check_tokens_per_step`; ``seeds`` out of range.
    """
    sizes = check_tokens_per_step(base, DEFAULT_TOKENS_PER_STEP if sizes is None else sizes)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_STUDY_SEEDS:
        raise ValueError(f"--seeds must be an integer in [1, {MAX_STUDY_SEEDS}], got {seeds!r}")
    runs: dict[str, list[str]] = {}
    for method, overrides in STUDY_METHODS.items():
        for size in sizes:
            runs[f"{method}_t{size}"] = overrides + _size_overrides(base, size)
    base_size = base_tokens_per_step(base)
    if base_size in sizes:
        for method, overrides in STUDY_METHODS.items():
            for seed in range(base.train.seed + 1, base.train.seed + seeds):
                runs[f"{method}_t{base_size}_seed{seed}"] = overrides + _size_overrides(base, base_size) + [f"train.seed={seed}"]
    return runs
