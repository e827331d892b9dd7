"""Run configuration: nested, validated dataclasses, named presets and typed overrides.

Every field is checked in ``__post_init__`` (or :meth:`RunConfig.validate` for checks that span
sections); a bad value raises ``ValueError`` naming the field and the allowed range. The CLI
overrides existing keys only (``section.field=value``); an unknown key is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BalanceConfig",
    "DataConfig",
    "ModelConfig",
    "PAPER_TOKENS",
    "PAPER_WORLD_SIZE",
    "PRESETS",
    "RunConfig",
    "TrainConfig",
    "cuda_assumed",
    "apply_overrides",
    "get_preset",
    "override_keys",
    "preset_config",
    "steps_for_tokens",
    "tokens_per_step",
]

Strategy = Literal[
    "loss_free", "aux_loss", "none", "batch_aux_loss", "global_aux_loss", "importance_loss", "deepseek_v3"
]
STRATEGY_NAMES = typing.get_args(Strategy)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a config class, computed once (it is slow, and every
    construction of a section type-checks its fields)."""
    return typing.get_type_hints(cls)


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_type(value: Any, tp: Any, name: str) -> None:
    """``value`` matches the annotation ``tp`` (int, float, bool, str, Literal, Optional).

    Floats must be finite: an ``inf`` or ``nan`` rate or coefficient is never meant (nor an int
    too large for a float, where ``math.isfinite`` itself raises ``OverflowError``).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        _check(value in args, name, f"one of {list(args)}", value)
    elif tp is bool:
        _check(isinstance(value, bool), name, "a boolean", value)
    elif tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, "an integer", value)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            ok = ok and math.isfinite(value)
        except OverflowError:
            ok = False
        _check(ok, name, "a finite number", value)
    elif tp is str:
        _check(isinstance(value, str), name, "a string", value)


def _check_fields(obj: Any, section: str) -> None:
    """Type-check every field of a config section against its annotation.

    The CLI parser types its values, but ``RunConfig.from_dict`` (JSON) and direct construction do
    not; a string where a number belongs must fail here, not deep inside training.
    """
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_type(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}")


#: The normal range of float32 (smallest normal number, largest finite one): the biases, weights
#: and losses are float32, so a rate or scale outside it rounds to 0 or to infinity.
FLOAT32_TINY, FLOAT32_MAX = 2.0**-126, 3.4028234663852886e38

#: Largest standard deviation of an initial weight and largest coefficient of a balancing loss:
#: beyond them the first step's logits or loss overflow float32, every step is skipped as non-finite
#: and the run ends having trained nothing (a typo, never an experiment).
MAX_INIT_STD, MAX_LOSS_COEFF = 10.0, 1e3


@dataclass
class ModelConfig:
    """The small decoder-only MoE language model (see :mod:`moebalance.train.model`).

    ``vocab_size`` is set from the tokenizer when the data is prepared.
    """

    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    num_experts: int = 16
    top_k: int = 2
    d_expert: int = 128  # hidden size F of one routed expert
    num_shared_experts: int = 0
    first_dense_layers: int = 0  # leading layers with a dense SwiGLU instead of an MoE
    d_ff_dense: int = 512  # hidden size of the dense SwiGLU layers
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    # "topk" (token choice, eq. 1/3) or "expert_choice" (each expert takes its best tokens of the
    # batch; Zhou et al. 2022). Expert choice takes ceil(capacity * K * T / E) tokens per expert.
    routing: Literal["topk", "expert_choice"] = "topk"
    expert_choice_capacity: float = 1.0
    capacity_factor: float | None = None  # None: dropless; > 0: GShard/Switch capacity with token dropping
    drop_policy: Literal["position", "score"] = "position"  # which pairs an over-full expert keeps
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Std of the router weights (the expert centroids e_i). None: model.init_std, like every other
    # matrix; a number: that std (d_model**-0.5 gives unit-variance logits; docs/reproduction.md).
    router_init_std: float | None = None
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "num_experts", "d_expert", "d_ff_dense"):
            _check(getattr(self, name) >= 1, f"model.{name}", ">= 1", getattr(self, name))
        _check(self.d_model % self.n_heads == 0, "model.d_model", f"a multiple of n_heads={self.n_heads}", self.d_model)
        _check((self.d_model // self.n_heads) % 2 == 0, "model.d_model / n_heads", "even (rotary pairs)", self.d_model // self.n_heads)
        _check(1 <= self.top_k <= self.num_experts, "model.top_k", f"in [1, num_experts={self.num_experts}]", self.top_k)
        _check(self.num_shared_experts >= 0, "model.num_shared_experts", ">= 0", self.num_shared_experts)
        _check(0 <= self.first_dense_layers < self.n_layers, "model.first_dense_layers", f"in [0, n_layers-1={self.n_layers - 1}]", self.first_dense_layers)
        _check(self.score_func in ("sigmoid", "softmax"), "model.score_func", "'sigmoid' or 'softmax'", self.score_func)
        _check(self.route_scale > 0, "model.route_scale", "> 0", self.route_scale)
        _check(self.n_group >= 1 and self.num_experts % self.n_group == 0, "model.n_group", f">= 1 and divide num_experts={self.num_experts}", self.n_group)
        _check(1 <= self.topk_group <= self.n_group, "model.topk_group", f"in [1, n_group={self.n_group}]", self.topk_group)
        routable = self.topk_group * (self.num_experts // self.n_group)
        _check(self.top_k <= routable, "model.top_k", f"<= topk_group * num_experts / n_group = {routable} (group-limited routing)", self.top_k)
        _check(self.routing in ("topk", "expert_choice"), "model.routing", "'topk' or 'expert_choice'", self.routing)
        _check(
            not (self.norm_topk_prob and self.top_k == 1 and self.routing == "topk"),
            "model.norm_topk_prob", "false with model.top_k=1 (normalising one gate makes it 1: the router gets no gradient)",
            self.norm_topk_prob,
        )
        _check(self.expert_choice_capacity > 0, "model.expert_choice_capacity", "> 0", self.expert_choice_capacity)
        _check(self.capacity_factor is None or self.capacity_factor > 0, "model.capacity_factor", "> 0 or None (dropless)", self.capacity_factor)
        _check(self.capacity_factor is None or self.routing == "topk", "model.capacity_factor", "None with model.routing='expert_choice' (it has expert_choice_capacity)", self.capacity_factor)
        _check(self.drop_policy in ("position", "score"), "model.drop_policy", "'position' or 'score'", self.drop_policy)
        _check(self.rope_theta > 0, "model.rope_theta", "> 0", self.rope_theta)
        _check(0 < self.init_std <= MAX_INIT_STD, "model.init_std", f"in (0, {MAX_INIT_STD:g}]", self.init_std)
        _check(
            self.router_init_std is None or 0 < self.router_init_std <= MAX_INIT_STD,
            "model.router_init_std", f"in (0, {MAX_INIT_STD:g}] or None (model.init_std)", self.router_init_std,
        )  # fmt: skip


@dataclass
class BalanceConfig:
    """Which load balancing the run uses (SPEC §2-§3).

    ``strategy`` (see :data:`moebalance.balancing.STRATEGIES` and docs/balancing.md):
    ``loss_free`` (arXiv 2408.15664 Algorithm 1), ``aux_loss`` (eq. 2, sequence-wise),
    ``batch_aux_loss`` (Switch/GShard), ``global_aux_loss`` (f over the global batch),
    ``importance_loss`` (CV²), ``deepseek_v3`` (Loss-Free plus a sequence-wise loss of
    ``seq_aux_coeff``) or ``none``. ``aux_loss_coeff`` is the alpha of the auxiliary-loss
    strategies. ``z_loss_coeff`` adds the ST-MoE router z-loss on top of any strategy.
    ``aux_loss_scores``: ``normalized`` (default; DeepSeek-V3 eq. 19-20, per-token scores divided by
    their sum, as Megatron-Core and OLMo-core) or ``raw`` (scores as the gate gives them; with a
    sigmoid gate the loss can then be lowered without balancing, docs/balancing.md).
    ``bias_update`` picks the bias rule (:mod:`moebalance.rules`; docs/balancing.md, "Bias rules"),
    ``smebu_*``, ``target_load`` and ``qb_*`` are its options, ``bias_update_schedule``,
    ``bias_decay_steps`` and ``bias_freeze_after_*`` its rate schedule, ``bias_frozen_layers`` the
    MoE layers whose bias never moves.
    """

    strategy: Strategy = "loss_free"
    bias_update_rate: float = 1e-3
    # the bias rule (moebalance.rules): sign (Algorithm 1), error (§5 ablation), smebu (Arcee
    # Trinity), proportional (LongCat-Flash), quantile (Quantile Balancing; ignores the rate)
    bias_update: Literal["sign", "error", "smebu", "proportional", "quantile"] = "sign"
    bias_mode: Literal["additive", "multiplicative"] = "additive"
    bias_center: bool = False  # subtract each layer's mean bias after every update (torchtitan)
    # "constant": u every step (Algorithm 1); "lr": after warm-up, u follows the LR's decay (u * lr_t / lr);
    # "decay": u / (1 + step / bias_decay_steps) (arXiv 2512.03915)
    bias_update_schedule: Literal["constant", "lr", "decay"] = "constant"
    bias_decay_steps: int = 1000
    bias_freeze_after_steps: int = 0  # 0: never; N: no bias update after the first N steps
    bias_freeze_after_tokens: int = 0  # 0: never; N: no bias update once N tokens were trained (DeepSeek-V3)
    bias_frozen_layers: str = ""  # comma-separated MoE layer indices (0-based) whose bias never moves
    smebu_kappa: float = 2.0  # slope of SMEBU's tanh soft clamp
    smebu_momentum: float = 0.5  # SMEBU's momentum beta
    target_load: str = ""  # proportional rule: comma-separated weight per expert ("": uniform 1/E)
    qb_estimator: Literal["microbatch", "pooled", "histogram"] = "microbatch"
    qb_ema: float = 0.0  # quantile: b <- ema * b + (1 - ema) * b_new (0: replace)
    qb_window: int = 1  # quantile: steps pooled (microbatch / pooled estimators)
    qb_bins: int = 1000  # quantile: histogram bins per expert (histogram estimator)
    aux_loss_coeff: float = 1e-3
    z_loss_coeff: float = 0.0
    seq_aux_coeff: float = 1e-4
    aux_loss_scores: Literal["normalized", "raw"] = "normalized"

    def __post_init__(self) -> None:
        _check_fields(self, "balance")
        _check(self.aux_loss_scores in ("normalized", "raw"), "balance.aux_loss_scores", "'normalized' or 'raw'", self.aux_loss_scores)
        _check(self.strategy in STRATEGY_NAMES, "balance.strategy", f"one of {list(STRATEGY_NAMES)}", self.strategy)
        _check(
            FLOAT32_TINY <= self.bias_update_rate <= FLOAT32_MAX,
            "balance.bias_update_rate", f"in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}] (float32's normal range: the bias is float32)",
            self.bias_update_rate,
        )  # fmt: skip
        _check(self.bias_update in _BIAS_RULES, "balance.bias_update", f"one of {list(_BIAS_RULES)}", self.bias_update)
        _check(self.bias_update_schedule in ("constant", "lr", "decay"), "balance.bias_update_schedule", "'constant', 'lr' or 'decay'", self.bias_update_schedule)
        self._check_rule_fields()
        _check(self.bias_mode in ("additive", "multiplicative"), "balance.bias_mode", "'additive' or 'multiplicative'", self.bias_mode)
        _check(not (self.bias_center and self.bias_mode != "additive"), "balance.bias_center", "false with balance.bias_mode='multiplicative' (a product is not shift-invariant)", self.bias_center)
        for name in ("aux_loss_coeff", "z_loss_coeff", "seq_aux_coeff"):
            value = getattr(self, name)
            _check(0 <= value <= MAX_LOSS_COEFF, f"balance.{name}", f"in [0, {MAX_LOSS_COEFF:g}]", value)

    def _check_rule_fields(self) -> None:
        """The options of the bias rules and schedules (ranges of :mod:`moebalance.rules`)."""
        _check(self.bias_decay_steps >= 1, "balance.bias_decay_steps", ">= 1", self.bias_decay_steps)
        _check(self.bias_freeze_after_steps >= 0, "balance.bias_freeze_after_steps", ">= 0 (0: never)", self.bias_freeze_after_steps)
        _check(self.bias_freeze_after_tokens >= 0, "balance.bias_freeze_after_tokens", ">= 0 (0: never)", self.bias_freeze_after_tokens)
        _check(_layer_list(self.bias_frozen_layers) is not None, "balance.bias_frozen_layers", "comma-separated MoE layer indices >= 0 (e.g. '0,2'), or ''", self.bias_frozen_layers)
        _check(self.smebu_kappa > 0, "balance.smebu_kappa", "> 0", self.smebu_kappa)
        _check(0 <= self.smebu_momentum < 1, "balance.smebu_momentum", "in [0, 1)", self.smebu_momentum)
        _check(_target_weights(self.target_load) is not None, "balance.target_load", "'' (uniform) or comma-separated weights >= 0, not all 0", self.target_load)
        _check(self.qb_estimator in ("microbatch", "pooled", "histogram"), "balance.qb_estimator", "'microbatch', 'pooled' or 'histogram'", self.qb_estimator)
        _check(0 <= self.qb_ema < 1, "balance.qb_ema", "in [0, 1)", self.qb_ema)
        _check(1 <= self.qb_window <= 100000, "balance.qb_window", "in [1, 100000]", self.qb_window)
        _check(2 <= self.qb_bins <= 100000, "balance.qb_bins", "in [2, 100000]", self.qb_bins)


_BIAS_RULES = ("sign", "error", "smebu", "proportional", "quantile")


def _layer_list(text: str) -> list[int] | None:
    """MoE layer indices of ``"0,2"`` (``[]`` for ``""``), or ``None`` when malformed."""
    items = [t.strip() for t in text.split(",")] if text.strip() else []
    if not all(t.isascii() and t.isdigit() for t in items):
        return None
    return [int(t) for t in items]


def _target_weights(text: str) -> list[float] | None:
    """The weights of ``balance.target_load`` (``[]`` for ``""``), or ``None`` when malformed."""
    if not text.strip():
        return []
    try:
        weights = [float(t) for t in text.split(",")]
    except ValueError:
        return None
    ok = all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0
    return weights if ok else None


@dataclass
class DataConfig:
    """Training text. ``path=None`` is the built-in corpus (this interpreter's standard library).

    ``path`` may name a text file, a folder of text files, or a pre-tokenized ``.bin`` file / a
    folder with ``train.bin`` and ``val.bin`` (uint16, nanoGPT layout; ``bin_vocab_size`` required).

    ``val_split`` says how validation is held out (docs/data.md): ``"chunks"`` (default) holds out
    ``val_fraction`` of the corpus as chunks of ``val_chunk_tokens`` tokens drawn across the whole
    token stream from ``split_seed`` and the data fingerprint, so validation is the training
    distribution; ``"files"`` holds out whole files (a distribution shift: its MaxVio_global is
    reported as ``maxvio_global_shift``).
    """

    path: str | None = None
    vocab_size: int = 8192  # BPE vocabulary trained on the training split
    val_fraction: float = 0.05
    max_files: int = 0  # 0: every file of the corpus; > 0: the first N (tests)
    bin_vocab_size: int = 0
    cache_dir: str | None = None  # default: $MOEBALANCE_CACHE or ~/.cache/moebalance
    val_split: Literal["chunks", "files"] = "chunks"
    val_chunk_tokens: int = 512  # length of one held-out chunk (val_split="chunks")
    split_seed: int = 0  # which chunks are held out; independent of train.seed, so seeds share one validation set

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _check(self.val_split in ("chunks", "files"), "data.val_split", "'chunks' or 'files'", self.val_split)
        _check(self.val_chunk_tokens >= 16, "data.val_chunk_tokens", ">= 16", self.val_chunk_tokens)
        _check(0 <= self.split_seed < 2**63, "data.split_seed", "in [0, 2**63)", self.split_seed)
        _check(self.path is None or self.path.strip() != "", "data.path", "a non-empty path or None (built-in corpus)", self.path)
        _check(257 <= self.vocab_size <= 65535, "data.vocab_size", "in [257, 65535] (uint16 token ids)", self.vocab_size)
        _check(0 < self.val_fraction < 0.5, "data.val_fraction", "in (0, 0.5)", self.val_fraction)
        _check(self.max_files >= 0, "data.max_files", ">= 0", self.max_files)
        _check(0 <= self.bin_vocab_size <= 65536, "data.bin_vocab_size", "in [0, 65536]", self.bin_vocab_size)


#: ``train.dist_timeout_s`` range: below a second the ranks' rendezvous itself times out; above a
#: week no collective is meant to wait (and 1e300 s overflows the process group's timedelta).
MIN_DIST_TIMEOUT_S, MAX_DIST_TIMEOUT_S = 1.0, 7 * 24 * 3600.0


@dataclass
class TrainConfig:
    """Optimisation and logging. One optimizer step sees ``batch_size * grad_accum`` sequences."""

    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 600
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 150
    eval_tokens: int = 32768  # validation tokens of an intermediate evaluation (0: all); the final one reads all
    log_every: int = 10
    seed: int = 1234
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = 1  # torch intra-op threads (0: torch's default, one per core); 1 does not collapse on a busy machine (docs/benchmarks.md)
    # CPU: "reuse" keeps freed memory in the process (glibc mallopt; see moebalance.train.host),
    # "system" leaves the C library's defaults. Speed only: the numbers are the same.
    malloc: Literal["reuse", "system"] = "reuse"
    # AdamW kernels: "default" (PyTorch's choice: multi-tensor on CUDA, the per-parameter loop on
    # CPU) or "fused" (one kernel per parameter: faster, but it rounds differently, ~1e-7 a step).
    adamw_impl: Literal["default", "fused"] = "default"
    tensorboard: bool = True
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps (0: only the final one)
    keep_checkpoints: int = 3  # how many periodic checkpoints to keep
    on_nonfinite: Literal["skip", "stop"] = "skip"  # non-finite loss/logits/gradients: skip the step or stop
    # Under torchrun: shard the routed experts over all ranks (expert parallelism, see
    # moebalance.parallel.expert_parallel); model.num_experts must be a multiple of the number of ranks.
    expert_parallel: bool = False
    # seconds a collective waits for the other ranks before this rank exits with an error naming it
    dist_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check_fields(self, "train")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", ">= 1", getattr(self, name))
        _check(self.lr > 0, "train.lr", "> 0", self.lr)
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", f"in [0, lr={self.lr}]", self.min_lr)
        _check(0 <= self.warmup_steps <= self.max_steps, "train.warmup_steps", f"in [0, max_steps={self.max_steps}]", self.warmup_steps)
        _check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.beta1 < 1, "train.beta1", "in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, "train.beta2", "in [0, 1)", self.beta2)
        _check(self.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", self.grad_clip)
        _check(self.eval_tokens >= 0, "train.eval_tokens", ">= 0", self.eval_tokens)
        _check(self.dtype in ("float32", "bfloat16"), "train.dtype", "'float32' or 'bfloat16'", self.dtype)
        _check(0 <= self.threads <= 1024, "train.threads", "in [0, 1024] (0: torch's default)", self.threads)
        _check(
            MIN_DIST_TIMEOUT_S <= self.dist_timeout_s <= MAX_DIST_TIMEOUT_S,
            "train.dist_timeout_s", f"in [{MIN_DIST_TIMEOUT_S:g}, {MAX_DIST_TIMEOUT_S:g}] (seconds: 1 s to 7 days)", self.dist_timeout_s,
        )  # fmt: skip
        _check(0 <= self.seed < 2**63, "train.seed", "in [0, 2**63)", self.seed)
        _check(_is_device(self.device), "train.device", "'cpu', or 'cuda'/'cuda:N' where torch sees that GPU", self.device)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", ">= 0 (0: only the final checkpoint)", self.checkpoint_every)
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)


_ASSUME_CUDA = [False]  # set only inside cuda_assumed()


@contextlib.contextmanager
def cuda_assumed() -> Iterator[None]:
    """Inside it, configs may name CUDA devices that this machine lacks: a GPU config (the
    ``paper-*`` presets) can be built and shown (``--print-config``) where it cannot run. Only
    for inspecting a config; nothing may train from one built inside it.
    """
    before = _ASSUME_CUDA[0]
    _ASSUME_CUDA[0] = True
    try:
        yield
    finally:
        _ASSUME_CUDA[0] = before


def _is_device(name: str) -> bool:
    """A CPU, or a CUDA device that this torch build can use (anything else fails later, deep in
    torch); inside :func:`cuda_assumed`, any CUDA device."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda" and _ASSUME_CUDA[0]:
        return True
    return device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()


@dataclass
class RunConfig:
    """A whole run: model, balancing, data and training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cross-section checks (each section checks its own fields on construction)."""
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            f"<= model.max_seq_len={self.model.max_seq_len}",
            self.train.seq_len,
        )
        # Expert choice is balanced by construction; a bias or an aux loss would do nothing.
        _check(
            self.model.routing == "topk" or self.balance.strategy == "none",
            "balance.strategy",
            "'none' with model.routing='expert_choice'",
            self.balance.strategy,
        )
        self._validate_rules()

    def _validate_rules(self) -> None:
        """Bias-rule fields that depend on the model or the batch."""
        m, b, t = self.model, self.balance, self.train
        moe_layers = m.n_layers - m.first_dense_layers
        frozen = _layer_list(b.bias_frozen_layers) or []
        _check(all(i < moe_layers for i in frozen), "balance.bias_frozen_layers", f"indices in [0, {moe_layers - 1}] (the MoE layers)", b.bias_frozen_layers)
        weights = _target_weights(b.target_load) or []
        _check(not weights or len(weights) == m.num_experts, "balance.target_load", f"{m.num_experts} weights (model.num_experts)", b.target_load)
        if b.bias_update != "quantile" or b.strategy not in ("loss_free", "deepseek_v3"):
            return
        # Megatron-LM's guards for Quantile Balancing, as errors naming the field.
        _check(m.n_group == 1, "model.n_group", "1 with balance.bias_update='quantile' (no group-limited routing)", m.n_group)
        _check(b.bias_mode == "additive", "balance.bias_mode", "'additive' with balance.bias_update='quantile'", b.bias_mode)
        _check(m.top_k < m.num_experts, "model.top_k", f"< num_experts={m.num_experts} with balance.bias_update='quantile'", m.top_k)
        _check(
            b.strategy != "deepseek_v3" or b.seq_aux_coeff == 0,
            "balance.seq_aux_coeff", "0 with balance.bias_update='quantile' (aux coefficient 0, Megatron-LM's guard)", b.seq_aux_coeff,
        )
        tokens = t.batch_size * t.seq_len
        _check(
            tokens * m.top_k % m.num_experts == 0,
            "train.batch_size * train.seq_len * model.top_k",
            f"a multiple of model.num_experts={m.num_experts} with balance.bias_update='quantile' (C = T*K/E tokens per expert)",
            tokens * m.top_k,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a JSON object of sections, got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        hints = _type_hints(cls)
        return cls(**{name: _section_from_dict(hints[name], d.get(name, {}), name) for name in sections})


def _section_from_dict(section_cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"config section {prefix!r} must be an object of fields, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(f'{prefix}.{k}' for k in unknown)}")
    return section_cls(**d)


def _parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``tp`` (int, float, bool, str, Literal, Optional)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(text, inner[0], key)
    if origin is Literal:
        if text not in args:
            raise ValueError(f"{key} must be one of {list(args)}, got {text!r}")
        return text
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} must be a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {text!r}") from None
    if tp is str:
        return text
    raise ValueError(f"{key}: cannot parse values of type {tp}")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Return a copy of ``cfg`` with ``section.field=value`` overrides applied and validated.

    Raises:
        ValueError: malformed override, unknown key, unparsable or out-of-range value.
    """
    d = cfg.to_dict()
    hints = _type_hints(RunConfig)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in d:
            raise ValueError(f"unknown config key {key!r}; sections are {sorted(d)}")
        section, name = parts
        field_types = _type_hints(hints[section])
        if name not in field_types:
            raise ValueError(f"unknown config key {key!r}; {section} has {sorted(field_types)}")
        d[section][name] = _parse_value(text.strip(), field_types[name], key)
    return RunConfig.from_dict(d)


def preset_default() -> RunConfig:
    """The comparison of README and ``make demo``: two runs in about 10 minutes on 2 CPU cores.

    Loss-Free keeps Algorithm 1's ``sign`` update and the router keeps the model's init: the
    ``error`` update and the router's own ``d_model**-0.5`` init were measured and did not lower the
    final MaxVio_global (docs/reproduction.md).
    """
    return RunConfig()


def preset_smoke() -> RunConfig:
    """A few seconds of training on a slice of the corpus, for tests."""
    return RunConfig(
        model=ModelConfig(d_model=64, n_layers=2, n_heads=2, max_seq_len=64, num_experts=8, top_k=2, d_expert=64, d_ff_dense=128),
        data=DataConfig(vocab_size=512, max_files=60),
        train=TrainConfig(seq_len=64, batch_size=8, max_steps=30, warmup_steps=5, eval_every=15, eval_tokens=8192, log_every=5),
    )


#: Token budgets of arXiv 2408.15664: the 1B-parameter MoE was trained on 100B tokens, the 3B on 200B.
PAPER_TOKENS = {"paper-1b": 100_000_000_000, "paper-3b": 200_000_000_000}

#: Data-parallel ranks (GPUs of one node) whose global batch the ``paper-*`` presets' per-rank
#: ``train.batch_size * train.grad_accum`` assumes. With ``--nproc N`` a step holds ``N / 8`` of it:
#: keep the batch and the step count with ``train.grad_accum=<preset's grad_accum * 8 / N>``.
PAPER_WORLD_SIZE = 8


def tokens_per_step(train: TrainConfig, world_size: int) -> int:
    """Tokens one optimizer step trains on: ``batch_size * grad_accum * seq_len * world_size``
    (``train.batch_size`` is per rank; see :mod:`moebalance.train.loop`).

    Raises:
        ValueError: ``world_size < 1``.
    """
    _check(isinstance(world_size, int) and world_size >= 1, "world_size", "an integer >= 1", world_size)
    return train.batch_size * train.grad_accum * train.seq_len * world_size


def steps_for_tokens(tokens: int, train: TrainConfig, world_size: int) -> int:
    """The fewest optimizer steps that train on at least ``tokens`` tokens (within one step of it).

    Raises:
        ValueError: ``tokens < 1`` or ``world_size < 1``.
    """
    _check(isinstance(tokens, int) and tokens >= 1, "tokens", "an integer >= 1", tokens)
    return -(-tokens // tokens_per_step(train, world_size))


def _paper_preset(name: str, model: ModelConfig, train: dict[str, Any]) -> RunConfig:
    """A ``paper-*`` preset: the paper's balancing (sigmoid gate, Loss-Free ``sign`` rule with
    u = 1e-3, auxiliary-loss baseline alpha = 1e-3) and token budget (:data:`PAPER_TOKENS`) on
    ``model``, with ``train`` (per-rank batch for :data:`PAPER_WORLD_SIZE` ranks) and
    ``train.max_steps`` derived from the budget. Values the paper's text in our sources does not
    give (architecture, batch, sequence length, LR schedule) are ours: docs/reproduction.md,
    "Running at the paper's scale", lists each with its source.

    Raises:
        ValueError: this torch sees no CUDA GPU (the presets train in bfloat16 on ``cuda``), unless
            built inside :func:`cuda_assumed` to be shown.
    """
    if not _is_device("cuda"):
        raise ValueError(
            f"preset {name!r} needs a CUDA GPU (train.device='cuda'), but this torch sees none "
            "(--print-config shows it anyway); see docs/reproduction.md, 'Running at the paper's scale'"
        )
    shape = TrainConfig(device="cuda", dtype="bfloat16", max_steps=1, warmup_steps=0, **train)
    steps = steps_for_tokens(PAPER_TOKENS[name], shape, PAPER_WORLD_SIZE)
    t = dataclasses.replace(shape, max_steps=steps, warmup_steps=2000)  # validated again
    balance = BalanceConfig(strategy="loss_free", bias_update_rate=1e-3, bias_update="sign", aux_loss_coeff=1e-3)
    data = DataConfig(vocab_size=model.vocab_size, bin_vocab_size=model.vocab_size, val_fraction=0.001)
    return RunConfig(model=model, balance=balance, data=data, train=t)


def preset_paper_1b() -> RunConfig:
    """The paper's 1B run (arXiv 2408.15664: 1B parameters, 100B tokens, sigmoid gate, u = 1e-3,
    alpha = 1e-3) on one 8-GPU node. The architecture and batch are ours (the paper's are not in
    our sources; docs/reproduction.md marks each value): a DeepSeekMoE-style model of 1.02e9
    parameters (0.20e9 activated per token), 100B tokens in 95,368 steps of 512 x 2048 tokens.

    ``train.batch_size=8`` per rank x ``grad_accum=8`` x 8 ranks = 512 sequences a step. With
    ``--nproc N`` set ``train.grad_accum=64/N`` to keep that batch and the budget.
    """
    model = ModelConfig(
        vocab_size=32768, d_model=1024, n_layers=10, n_heads=16, max_seq_len=2048,
        num_experts=64, top_k=6, d_expert=512, num_shared_experts=2, first_dense_layers=1, d_ff_dense=2816,
    )  # fmt: skip
    train = dict(
        seq_len=2048, batch_size=8, grad_accum=8, lr=6e-4, min_lr=6e-5,
        eval_every=1000, eval_tokens=2**22, log_every=10, checkpoint_every=250, keep_checkpoints=3,
    )  # fmt: skip
    return _paper_preset("paper-1b", model, train)


def preset_paper_3b() -> RunConfig:
    """The paper's 3B run (arXiv 2408.15664: 3B parameters, 200B tokens) on one 8-GPU node, with
    our architecture and batch as for ``paper-1b``: a DeepSeekMoE-style model of 3.00e9
    parameters (0.53e9 activated per token), 200B tokens in 95,368 steps of 1024 x 2048 tokens.

    ``train.batch_size=8`` per rank x ``grad_accum=16`` x 8 ranks = 1024 sequences a step; blocks
    are recomputed in backward (``model.activation_checkpointing``) to fit 80 GB. With
    ``--nproc N`` set ``train.grad_accum=128/N`` to keep that batch and the budget.
    """
    model = ModelConfig(
        vocab_size=32768, d_model=1536, n_layers=13, n_heads=12, max_seq_len=2048,
        num_experts=64, top_k=6, d_expert=768, num_shared_experts=2, first_dense_layers=1, d_ff_dense=4096,
        activation_checkpointing=True,
    )  # fmt: skip
    train = dict(
        seq_len=2048, batch_size=8, grad_accum=16, lr=4e-4, min_lr=4e-5,
        eval_every=500, eval_tokens=2**22, log_every=10, checkpoint_every=100, keep_checkpoints=3,
    )  # fmt: skip
    return _paper_preset("paper-3b", model, train)


PRESETS = {"default": preset_default, "smoke": preset_smoke, "paper-1b": preset_paper_1b, "paper-3b": preset_paper_3b}


def get_preset(name: str) -> RunConfig:
    """A fresh :class:`RunConfig` for a named preset. Raises ``ValueError`` for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys of ``section.field=value`` overrides, in order (malformed items included as given)."""
    return [item.split("=", 1)[0].strip() for item in overrides]


def preset_config(name: str, overrides: list[str]) -> RunConfig:
    """A named preset with ``overrides`` applied; the preset's warm-up follows a shorter run.

    ``train.warmup_steps`` must not exceed ``train.max_steps``. When the overrides shorten the
    run below the *preset's* warm-up (``--preset smoke train.max_steps=2`` against its 5 warm-up
    steps) and do not set ``train.warmup_steps`` themselves, the warm-up is clamped to
    ``train.max_steps``; a warm-up set explicitly is validated as given.

    Raises:
        ValueError: unknown preset, or a bad override (see :func:`apply_overrides`).
    """
    base = get_preset(name)
    if "train.warmup_steps" in override_keys(overrides):
        return apply_overrides(base, overrides)
    warmup = base.train.warmup_steps
    base.train.warmup_steps = 0  # always valid; set back below, clamped to the run's length
    cfg = apply_overrides(base, overrides)
    return apply_overrides(cfg, [f"train.warmup_steps={min(warmup, cfg.train.max_steps)}"])


def dumps(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
