"""Fine-tuning with the transformers integration: the bias modes (update, frozen, update then
freeze), steps skipped for inf/NaN gradients (GradScaler, fused and not; Trainer overflow), and a
bias that is an nn.Parameter kept out of the optimizer. Tiny random configs, offline."""

import functools
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from hf_helpers import TokenWindows  # noqa: E402  (tests/)
from moebalance.integrations.transformers import apply_loss_free_balancing, tiny_moe_config  # noqa: E402
from moebalance.integrations.transformers.handle import LossFreeBalancing  # noqa: E402

VOCAB = 128
LOGGER = "moebalance.integrations.transformers"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model(family: str = "olmoe") -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, vocab_size=VOCAB))


def _tokens(seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _handle(model, mode="update", freeze_after_steps=None, rate=0.01) -> LossFreeBalancing:
    handle = apply_loss_free_balancing(model, update_rate=rate)
    handle.mode = mode
    handle.freeze_after_steps = freeze_after_steps
    return handle


def _forward_and_step(model, handle, seed: int) -> torch.Tensor:
    model.train()
    model(_tokens(seed))
    return handle.step()


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def test_frozen_counts_and_logs_but_never_moves_the_bias():
    model = _model()
    handle = _handle(model, mode="frozen")
    assert not handle.update_biases
    for seed in range(3):
        loads = _forward_and_step(model, handle, seed)
        assert loads.sum(-1).tolist() == [2 * 16 * 2] * handle.num_layers  # tokens x K, every layer
    assert torch.equal(handle.biases(), torch.zeros_like(handle.biases()))
    assert handle.steps == 3 and "moe/maxvio_batch" in handle.metrics()


def test_update_for_n_steps_then_frozen():
    model = _model()
    handle = _handle(model, freeze_after_steps=2)
    seen = []
    for seed in range(5):
        _forward_and_step(model, handle, seed)
        seen.append(handle.biases())
    assert not torch.equal(seen[0], torch.zeros_like(seen[0])) and not torch.equal(seen[1], seen[0])
    assert torch.equal(seen[2], seen[1]) and torch.equal(seen[4], seen[1])  # frozen after 2 updates
    assert (seen[1] / 0.01).abs().max() <= 2 + 1e-4
    assert not handle.update_biases and handle.steps == 5


def test_update_biases_is_the_mode():
    model = _model()
    handle = _handle(model)
    assert handle.update_biases and handle.mode == "update"  # today's behaviour by default
    handle.update_biases = False
    assert handle.mode == "frozen"
    handle.update_biases = True
    assert handle.mode == "update"


def test_bad_modes_are_refused():
    model = _model()
    handle = _handle(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        handle.mode = "freeze"
    with pytest.raises(ValueError, match="freeze_after_steps must be an int >= 1"):
        handle.freeze_after_steps = 0
    with pytest.raises(ValueError, match="freeze_after_steps must be an int >= 1"):
        handle.freeze_after_steps = True
    handle.mode = "frozen"
    with pytest.raises(ValueError, match="needs mode='update'"):
        handle.freeze_after_steps = 3
    with pytest.raises(ValueError, match="update_biases must be True or False"):
        handle.update_biases = 1
    args = (model, list(zip(handle.router_names, handle.routers)), handle.balancer, None, {})
    with pytest.raises(ValueError, match="mode must be one of"):
        LossFreeBalancing(*args, mode="Update")


@pytest.mark.parametrize(
    "mode, limit, says",
    [
        ("update", None, "mode=update, update_rate=0.01 (sign rule), after every optimizer step"),
        ("frozen", None, "mode=frozen (loads counted and logged, biases never moved)"),
        ("update", 7, "mode=update for the first 7 optimizer steps then frozen, update_rate=0.01"),
    ],
)
def test_mode_and_rate_are_logged_once_at_start(caplog, mode, limit, says):
    model = _model()
    handle = _handle(model, mode, limit)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        handle.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
        for seed in range(2):
            _forward_and_step(model, handle, seed)
    lines = [r.getMessage() for r in caplog.records if "Loss-Free Balancing (arXiv 2408.15664)" in r.getMessage()]
    assert len(lines) == 1 and says in lines[0], lines


def test_trainer_resume_counts_towards_freeze_after_steps():
    model = _model()
    handle = _handle(model, freeze_after_steps=3)
    cb = handle.callback()
    state = transformers.TrainerState()
    state.global_step = 3  # a resumed run: three steps were taken before
    cb.on_train_begin(None, state, None)
    assert handle.steps == 3 and not handle.update_biases
    model.train()
    model(_tokens(0))
    state.global_step = 4
    cb.on_step_end(None, state, None)
    assert torch.equal(handle.biases(), torch.zeros_like(handle.biases()))


# ---------------------------------------------------------------------------------------------
# Steps skipped for inf/NaN gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_optimizer_hook_never_updates_on_a_grad_scaler_skip(fused):
    model = _model()
    handle = _handle(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu")
    hook = handle.attach(opt, scaler=scaler)
    biases = []
    model.train()
    for step in range(3):
        x = _tokens(step)
        loss = model(x, labels=x).loss * (float("inf") if step == 1 else 1.0)  # inf gradients on purpose
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        biases.append(handle.biases())
        if step == 1:
            assert handle.pending_loads().sum() == 0  # the skipped step's loads are gone
    assert hook.steps == 2 and hook.skipped == 1 and handle.skipped_steps == 1 and handle.steps == 2
    assert torch.equal(biases[1], biases[0]) and not torch.equal(biases[2], biases[1])
    assert handle.last_loads.sum(-1).tolist() == [2 * 16 * 2] * handle.num_layers  # one step's tokens only


_Windows = functools.partial(TokenWindows, seq=16, vocab=VOCAB)


class _Record(transformers.TrainerCallback):
    """Runs after the balancing callback: the biases at the end of each step."""

    def __init__(self, handle):
        self.handle, self.biases = handle, []

    def on_step_end(self, args, state, control, **kwargs):
        self.biases.append(self.handle.biases())


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_trainer_never_updates_on_an_overflow_step(tmp_path, optim):
    model = _model()
    handle = _handle(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, optim=optim,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Windows(16))
    # What Accelerate builds for fp16 on a GPU; on the CPU we give it one ourselves (it runs there).
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    calls = []

    def overflow_on_the_second_step(grad):
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == 2 else grad

    model.lm_head.weight.register_hook(overflow_on_the_second_step)
    handle.attach(trainer)
    record = _Record(handle)
    trainer.add_callback(record)
    trainer.train()
    assert len(calls) == 3 and trainer.accelerator.scaler.get_scale() < 65536.0  # it did overflow once
    assert handle.steps == 2 and handle.skipped_steps == 1
    assert torch.equal(record.biases[1], record.biases[0]) and not torch.equal(record.biases[2], record.biases[1])


# ---------------------------------------------------------------------------------------------
# A bias that is an nn.Parameter
# ---------------------------------------------------------------------------------------------


def _parameter_bias_model() -> nn.Module:
    """DeepSeek-V3 whose routers keep ``e_score_correction_bias`` as a Parameter
    (``requires_grad=False``), as ERNIE-4.5 (``moe_statics``), AFMoE and Laguna do."""
    model = _model("deepseek_v3")
    for module in model.modules():
        if "e_score_correction_bias" in module._buffers:
            value = module._buffers.pop("e_score_correction_bias")
            module.e_score_correction_bias = nn.Parameter(value, requires_grad=False)
    return model


def test_a_parameter_bias_is_never_updated_by_the_optimizer():
    model = _parameter_bias_model()
    handle = apply_loss_free_balancing(model, update_rate=0.01)
    found = handle.bias_parameters()
    assert len(found) == handle.num_layers and all(isinstance(b, nn.Parameter) for b in found)
    assert [b is t for b, t in zip(found, handle.bias_tensors())] == [True] * handle.num_layers
    assert not any(b.requires_grad for b in found)
    # AdamW(model.parameters()) holds the biases, but they have no gradient: neither stepped nor decayed
    everything = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    handle.attach(everything)
    model.train()
    x = _tokens(0)
    model(x, labels=x).loss.backward()
    before = handle.biases()
    delta = handle.balancer.bias_delta(handle.pending_loads(), before)
    everything.step()
    torch.testing.assert_close(handle.biases(), before + delta, rtol=0, atol=0)  # Algorithm 1's update only
    handle.detach()
    found[0].requires_grad_(True)  # a bias the optimizer would update is refused
    with pytest.raises(ValueError, match="param group 0 holds the Loss-Free bias of 1 router.*requires_grad=True"):
        handle.attach(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1))
    with pytest.raises(ValueError, match="would update it"):
        handle.callback().on_train_begin(None, transformers.TrainerState(), None, optimizer=everything)


def test_buffer_biases_have_no_parameters_to_keep_out():
    model = _model("deepseek_v3")
    handle = apply_loss_free_balancing(model)
    assert handle.bias_parameters() == []
    handle.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # buffers are never in it
