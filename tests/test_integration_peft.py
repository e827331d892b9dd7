"""Loss-Free Balancing under PEFT: ``modules_to_save`` on the router in either order, the biases in
the adapter folder and back (tiny random configs, offline)."""

import pytest
import torch
from safetensors import safe_open
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from moebalance.integrations.transformers import apply_loss_free_balancing, tiny_moe_config  # noqa: E402

VOCAB = 128
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, vocab_size=VOCAB))


def _tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lora(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], **kw)


def _peft(family: str, order: str, **lora_kw):
    """(peft model, handle) with moebalance applied before or after get_peft_model."""
    model = _model(family)
    if order == "apply_first":
        handle = apply_loss_free_balancing(model)
        return peft.get_peft_model(model, _lora(**lora_kw)), handle
    peft_model = peft.get_peft_model(model, _lora(**lora_kw))
    return peft_model, apply_loss_free_balancing(peft_model)


def _gates(peft_model) -> list:
    return [layer.mlp.gate for layer in peft_model.base_model.model.model.layers]


@pytest.mark.parametrize("order", ["apply_first", "apply_after"])
@pytest.mark.parametrize("family", FAMILIES)
def test_modules_to_save_router_in_either_order(family, order):
    peft_model, handle = _peft(family, order, modules_to_save=["gate"])
    wrappers = _gates(peft_model)
    used = [w.modules_to_save["default"] for w in wrappers]
    # One router per layer, the copy the forward runs (not the frozen original, not both).
    assert handle.num_layers == 2 and all(a is b for a, b in zip(handle.routers, used))
    assert [n.rsplit(".", 4)[-4:] for n in handle.router_names] == [["layers", "0", "mlp", "gate"],
                                                                   ["layers", "1", "mlp", "gate"]]
    peft_model.train()
    x = _tokens()
    peft_model(input_ids=x)
    loads = handle.step()
    assert loads.sum(-1).tolist() == [x.numel() * 2] * 2  # tokens x K in every layer, counted once
    assert handle.metrics()["moe/maxvio_batch"] > 0  # 0.0 was the no-op of apply-first
    assert handle.biases().abs().sum() > 0  # the update moved the biases ...
    for router, bias in zip(used, handle.bias_tensors()):  # ... that the forward reads
        assert router._moebalance_slot.tensor() is bias
    with torch.no_grad():
        for bias in handle.bias_tensors():
            bias[5] = 100.0
    peft_model(input_ids=x)
    assert handle.step()[:, 5].tolist() == [x.numel()] * 2  # a large bias steers every token


def test_apply_first_copies_share_the_padding_mask_and_the_handle():
    peft_model, handle = _peft("qwen2_moe", "apply_first", modules_to_save=["gate"])
    x = _tokens()
    mask = torch.ones_like(x)
    mask[:, -4:] = 0
    peft_model.train()
    peft_model(input_ids=x, attention_mask=mask)
    assert handle.step().sum(-1).tolist() == [int(mask.sum()) * 2] * 2
    assert all(r._moebalance_handle is handle for r in handle.routers)


def test_deepcopy_of_the_whole_model_gets_its_own_handle():
    import copy

    model = _model("qwen2_moe")
    handle = apply_loss_free_balancing(model)
    twin = copy.deepcopy(model)
    twin_handle = twin.model.layers[0].mlp.gate._moebalance_handle
    assert twin_handle is not handle and twin_handle.model is twin
    assert all(a is b for a, b in zip(twin_handle.routers, [lay.mlp.gate for lay in twin.model.layers]))
    assert all(a is b for a, b in zip(handle.routers, [lay.mlp.gate for lay in model.model.layers]))


def _set_biases(handle, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in handle.bias_tensors():
            b.copy_(torch.rand(b.shape, generator=gen) * 0.1 - 0.05)


@pytest.mark.parametrize("order", ["apply_first", "apply_after"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_folder_carries_the_biases(tmp_path, family, order):
    peft_model, handle = _peft(family, order)
    if order == "apply_first":
        handle.attach(peft_model)  # the handle learns of the PeftModel wrapping its model
    _set_biases(handle)
    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "moebalance_biases.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 2
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    base = _model(family, seed=1)
    if order == "apply_first":
        fresh = apply_loss_free_balancing(base)
        peft.PeftModel.from_pretrained(base, tmp_path)
        assert fresh.load_biases(tmp_path) == 2
    else:
        reloaded = peft.PeftModel.from_pretrained(base, tmp_path)
        fresh = apply_loss_free_balancing(reloaded, load_biases_from=tmp_path)
    assert torch.equal(fresh.biases(), handle.biases())


def test_modules_to_save_adapter_reload_keeps_the_copies_biases(tmp_path):
    peft_model, handle = _peft("mixtral", "apply_first", modules_to_save=["gate"])
    handle.attach(peft_model)
    _set_biases(handle)
    peft_model.save_pretrained(tmp_path)
    base = _model("mixtral", seed=1)
    fresh = apply_loss_free_balancing(base)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path)
    # PEFT itself loads the copies' state (the bias buffer is in it); the handle follows the copies.
    assert fresh.num_layers == 2 and torch.equal(fresh.biases(), handle.biases())
    assert all(a is b for a, b in zip(fresh.routers, [w.modules_to_save["default"] for w in _gates(reloaded)]))


def test_save_biases_without_attach(tmp_path):
    peft_model, handle = _peft("qwen2_moe", "apply_first")
    _set_biases(handle)
    peft_model.save_pretrained(tmp_path)
    assert not (tmp_path / "moebalance_biases.safetensors").exists()  # the handle never saw the PeftModel
    handle.save_biases(tmp_path)
    fresh = apply_loss_free_balancing(_model("qwen2_moe", seed=1))
    assert fresh.load_biases(tmp_path) == 2 and torch.equal(fresh.biases(), handle.biases())
    with pytest.raises(FileNotFoundError, match="no such folder"):
        handle.save_biases(tmp_path / "missing")


def test_attach_refuses_a_peft_model_around_another_model():
    _, handle = _peft("qwen2_moe", "apply_first")
    other = peft.get_peft_model(_model("qwen2_moe", seed=2), _lora())
    with pytest.raises(ValueError, match="does not hold the model the handle was built on"):
        handle.attach(other)


def test_second_apply_under_modules_to_save_returns_the_handle():
    peft_model, handle = _peft("qwen2_moe", "apply_first", modules_to_save=["gate"])
    assert apply_loss_free_balancing(peft_model) is handle


def test_a_deep_copy_of_a_bound_peft_model_saves_itself(tmp_path):
    import copy

    peft_model, handle = _peft("qwen2_moe", "apply_first")
    handle.attach(peft_model)
    twin = copy.deepcopy(peft_model)
    twin_handle = twin._moebalance_bias_handle
    assert twin_handle is not handle and twin_handle.model is twin.base_model.model
    with torch.no_grad():
        twin_handle.bias_tensors()[0][0] = 0.5
    twin.save_pretrained(tmp_path)
    fresh = apply_loss_free_balancing(_model("qwen2_moe", seed=1))
    fresh.load_biases(tmp_path)
    assert fresh.biases()[0, 0] == 0.5 and handle.biases()[0, 0] == 0
