import pytest

from moebalance.train.config import RunConfig, apply_overrides, get_preset


def test_presets_build_and_validate():
    for name in ("default", "smoke"):
        cfg = get_preset(name)
        assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed():
    cfg = apply_overrides(
        get_preset("smoke"),
        ["train.max_steps=7", "train.lr=0.01", "balance.strategy=aux_loss", "model.norm_topk_prob=false", "data.path=/x"],
    )
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.01
    assert cfg.balance.strategy == "aux_loss" and cfg.model.norm_topk_prob is False
    assert cfg.data.path == "/x"
    assert apply_overrides(cfg, ["data.path=none"]).data.path is None


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.top_k=99", "model.top_k"),
        ("model.num_experts=0", "model.num_experts"),
        ("balance.bias_update_rate=0", "balance.bias_update_rate"),
        ("balance.strategy=magic", "balance.strategy"),
        ("train.seq_len=100000", "train.seq_len"),
        ("train.lr=abc", "train.lr"),
        ("model.n_group=3", "model.n_group"),
        ("foo.bar=1", "unknown config key"),
        ("model.bogus=1", "unknown config key"),
        ("model.top_k", "section.field=value"),
        ("model.norm_topk_prob=maybe", "boolean"),
    ],
)
def test_bad_overrides_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_preset("smoke"), [override])


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
