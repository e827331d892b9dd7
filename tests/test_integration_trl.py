"""Loss-Free Balancing under TRL 1.x trainers: SFTTrainer and GRPOTrainer on a tiny MoE with a
tokenizer built in the test (nothing downloaded); one bias update per optimizer step; TRL's router
auxiliary loss and routing replay are said once."""

import logging
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from moebalance.integrations.transformers import apply_loss_free_balancing, tiny_moe_config  # noqa: E402
from moebalance.integrations.transformers.trl import replay_options, say_once  # noqa: E402

LOGGER = "moebalance.integrations.transformers"
WORDS = "the cat dog sat ran on a mat log red blue big small fast slow one two three".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 4)) for i in range(16)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def _model(tokenizer, family="mixtral"):
    torch.manual_seed(0)
    config = tiny_moe_config(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return transformers.AutoModelForCausalLM.from_config(config)


def _common(tmp_path, steps):
    return dict(output_dir=str(tmp_path), max_steps=steps, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, seed=0)


def _sft(tmp_path, steps=3, peft_config=None, save_strategy_override=None, **kw):
    tokenizer = _tokenizer()
    model = _model(tokenizer)
    handle = apply_loss_free_balancing(model, update_rate=1e-2)
    common = _common(tmp_path, steps)
    if save_strategy_override:
        common["save_strategy"] = save_strategy_override
    args = trl.SFTConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=16,
                         **common, **kw)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                             train_dataset=datasets.Dataset.from_dict({"text": TEXTS}))
    return trainer, handle


def test_sft_trainer_updates_once_per_optimizer_step(tmp_path, caplog):
    trainer, handle = _sft(tmp_path)
    handle.attach(trainer)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    assert trainer.state.global_step == 3 and handle.steps == 3
    assert handle.biases().abs().sum() > 0
    assert "auxiliary loss is on" not in caplog.text  # apply zeroed the model's coefficient before TRL read it
    assert any("moe/maxvio_batch" in log for log in trainer.state.log_history)


def test_sft_trainer_with_peft_config_and_the_router_in_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    trainer, handle = _sft(tmp_path, steps=2, save_strategy_override="steps",
                           peft_config=peft.LoraConfig(r=4, target_modules=["o_proj"], modules_to_save=["gate"]))
    handle.attach(trainer)  # TRL wrapped the model in get_peft_model: the handle follows the router copies
    trainer.train()
    used = [layer.mlp.gate.modules_to_save["default"] for layer in trainer.model.base_model.model.model.layers]
    assert handle.num_layers == 2 and all(a is b for a, b in zip(handle.routers, used))
    assert handle.steps == 2  # the copies' biases moved (the log of step 1; a sign step may undo it at step 2)
    assert trainer.state.log_history[0]["moe/bias_range_layer0"] > 0
    assert (tmp_path / "checkpoint-2" / "moebalance_biases.safetensors").is_file()


def test_callback_passed_to_the_trainer_says_the_aux_loss_once(tmp_path, caplog):
    trainer, handle = _sft(tmp_path, steps=2, router_aux_loss_coef=1e-2)
    trainer.add_callback(handle.callback())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.train()
    assert sum("router_aux_loss_coef=0.01" in r.getMessage() for r in caplog.records) == 1
    assert handle.steps == 2


def test_trl_router_aux_loss_is_said_once_and_how_it_combines(tmp_path, caplog):
    trainer, handle = _sft(tmp_path, steps=1, router_aux_loss_coef=1e-3)
    assert trainer.aux_loss_enabled  # TRL turned the model's aux loss back on
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        handle.attach(trainer)
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "auxiliary loss is on" in r.getMessage()]
    assert len(said) == 1
    assert "router_aux_loss_coef=0.001" in said[0] and "WITHOUT the bias" in said[0] and "add up" in said[0]
    assert handle.steps == 1


def test_routing_replay_option_warns_that_the_bias_cannot_act(caplog):
    handle = SimpleNamespace()
    args = SimpleNamespace(router_aux_loss_coef=0.0, enable_routing_replay=True, ignore_data_skip=True)
    assert replay_options(args) == ["enable_routing_replay=True"]
    assert replay_options(trl.GRPOConfig(output_dir="unused", use_cpu=True, bf16=False)) == []  # TRL 1.x has none
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        said = say_once(handle, args=args)
        assert say_once(handle, args=args) == []  # once
    assert len(said) == 1 and "the Loss-Free bias cannot steer them" in caplog.text


def _reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _grpo(tmp_path, steps=2):
    tokenizer = _tokenizer()
    model = _model(tokenizer, family="qwen2_moe")
    handle = apply_loss_free_balancing(model, update_rate=1e-2)
    args = trl.GRPOConfig(per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                          **_common(tmp_path, steps))
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward_len, args=args, processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_dict({"prompt": TEXTS[:8]}))
    handle.attach(trainer)
    return trainer, handle


def test_grpo_trainer_updates_once_per_optimizer_step(tmp_path):
    trainer, handle = _grpo(tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2 and handle.steps == 2
    assert handle.biases().abs().sum() > 0


def test_grpo_loads_are_the_training_forwards_only(tmp_path):
    trainer, handle = _grpo(tmp_path, steps=1)
    tokens = []

    def training_forward(module, args, kwargs):
        if torch.is_grad_enabled() and module.training:
            tokens.append(int(kwargs["attention_mask"].sum()))

    trainer.model.register_forward_pre_hook(training_forward, with_kwargs=True)
    trainer.train()
    assert handle.last_loads.sum(-1).tolist() == [2.0 * sum(tokens)] * 2  # tokens x K
