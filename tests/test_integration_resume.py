"""Trainer checkpoints carry the Loss-Free biases and a resumed train gets them back (Mixtral, whose
MoE weights transformers 5.25 does not restore, and a LoRA adapter included)."""

import functools
import logging

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from hf_helpers import TokenWindows  # noqa: E402  (tests/)
from moebalance.integrations.transformers import apply_loss_free_balancing, tiny_moe_config  # noqa: E402
from moebalance.integrations.transformers.resume import BIAS_FILE  # noqa: E402

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


_Windows = functools.partial(TokenWindows, 16, seq=16, vocab=VOCAB)


def _model(family: str, lora: bool):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, vocab_size=VOCAB))
    handle = apply_loss_free_balancing(model, update_rate=1e-2)
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["o_proj"]))
    return model, handle


def _trainer(model, handle, out_dir, steps: int):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Windows())
    handle.attach(trainer)
    return trainer


@pytest.mark.parametrize("family,lora", [("mixtral", False), ("deepseek_v3", False), ("qwen2_moe", True)])
def test_resume_restores_the_biases(tmp_path, family, lora):
    model, handle = _model(family, lora)
    _trainer(model, handle, tmp_path, steps=1).train()
    trained = handle.biases()
    assert trained.abs().sum() > 0 and handle.steps == 1
    ckpt = tmp_path / "checkpoint-1"
    with safe_open(str(ckpt / BIAS_FILE), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32} and len(list(f.keys())) == 2

    model2, handle2 = _model(family, lora)  # a fresh process would start here: zero biases
    assert handle2.biases().abs().sum() == 0
    seen = {}

    class Peek(transformers.TrainerCallback):  # the biases when the first resumed step begins
        def on_step_begin(self, args, state, control, **kw):
            seen.setdefault("biases", handle2.biases())

    trainer2 = _trainer(model2, handle2, tmp_path, steps=2)
    trainer2.add_callback(Peek())
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert torch.equal(seen["biases"], trained)
    assert handle2.steps == 2  # counts from the resumed global step (1), plus one more optimizer step


def test_resume_without_biases_in_the_checkpoint_warns(tmp_path, caplog):
    pytest.importorskip("peft")
    model, handle = _model("qwen2_moe", lora=True)
    _trainer(model, handle, tmp_path, steps=1).train()
    (tmp_path / "checkpoint-1" / BIAS_FILE).unlink()  # a checkpoint written without moebalance's file
    model2, handle2 = _model("qwen2_moe", lora=True)
    with caplog.at_level(logging.WARNING, logger="moebalance.integrations.transformers"):
        _trainer(model2, handle2, tmp_path, steps=1).train(resume_from_checkpoint=True)
    assert "resuming at step 1 but no Loss-Free biases found in the checkpoint" in caplog.text
