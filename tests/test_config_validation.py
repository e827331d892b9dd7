"""Config validation: every field rejects a bad value with its name and range (moebalance.train.config)."""

import dataclasses
import re
from pathlib import Path

import pytest

from moebalance.train.config import RunConfig, apply_overrides, get_preset

# One out-of-range value for every field (type errors are covered for all fields below), and the
# allowed range the message must state.
BAD = [
    ("model.vocab_size=0", ">= 1"),
    ("model.d_model=0", ">= 1"),
    ("model.d_model=65", "a multiple of n_heads"),
    ("model.n_layers=0", ">= 1"),
    ("model.n_heads=0", ">= 1"),
    ("model.max_seq_len=0", ">= 1"),
    ("model.num_experts=0", ">= 1"),
    ("model.top_k=0", "in [1, num_experts=16]"),
    ("model.top_k=17", "in [1, num_experts=16]"),
    ("model.d_expert=0", ">= 1"),
    ("model.num_shared_experts=-1", ">= 0"),
    ("model.first_dense_layers=4", "in [0, n_layers-1=3]"),
    ("model.d_ff_dense=0", ">= 1"),
    ("model.score_func=relu", "one of ['sigmoid', 'softmax']"),
    ("model.norm_topk_prob=maybe", "a boolean"),
    ("model.route_scale=0", "> 0"),
    ("model.n_group=3", "divide num_experts=16"),
    ("model.topk_group=2", "in [1, n_group=1]"),
    ("model.rope_theta=-1", "> 0"),
    ("model.tie_embeddings=2", "a boolean"),
    ("model.init_std=0", "in (0, 10]"),
    ("model.init_std=1e300", "in (0, 10]"),  # issue 22: every step non-finite, status 3 under on_nonfinite=skip
    ("model.router_init_std=0", "in (0, 10] or None (model.init_std)"),
    ("model.activation_checkpointing=sometimes", "a boolean"),
    ("balance.strategy=magic", "one of ['loss_free', 'aux_loss', 'none', 'batch_aux_loss'"),
    ("balance.seq_aux_coeff=-1", "in [0, 1000]"),
    ("model.routing=hash", "one of ['topk', 'expert_choice']"),
    ("model.expert_choice_capacity=0", "> 0"),
    ("model.capacity_factor=0", "> 0 or None (dropless)"),
    ("model.drop_policy=random", "one of ['position', 'score']"),
    ("balance.bias_update_rate=0", "float32's normal range"),
    ("balance.bias_update_rate=1e-300", "in [1.175e-38, 3.403e+38]"),  # issue 22: was exit 4 at work
    ("balance.bias_update_rate=1e300", "in [1.175e-38, 3.403e+38]"),
    ("balance.bias_update_rate=inf", "a finite number"),
    ("balance.bias_update=raw", "one of ['sign', 'error', 'smebu', 'proportional', 'quantile']"),
    ("balance.bias_decay_steps=0", ">= 1"),
    ("balance.bias_freeze_after_steps=-1", ">= 0 (0: never)"),
    ("balance.bias_freeze_after_tokens=-5", ">= 0 (0: never)"),
    ("balance.bias_frozen_layers=a", "comma-separated MoE layer indices"),
    ("balance.bias_frozen_layers=4", "indices in [0, 3] (the MoE layers)"),
    ("balance.smebu_kappa=0", "> 0"),
    ("balance.smebu_momentum=1", "in [0, 1)"),
    ("balance.target_load=1,x", "comma-separated weights >= 0"),
    ("balance.target_load=1,1", "16 weights (model.num_experts)"),
    ("balance.qb_estimator=mean", "one of ['microbatch', 'pooled', 'histogram']"),
    ("balance.qb_ema=1", "in [0, 1)"),
    ("balance.qb_window=0", "in [1, 100000]"),
    ("balance.qb_bins=1", "in [2, 100000]"),
    ("balance.bias_mode=affine", "one of ['additive', 'multiplicative']"),
    ("balance.bias_center=often", "a boolean"),
    ("balance.bias_update_schedule=cosine", "one of ['constant', 'lr', 'decay']"),
    ("balance.aux_loss_coeff=-1e-3", "in [0, 1000]"),
    ("balance.z_loss_coeff=1e308", "in [0, 1000]"),  # issue 22: every step non-finite, status 3 under skip
    ("balance.z_loss_coeff=nan", "a finite number"),
    ("data.path= ", "a non-empty path"),
    ("data.vocab_size=256", "in [257, 65535]"),
    ("data.val_fraction=0.5", "in (0, 0.5)"),
    ("data.max_files=-1", ">= 0"),
    ("data.bin_vocab_size=70000", "in [0, 65536]"),
    ("data.val_split=random", "one of ['chunks', 'files']"),
    ("data.val_chunk_tokens=8", ">= 16"),
    ("data.split_seed=-1", "in [0, 2**63)"),
    ("balance.aux_loss_scores=softmax", "one of ['normalized', 'raw']"),
    ("train.seq_len=0", ">= 1"),
    ("train.seq_len=257", "<= model.max_seq_len=256"),
    ("train.batch_size=0", ">= 1"),
    ("train.grad_accum=0", ">= 1"),
    ("train.max_steps=0", ">= 1"),
    ("train.lr=0", "> 0"),
    ("train.min_lr=1", "in [0, lr=0.0015]"),
    ("train.warmup_steps=601", "in [0, max_steps=600]"),
    ("train.weight_decay=-0.1", ">= 0"),
    ("train.beta1=1", "in [0, 1)"),
    ("train.beta2=-0.1", "in [0, 1)"),
    ("train.grad_clip=-1", ">= 0"),
    ("train.eval_every=0", ">= 1"),
    ("train.eval_tokens=-1", ">= 0"),
    ("train.log_every=0", ">= 1"),
    ("train.seed=-1", "in [0, 2**63)"),
    ("train.device=gpu7", "'cpu', or 'cuda'"),
    ("train.device=meta", "'cpu', or 'cuda'"),
    ("train.dtype=float16", "one of ['float32', 'bfloat16']"),
    ("train.threads=-1", "in [0, 1024]"),
    ("train.threads=100000", "in [0, 1024]"),
    ("train.tensorboard=perhaps", "a boolean"),
    ("train.malloc=jemalloc", "one of ['reuse', 'system']"),
    ("train.adamw_impl=foreach", "one of ['default', 'fused']"),
    ("train.checkpoint_every=-1", ">= 0"),
    ("train.keep_checkpoints=0", ">= 1"),
    ("train.on_nonfinite=ignore", "one of ['skip', 'stop']"),
    ("train.expert_parallel=maybe", "a boolean"),
    ("train.dist_timeout_s=0", "in [1, 604800] (seconds"),
    ("train.dist_timeout_s=1e-9", "in [1, 604800] (seconds"),  # issue 22: torchrun traceback
    ("train.dist_timeout_s=1e300", "in [1, 604800] (seconds"),
]


