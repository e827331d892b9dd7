"""Tiny random-init configs of the supported families (tests, examples, smoke runs; nothing downloaded)."""

from __future__ import annotations

import re
from typing import Any

TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def tiny_moe_config(
    family: str,
    vocab_size: int = 256,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    expert_hidden: int = 32,
    max_seq_len: int = 128,
    **overrides: Any,
):
    """A small random-init transformers config of one supported family, built offline.

    Args:
        family: one of ``TINY_FAMILIES``.
        vocab_size, hidden_size, num_layers, num_experts, top_k, expert_hidden, max_seq_len: sizes.
        overrides: further config fields.

    Raises:
        ValueError: unknown ``family``.
    """
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * expert_hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_seq_len,
        num_experts_per_tok=top_k,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=num_experts)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **common, num_experts=num_experts, moe_intermediate_size=expert_hidden,
            shared_expert_intermediate_size=expert_hidden,
        )
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common, num_experts=num_experts, moe_intermediate_size=expert_hidden, head_dim=hidden_size // 4
        )
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, num_experts=num_experts)
    elif family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            n_routed_experts=num_experts, moe_intermediate_size=expert_hidden, n_shared_experts=1,
            n_group=2 if num_experts % 2 == 0 else 1, topk_group=1 if num_experts % 2 == 0 else 1,
            first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )
    else:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


#: Sizes a tiny config of any family gets, for every one of these fields it has (top level and
#: sub-configs): small enough to build and run in well under a second on a CPU.
TINY_SIZES = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=8, vocab_size=256, max_position_embeddings=128, num_experts=8,
    num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, moe_k=2, top_k=2,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
    ffn_hidden_size=64, d_model=32, n_layers=2, n_heads=4, num_layers=2, depth=1, embed_dim=32, num_heads=4,
    out_hidden_size=32, d_ff=64, ffn_dim=64, expert_dim=32, moe_layer_freq=1, decoder_sparse_step=1,
    num_experts_per_token=2, num_expert_group=1, num_shared_experts=1, num_dense_layers=0,
)

#: Fields a family may leave ``None`` (derived or required later) that the tiny config sets.
TINY_UNSET = ("num_experts_per_tok", "head_dim")

#: What the generic shrinking cannot derive for a few families (fields that must agree with the
#: tiny sizes); dotted keys reach into a sub-config.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "longcat_flash": {"qk_head_dim": 16},
    "mistral4": {"qk_head_dim": 16},
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16},
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 4},
    "step3p7": {"sliding_window": 64, "text_config.sliding_window": 64},
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "gemma4": {"text_config.enable_moe_block": True, "text_config.num_experts": 8, "text_config.top_k_experts": 2,
               "text_config.moe_intermediate_size": 32},
}

#: Boolean switches that turn a family's MoE layers on.
TINY_SWITCHES = dict(is_moe=True)


def _per_layer(value: list, layers: int):
    """A per-layer list cut to ``layers`` entries. Of a list of layer kinds, the window of
    consecutive entries that holds an MoE kind (``moe``, ``sparse``, ``expert``) and the most
    different kinds (so a model whose first layers are dense keeps MoE layers, and a hybrid keeps
    an attention layer beside them); of a list of numbers, the first entries."""
    if not all(isinstance(v, str) for v in value):
        return value[:layers]
    windows = [value[i:i + layers] for i in range(len(value) - layers + 1)]
    moe = re.compile("moe|sparse|expert")
    return max(windows, key=lambda w: (any(moe.search(v) for v in w), len(set(w))))


def _shrink(config, seen: set) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    layers = getattr(config, "num_hidden_layers", None)
    for key, value in list(vars(config).items()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _shrink(value, seen)
        elif key in TINY_SIZES and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, TINY_SIZES[key])
        elif key in TINY_UNSET and value is None:
            setattr(config, key, TINY_SIZES[key])
        elif key in TINY_SWITCHES and isinstance(value, bool):
            setattr(config, key, TINY_SWITCHES[key])
        elif key == "mlp_only_layers" and isinstance(value, list):
            setattr(config, key, [])
        elif isinstance(value, list) and value and isinstance(layers, int) and len(value) == layers > 2:
            setattr(config, key, _per_layer(value, TINY_SIZES["num_hidden_layers"]))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= TINY_SIZES["vocab_size"]:
            setattr(config, key, None)


def tiny_config_for(model_type: str):
    """A tiny random-init config of any transformers model type, built offline from its defaults.

    Every size field in :data:`TINY_SIZES` that the config (or a sub-config such as
    ``text_config``) has is set to the tiny value, per-layer lists are cut to the tiny depth, token
    ids beyond the tiny vocabulary are unset, and :data:`TINY_OVERRIDES` fixes what must agree.
    Used by :mod:`.coverage` to try every MoE family of the installed transformers.

    Raises:
        ValueError: ``model_type`` is not a model type of the installed transformers.
    """
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config, set())
    for key, value in TINY_OVERRIDES.get(model_type, {}).items():
        *path, name = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    return config
