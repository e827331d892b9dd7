"""Export that keeps the routing: ``moebalance verify``, mean-centred export, float32 bias files
(issue 20, item 4). Tiny random configs, offline."""

import json
import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moebalance import cli  # noqa: E402
from moebalance.integrations.transformers import (  # noqa: E402
    apply_loss_free_balancing,
    plain_probe,
    tiny_moe_config,
    verify,
)
from moebalance.metrics import expert_set_changes  # noqa: E402

VOCAB = 128

#: (family, whether plain transformers routes with the saved bias).
FAMILIES = [("deepseek_v3", True), ("mixtral", False), ("glm4_moe", True)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _tiny_config(family: str):
    """``tiny_moe_config(family)``; GLM-4.5 built here (tiny_moe_config has the five original families)."""
    try:
        return tiny_moe_config(family, vocab_size=VOCAB)
    except ValueError:
        if family != "glm4_moe":
            raise
    return transformers.Glm4MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=0, n_shared_experts=1, max_position_embeddings=128,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )


def _balanced_model(family: str):
    """A tiny model of ``family`` under moebalance."""
    config = _tiny_config(family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model, apply_loss_free_balancing(model, update_rate=0.05)


def _trained(family: str, steps: int = 5):
    """A tiny model trained ``steps`` optimizer steps with moebalance: its biases are non-zero."""
    model, handle = _balanced_model(family)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle.attach(opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert handle.biases().abs().max() > 0
    return model, handle


def _random_biases(handle, offset: float = 0.0, scale: float = 0.05, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bias in handle.bias_tensors():
            bias.copy_(offset + scale * torch.randn(bias.shape, generator=gen))


def _probe(model, handle, seed: int = 0):
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))
    return plain_probe.probe_routing(model, handle.router_names, ids)


# -- the command ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family, keeps_bias", FAMILIES)
def test_verify_compares_plain_transformers_with_moebalance(family, keeps_bias, tmp_path, capsys):
    model, handle = _trained(family)
    model.save_pretrained(tmp_path / "model")
    code = cli.main(["verify", str(tmp_path / "model"), "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["biases_nonzero"] and report["trained_record"]
    assert report["plain"]["moebalance_imported"] is False  # the plain half never saw moebalance
    assert set(report["saved_bias_dtypes"].values()) == {"F32"} and len(report["saved_bias_dtypes"]) == 2
    assert len(report["layers"]) == 2
    if keeps_bias:
        assert report["plain"]["has_bias_slot"] and report["plain"]["bias_max_abs_difference"] == 0
        assert report["overall"]["tokens_changed_any_layer"] == 0.0
        assert all(layer["tokens_changed"] == 0.0 for layer in report["layers"])
        assert "SAME routing" in out
    else:  # Mixtral has no bias slot: plain transformers drops the saved keys and routes without them
        assert not report["plain"]["has_bias_slot"]
        assert len(report["plain"]["dropped_bias_keys"]) == 2
        assert report["overall"]["tokens_changed"] > 0.05
        assert "ROUTING DIFFERS" in out and "has no bias slot" in out and "UNEXPECTED" in out


def test_verify_is_zero_when_the_saved_bias_is_zero(tmp_path):
    # A folder saved without training: both halves route alike even for a family with no slot.
    model, _ = _balanced_model("mixtral")
    model.save_pretrained(tmp_path)
    report = verify.verify_model_folder(tmp_path, batch_size=2, seq_len=16)
    assert not report["biases_nonzero"]
    assert report["overall"]["tokens_changed_any_layer"] == 0.0
    assert report["probe"]["tokens"] == 32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.write_text("x"), "is a file"),
        (lambda p: p.mkdir(), "holds no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model": {"num_experts": 8}}')), "no model_type"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), "not a readable JSON config"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "mixtral"}')), "no \\*.safetensors"),
    ],
)
def test_verify_refuses_a_folder_that_is_not_a_model(tmp_path, capsys, make, message):
    make(tmp_path / "m")
    code = cli.main(["verify", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert re.search(message, err)


def test_verify_refuses_a_model_without_moe_router_and_bad_probe_sizes(tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    assert cli.main(["verify", str(tmp_path / "llama")]) == 2
    assert "no MoE router found in LlamaForCausalLM" in capsys.readouterr().err
    model, _ = _balanced_model("mixtral")
    model.save_pretrained(tmp_path / "mx")
    for bad, message in ((["--seq-len", "1000"], "--seq-len must be in [1, 128]"), (["--batch-size", "0"], "--batch-size must be >= 1")):
        assert cli.main(["verify", str(tmp_path / "mx"), *bad]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["verify", str(tmp_path / "mx"), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_verify_refuses_a_truncated_weights_file(tmp_path, capsys):
    model, _ = _balanced_model("deepseek_v3")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert cli.main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "transformers cannot load it" in err


def test_verify_reports_a_failed_plain_process_in_one_line(tmp_path, capsys, monkeypatch):
    model, _ = _balanced_model("deepseek_v3")
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(sys, "executable", "false")  # the fresh process exits 1 and says nothing
    assert cli.main(["verify", str(tmp_path)]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and "plain transformers could not route" in err


# -- the pieces ----------------------------------------------------------------------------------


def test_bias_cast_collisions_count_merged_values():
    bias = 7.0 + 0.004 * torch.arange(16, dtype=torch.float32)  # a GLM-like bias near 7
    cast = verify.bias_cast_collisions(bias)
    assert cast["distinct_float32"] == 16
    assert cast["distinct_cast"] < 4  # bfloat16 steps by 1/32 at 7
    assert cast["colliding_experts"] >= 13
    centred = verify.bias_cast_collisions(bias - bias.mean())
    assert centred["distinct_cast"] == 16 and centred["colliding_experts"] == 0
    assert verify.bias_cast_collisions(torch.tensor([0.5, 0.5, 1.0]))["colliding_experts"] == 0  # equal already


def test_expert_index_and_probe_routing_name_what_they_cannot_read():
    weights, index = torch.rand(6, 2), torch.randint(0, 4, (6, 2))
    assert torch.equal(plain_probe.expert_index((torch.rand(6, 4), weights, index), "r"), index)
    with pytest.raises(ValueError, match="router 'layers.0.gate' returned no integer expert ids"):
        plain_probe.expert_index((torch.rand(6, 4), weights), "layers.0.gate")
    model, handle = _balanced_model("deepseek_v3")
    with pytest.raises(ValueError, match="has no module 'model.layers.9.mlp.gate'"):
        plain_probe.probe_routing(model, ["model.layers.9.mlp.gate"], torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_mean_centring_keeps_the_routing(family):
    model, handle = _balanced_model(family)
    _random_biases(handle, offset=3.0)  # far from 0, as a long-trained bias can be
    before = _probe(model, handle)
    exported = handle.export_biases(center=True)
    assert all(b.float().mean() != 0 for b in handle.bias_tensors())  # the export leaves the handle alone
    means = handle.center_biases()
    assert means.shape == (2,) and torch.allclose(means, torch.full((2,), 3.0), atol=0.1)
    after = _probe(model, handle)
    for name in before:
        assert expert_set_changes(before[name], after[name]) == (0.0, 0.0), name
    for (key, value), bias in zip(exported.items(), handle.bias_tensors()):
        assert value.dtype == torch.float32 and abs(value.mean().item()) < 1e-6
        assert torch.equal(value, bias.detach().float()), key


def test_export_refuses_a_bad_center():
    _, handle = _balanced_model("deepseek_v3")
    with pytest.raises(ValueError, match="center must be True or False"):
        handle.export_biases(center="yes")


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_biases_stay_float32_in_the_saved_files(family, tmp_path):
    model, handle = _balanced_model(family)
    _random_biases(handle, offset=7.0, scale=0.004)  # would collide in bfloat16
    model.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    dtypes = verify.saved_bias_dtypes(tmp_path, {"expert_bias", "e_score_correction_bias"})
    assert len(dtypes) == 2 and set(dtypes.values()) == {"F32"}, dtypes
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    for key, bias in zip(sorted(dtypes), handle.bias_tensors()):
        assert torch.equal(saved[key], bias.detach().float().cpu()), key  # no value rounded on the way