def all_keys() -> list[str]:
    cfg = RunConfig()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


@pytest.mark.parametrize("override,allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_field_and_range(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ValueError) as err:
        apply_overrides(get_preset("default"), [override])
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert allowed in msg, msg


def test_every_field_has_a_bad_value_above():
    assert set(all_keys()) - {b[0].split("=")[0] for b in BAD} == {"data.cache_dir"}  # any path is fine


@pytest.mark.parametrize("key", all_keys())
def test_every_field_rejects_a_wrong_type(key):
    section, name = key.split(".")
    d = RunConfig().to_dict()
    d[section][name] = [1]  # no field takes a list
    with pytest.raises(ValueError, match=re.escape(key)):
        RunConfig.from_dict(d)


@pytest.mark.parametrize(
    "d,match",
    [
        ({"model": {"top_k": "2"}}, r"model.top_k must be an integer, got '2'"),
        ({"train": {"max_steps": True}}, r"train.max_steps must be an integer"),
        ({"train": {"lr": float("nan")}}, r"train.lr must be a finite number"),
        ({"balance": {"bias_update_rate": 10**400}}, r"balance.bias_update_rate must be a finite number"),
        ({"modle": {}}, r"unknown config sections: \['modle'\]"),
        ({"model": {"topk": 2}}, r"unknown config keys: \['model.topk'\]"),
        ({"model": [1, 2]}, r"config section 'model' must be an object of fields, got list"),
        ([{"model": {}}], r"must be a JSON object of sections, got list"),
    ],
)
def test_from_dict_types_and_unknown_keys(d, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(d)


def test_group_limited_top_k_and_unknown_override():
    with pytest.raises(ValueError, match=r"model.top_k must be <= topk_group \* num_experts / n_group = 4"):
        apply_overrides(get_preset("default"), ["model.n_group=4", "model.topk_group=1", "model.top_k=5"])
    with pytest.raises(ValueError, match="unknown config key 'train.maxsteps'"):
        apply_overrides(get_preset("default"), ["train.maxsteps=3"])


def test_docs_table_lists_every_field():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", doc, flags=re.M))
    missing = set(all_keys()) - rows
    assert not missing, f"add rows for {sorted(missing)} to docs/config.md"
    assert not rows - set(all_keys()), f"docs/config.md lists fields that do not exist: {sorted(rows - set(all_keys()))}"
