"""A model whose config.json records Loss-Free training gets its biases back when loaded by Hub repo
id (through the local Hugging Face cache, nothing downloaded), and a loud warning naming it when
the weights hold no bias tensors (re-saved by plain transformers); biases are saved in float32."""

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from moebalance.integrations.transformers import apply_loss_free_balancing, tiny_moe_config  # noqa: E402

VOCAB = 128
LOGGER = "moebalance.integrations.transformers"
REVISION = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _trained(family: str, folder, dtype=torch.float32):
    """A tiny model with non-zero biases, saved by moebalance to ``folder``; returns its handle."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, vocab_size=VOCAB))
    handle = apply_loss_free_balancing(model)
    with torch.no_grad():
        for b in handle.bias_tensors():
            b.uniform_(-0.05, 0.05)
    model.to(dtype).save_pretrained(folder)
    return handle


def _in_hub_cache(monkeypatch, tmp_path, folder, repo="org/tiny-moe"):
    """Put ``folder`` in a local Hugging Face cache as ``repo`` (as a download would) and point
    huggingface_hub at it, offline."""
    cache = tmp_path / "hub"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    shutil.copytree(folder, root / "snapshots" / REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hub_repo_id_reads_the_biases_from_the_local_cache(tmp_path, monkeypatch, family):
    handle = _trained(family, tmp_path / "saved")
    repo = _in_hub_cache(monkeypatch, tmp_path, tmp_path / "saved")
    model = transformers.AutoModelForCausalLM.from_pretrained(repo, local_files_only=True)
    assert model.name_or_path == repo
    assert torch.equal(apply_loss_free_balancing(model).biases(), handle.biases())


def test_hub_snapshot_of_another_revision_is_not_read(tmp_path, monkeypatch, caplog):
    _trained("qwen2_moe", tmp_path / "saved")
    repo = _in_hub_cache(monkeypatch, tmp_path, tmp_path / "saved")
    model = transformers.AutoModelForCausalLM.from_pretrained(repo, local_files_only=True)
    with torch.no_grad():  # as if loaded from another revision than the one main points to
        model.model.layers[0].mlp.gate.weight.add_(1.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        handle = apply_loss_free_balancing(model)
    assert handle.biases().abs().sum() == 0 and "holds other router weights than the loaded model" in caplog.text


def _resave_plain(src, dst):
    """Load with plain transformers (no moebalance) and save again: the expert_bias keys are dropped,
    the moebalance_loss_free record in config.json is kept."""
    transformers.AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)
    assert "moebalance_loss_free" in json.loads((dst / "config.json").read_text())


def test_resaved_by_plain_transformers_warns_naming_the_model(tmp_path, caplog):
    _trained("qwen2_moe", tmp_path / "saved")
    _resave_plain(tmp_path / "saved", tmp_path / "resaved")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        handle = apply_loss_free_balancing(model)
    assert handle.biases().abs().sum() == 0
    text = caplog.text
    assert str(tmp_path / "resaved") in text and "Qwen2MoeForCausalLM" in text and "ZERO bias" in text


def test_hub_repo_without_bias_tensors_warns(tmp_path, monkeypatch, caplog):
    _trained("mixtral", tmp_path / "saved")
    _resave_plain(tmp_path / "saved", tmp_path / "resaved")
    repo = _in_hub_cache(monkeypatch, tmp_path, tmp_path / "resaved", repo="org/resaved-moe")
    model = transformers.AutoModelForCausalLM.from_pretrained(repo, local_files_only=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply_loss_free_balancing(model)
    assert "org/resaved-moe (MixtralForCausalLM)" in caplog.text and "hold no expert_bias tensors" in caplog.text


def test_no_warning_for_a_fresh_model_or_a_folder_with_its_biases(tmp_path, caplog):
    _trained("qwen2_moe", tmp_path / "saved")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        apply_loss_free_balancing(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved"))
        torch.manual_seed(0)
        apply_loss_free_balancing(
            transformers.AutoModelForCausalLM.from_config(tiny_moe_config("qwen2_moe", vocab_size=VOCAB))
        )
    assert "ZERO bias" not in caplog.text


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_biases_are_saved_in_float32_from_a_bf16_model(tmp_path, family):
    handle = _trained(family, tmp_path, dtype=torch.bfloat16)
    name = handle.routers[0]._moebalance_slot.name
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("." + name)}
        weights = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("embed_tokens.weight")}
    assert dtypes == {torch.float32} and weights == {torch.bfloat16}
    handle.save_biases(tmp_path)
    with safe_open(str(tmp_path / "moebalance_biases.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
