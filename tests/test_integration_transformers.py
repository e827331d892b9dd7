"""Loss-Free Balancing on Hugging Face transformers MoE models (tiny random configs, offline)."""

import copy
import functools

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from hf_helpers import TokenWindows  # noqa: E402  (tests/)
from moebalance.integrations.transformers import (  # noqa: E402
    TINY_FAMILIES,
    apply_loss_free_balancing,
    tiny_moe_config,
)
from moebalance.metrics import max_violation  # noqa: E402

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model(family: str, **kw) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, vocab_size=VOCAB, **kw))


def _tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_bias_is_bit_identical(family, dtype):
    model = _model(family).to(dtype)
    ref = copy.deepcopy(model)
    handle = apply_loss_free_balancing(model)
    assert handle.num_layers == 2
    x = _tokens()
    model.train(), ref.train()
    out, out_ref = model(x, labels=x), ref(x, labels=x)
    assert torch.equal(out.logits, out_ref.logits)
    out.loss.backward(), out_ref.loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    # Training forwards count K * T per layer; the biases stay float32 after the bf16 cast.
    assert handle.pending_loads().sum(-1).tolist() == [2 * x.numel()] * 2
    assert all(b.dtype == torch.float32 for b in handle.bias_tensors())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_bias_selects_but_gates_stay_unbiased(family):
    model = _model(family)
    handle = apply_loss_free_balancing(model)
    router = handle.routers[0]
    router.expert_bias[5] = 10.0  # far above any softmax score: expert 5 always chosen
    h_TD = torch.randn(12, router.hidden_dim)
    logits_TE, weights_TK, index_TK = router(h_TD)
    assert (index_TK == 5).any(-1).all()
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    expected = probs_TE.gather(1, index_TK)
    if family == "mixtral" or router.norm_topk_prob:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights_TK.float(), expected)


def test_deepseek_adopts_its_own_bias():
    model = _model("deepseek_v3")
    handle = apply_loss_free_balancing(model)
    assert handle.bias_tensors()[0] is model.model.layers[0].mlp.gate.e_score_correction_bias
    assert not hasattr(model.model.layers[0].mlp.gate, "expert_bias")


def test_model_without_router_is_refused_naming_why():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    with pytest.raises(ValueError, match="no MoE router found in LlamaForCausalLM.*masked max, hash routing.*experts pick tokens"):
        apply_loss_free_balancing(transformers.LlamaForCausalLM(cfg))


class ToyRouter(nn.Module):
    """A router no transformers release has: sigmoid scores, top-2, gates renormalised."""

    def __init__(self, d=8, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, d, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        scores = torch.sigmoid(x @ self.weight.T)
        values, index = scores.topk(self.top_k, dim=-1)
        return values / values.sum(-1, keepdim=True), index


def test_a_router_is_found_by_what_it_does_not_its_class():
    router = ToyRouter()
    model = nn.ModuleDict({"gate": router})
    model.forward = lambda x: router(x)  # noqa: E731  (a module that feeds the router)
    x = torch.randn(5, 8)
    ref = router(x)
    handle = apply_loss_free_balancing(model, probe_inputs={"x": x})
    assert handle.routers == [router] and handle.router_names == ["gate"]
    assert all(torch.equal(a, b) for a, b in zip(router(x), ref))  # zero bias: bit-identical
    with torch.no_grad():
        handle.bias_tensors()[0][3] = 10.0
    gates, index = router(x)
    assert (index == 3).any(-1).all()  # the bias selects ...
    scores = torch.sigmoid(x @ router.weight.T)
    chosen = scores.gather(-1, index)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))  # ... the gates stay unbiased


def test_probe_refuses_a_patch_that_changes_the_choice(monkeypatch):
    from moebalance.integrations.transformers import selection

    model = _model("qwen3_moe")
    real = selection.SelectionMode._select

    def next_expert(self, scores, dim, sorted_):  # a patch that would route every token elsewhere
        values, index = real(self, scores, dim, sorted_)
        self.last_index = (self.last_index + 1) % self.num_experts
        return torch.return_types.topk((values, (index + 1) % self.num_experts))

    monkeypatch.setattr(selection.SelectionMode, "_select", next_expert)
    with pytest.raises(RuntimeError, match="Qwen3MoeTopKRouter.*other experts"):
        apply_loss_free_balancing(model)
    gate = model.model.layers[0].mlp.gate
    assert "forward" not in gate.__dict__ and not hasattr(gate, "expert_bias")  # nothing stays patched


def test_probe_refuses_a_bias_that_does_not_steer(monkeypatch):
    from moebalance.integrations.transformers import selection

    real_init = selection.SelectionMode.__init__

    def ignore_bias(self, num_experts, top_k, bias_E, on_select, *args):
        real_init(self, num_experts, top_k, None, on_select, *args)

    monkeypatch.setattr(selection.SelectionMode, "__init__", ignore_bias)
    with pytest.raises(RuntimeError, match="MixtralTopKRouter.*did not make every token choose it"):
        apply_loss_free_balancing(_model("mixtral"))


def test_step_applies_algorithm_1_with_all_reduce():
    model = _model("qwen3_moe")
    seen = []

    def fake_all_reduce(loads_LE):  # stands in for the DDP sum: doubles every count
        seen.append(loads_LE.shape)
        loads_LE.mul_(2)

    handle = apply_loss_free_balancing(model, update_rate=0.01, all_reduce=fake_all_reduce)
    model.train()
    x = _tokens()
    model(x)
    model(x)  # two micro-batches of one step
    local = handle.pending_loads()
    loads = handle.step()
    assert seen == [torch.Size([2, 8])]
    torch.testing.assert_close(loads, 2 * local)
    expected = 0.01 * torch.sign(local.mean(-1, keepdim=True) - local)
    torch.testing.assert_close(handle.biases(), expected)
    assert handle.pending_loads().sum() == 0
    model.eval()
    model(x)  # eval forwards count nothing
    assert handle.pending_loads().sum() == 0


def test_bias_update_survives_bf16_cast():
    model = _model("mixtral")
    handle = apply_loss_free_balancing(model, update_rate=1e-3)
    with torch.no_grad():
        handle.bias_tensors()[0].fill_(1.0)
    model.to(torch.bfloat16)
    model.train()
    model(_tokens())
    handle.step()
    assert handle.bias_tensors()[0].dtype == torch.float32
    assert (handle.biases()[0] != 1.0).any()  # a 1e-3 step on 1.0 would vanish in bf16


def test_disable_aux_loss():
    model = _model("mixtral")
    model.config.output_router_logits = True
    apply_loss_free_balancing(model)
    assert model.router_aux_loss_coef == 0.0
    assert model.config.router_aux_loss_coef == 0.0
    assert model.config.output_router_logits is False
    kept = _model("olmoe")
    apply_loss_free_balancing(kept, disable_aux_loss=False)
    assert kept.router_aux_loss_coef > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_biases_survive_save_and_load(tmp_path, family):
    model = _model(family)
    handle = apply_loss_free_balancing(model)
    with torch.no_grad():
        for b in handle.bias_tensors():
            b.uniform_(-0.05, 0.05)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    if family == "deepseek_v3":  # unpatched transformers loads the bias under its own name
        torch.testing.assert_close(reloaded.model.layers[1].mlp.gate.e_score_correction_bias, handle.biases()[1])
    handle2 = apply_loss_free_balancing(reloaded)  # reads the biases from model.name_or_path
    assert torch.equal(handle2.biases(), handle.biases())
    model.eval(), reloaded.eval()
    x = _tokens()
    assert torch.equal(model(x).logits, reloaded(x).logits)


# ---------------------------------------------------------------------------------------------
# With transformers.Trainer
# ---------------------------------------------------------------------------------------------


def _skewed_model(seed: int = 0, skew: float = 0.4) -> nn.Module:
    """Qwen3-MoE whose routers prefer experts 0 and 1 for every token (MaxVio_batch near 3)."""
    torch.manual_seed(seed)
    model = _model("qwen3_moe")
    u = torch.randn(model.config.hidden_size)
    u /= u.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight += 0.1 * u  # a direction every hidden state shares
        for layer in model.model.layers:
            layer.mlp.gate.weight[:2] += skew * u
    return model


_Windows = functools.partial(TokenWindows, seq=32, vocab=VOCAB)


def _trainer(model, out_dir, steps: int, accum: int = 1, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=accum,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Windows(64), eval_dataset=_Windows(8))


@pytest.mark.slow
def test_trainer_reduces_maxvio_and_eval_does_not_update(tmp_path):
    steps = 12
    model = _skewed_model(skew=0.25)
    handle = apply_loss_free_balancing(model, update_rate=0.01)
    trainer = _trainer(model, tmp_path, steps)
    handle.attach(trainer)
    trainer.train()
    vio = [rec["moe/maxvio_batch"] for rec in trainer.state.log_history if "moe/maxvio_batch" in rec]
    assert len(vio) == steps
    assert vio[0] > 2.5  # experts 0 and 1 take (nearly) every token
    assert sum(vio[-4:]) / 4 < 0.6 * vio[0]
    assert "moe/bias_range_layer1" in trainer.state.log_history[-2]

    before = handle.biases()
    metrics = trainer.evaluate()
    assert torch.equal(handle.biases(), before)
    assert handle.pending_loads().sum() == 0
    # MaxVio_global of the validation loads, bias applied: the same as validation_loads gives.
    expected = max_violation(handle.validation_loads([_Windows(8)[:]["input_ids"]]))
    assert metrics["eval_moe/maxvio_global"] == pytest.approx(expected.mean().item())
    assert metrics["eval_moe/maxvio_global_layer1"] == pytest.approx(expected[1].item())
    assert trainer.state.log_history[-1]["eval_moe/maxvio_global"] == metrics["eval_moe/maxvio_global"]

    # The biases did it, not the few small weight updates: with them zeroed the skew is back.
    with torch.no_grad():
        for b in handle.bias_tensors():
            b.zero_()
    model.train()
    model(_Windows(4)[:]["input_ids"])
    assert max_violation(handle.pending_loads()).mean() > 2.5


@pytest.mark.slow
def test_trainer_updates_once_per_optimizer_step(tmp_path):
    steps, accum, u = 3, 2, 0.01
    model = _model("olmoe")
    handle = apply_loss_free_balancing(model, update_rate=u)
    calls = []
    original = handle.step
    handle.step = lambda: calls.append(1) or original()
    trainer = _trainer(model, tmp_path, steps, accum=accum)
    trainer.add_callback(handle.callback())  # after the reporters: still balances
    trainer.train()
    assert len(calls) == steps
    # Each step's load is the whole global batch: accum micro-batches of 4 x 32 tokens, K=2.
    assert handle.last_loads.sum(-1).tolist() == [2 * accum * 4 * 32] * 2
    # Sign updates: every bias is a multiple of u, at most `steps` of them.
    n_LE = handle.biases() / u
    torch.testing.assert_close(n_LE, n_LE.round(), atol=1e-4, rtol=0)
    assert n_LE.abs().max() <= steps + 1e-4


def test_activation_checkpointing_counts_once():
    model = _model("mixtral")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # the first name is the newer one (5.x deprecates the second)
    handle = apply_loss_free_balancing(model)
    model.train()
    x = _tokens()
    model(x, labels=x).loss.backward()  # the backward recomputes every layer's forward
    assert handle.pending_loads().sum(-1).tolist() == [2 * x.numel()] * 2


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on every rank
        model = _model("olmoe")
        handle = apply_loss_free_balancing(model, update_rate=0.01)  # all_reduce="auto"
        model.train()
        model(_tokens(seed=10 + rank))  # each rank sees other tokens
        local = handle.pending_loads()
        loads = handle.step()
        torch.save({"local": local, "loads": loads, "biases": handle.biases()}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_loads_are_summed_and_biases_agree(tmp_path):
    world = 2
    _model("olmoe")  # import the lazy modeling module once, before forking
    # fork: the workers inherit the imported transformers instead of importing it again.
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="fork"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    total = results[0]["local"] + results[1]["local"]
    assert not torch.equal(results[0]["local"], results[1]["local"])
    for res in results:
        torch.testing.assert_close(res["loads"], total)
        torch.testing.assert_close(res["biases"], 0.01 * torch.sign(total.mean(-1, keepdim=True) - total))


# ---------------------------------------------------------------------------------------------
# Sharp edges (issue 12): reloading, applying twice, meta device, top-1, padding, portability
# ---------------------------------------------------------------------------------------------


def _save_with_bias(family: str, folder, value: float):
    model = _model(family)
    handle = apply_loss_free_balancing(model)
    with torch.no_grad():
        for b in handle.bias_tensors():
            b.fill_(value)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_load_biases_from_is_read_and_missing_path_refused(tmp_path, family):
    _save_with_bias(family, tmp_path, 0.25)
    fresh = _model(family)  # built from a config: its own biases are 0
    handle = apply_loss_free_balancing(fresh, load_biases_from=tmp_path)
    assert handle.biases().unique().tolist() == [0.25]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        apply_loss_free_balancing(_model(family), load_biases_from=tmp_path / "missing")



@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_load_biases_from_refuses_other_models_and_corrupt_files(tmp_path, family):
    _save_with_bias(family, tmp_path / "two", 0.25)  # 2 MoE layers, 8 experts
    for kw, match in (
        (dict(num_layers=1), r"biases of 2 routers, the model has 1 \(no router for"),  # was a silent partial load
        (dict(num_layers=3), "biases of 2 routers, the model has 3"),
        (dict(num_experts=4), r"has shape \(8,\), expected \(4,\)"),
    ):
        model = _model(family, **kw)
        with pytest.raises(ValueError, match=match):
            apply_loss_free_balancing(model, load_biases_from=tmp_path / "two")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        apply_loss_free_balancing(_model(family), load_biases_from=bad)

def test_second_apply_returns_the_handle_and_keeps_trained_biases(tmp_path):
    _save_with_bias("mixtral", tmp_path, 0.5)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    handle = apply_loss_free_balancing(reloaded, update_rate=0.01)
    assert handle.biases().unique().tolist() == [0.5]
    with torch.no_grad():
        for b in handle.bias_tensors():
            b.fill_(0.9)  # "trained"
    assert apply_loss_free_balancing(reloaded, update_rate=0.01) is handle
    torch.testing.assert_close(handle.biases(), torch.full_like(handle.biases(), 0.9))
    with pytest.raises(ValueError, match=r"update_rate=0.02 \(was 0.01\)"):
        apply_loss_free_balancing(reloaded, update_rate=0.02)
    with pytest.raises(ValueError, match="load_biases"):
        apply_loss_free_balancing(reloaded, update_rate=0.01, load_biases_from=tmp_path)
    with pytest.raises(ValueError, match="once, to the whole model"):
        apply_loss_free_balancing(reloaded.model.layers[0], update_rate=0.01)



def test_swapping_the_balancer_updates_settings_and_the_config_record(tmp_path):
    # The error of a second apply says "change handle.balancer for another rate": the saved
    # config.json must then record the new rate, not the one of the first apply.
    from moebalance import LossFreeBalancer

    model = _model("olmoe")
    handle = apply_loss_free_balancing(model, update_rate=0.01)
    handle.balancer = LossFreeBalancer(0.05, center=True)
    model.save_pretrained(tmp_path)
    saved = __import__("json").loads((tmp_path / "config.json").read_text())["moebalance_loss_free"]
    assert saved["bias_update_rate"] == 0.05 and saved["bias_center"] is True
    assert apply_loss_free_balancing(model, update_rate=0.05, center=True) is handle
    with pytest.raises(TypeError, match="balancer must be a moebalance.LossFreeBalancer"):
        handle.balancer = 0.05

def test_two_callbacks_of_one_handle_step_once():
    model = _model("olmoe")
    handle = apply_loss_free_balancing(model, update_rate=0.01)
    callbacks = [handle.callback(), handle.callback()]
    state = transformers.TrainerState()
    model.train()
    for step in (1, 2):
        model(_tokens(seed=step))
        state.global_step = step
        for cb in callbacks:
            cb.on_step_end(None, state, None)
        assert handle.steps == step
    n_LE = handle.biases() / 0.01
    assert n_LE.abs().max() <= 2 + 1e-4  # two updates, not four
    for cb in callbacks:  # a second train() starts again at global_step 1: it updates again
        cb.on_train_begin(None, state, None)
    model(_tokens(seed=3))
    state.global_step = 2
    callbacks[0].on_step_end(None, state, None)
    assert handle.steps == 3


def test_optimizer_hook_and_callback_do_not_both_update():
    model = _model("olmoe")
    handle = apply_loss_free_balancing(model, update_rate=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hook = handle.attach(opt)
    assert handle.attach(opt) is hook  # attaching twice keeps one hook
    cb = handle.callback()
    model.train()
    x = _tokens()
    model(x, labels=x).loss.backward()
    opt.step()
    state = transformers.TrainerState()
    state.global_step = 1
    cb.on_step_end(None, state, None)
    assert handle.steps == 1 and hook.steps == 1
    handle.detach()
    opt.step()
    assert handle.steps == 1


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_meta_device_init(family):
    cfg = tiny_moe_config(family, vocab_size=VOCAB)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="meta device.*after model.to_empty"):
        apply_loss_free_balancing(model)  # the probe needs one real forward
    model.to_empty(device="cpu")
    handle = apply_loss_free_balancing(model)
    assert all(b.device.type == "cpu" and b.dtype == torch.float32 for b in handle.bias_tensors())
    assert handle.pending_loads().abs().sum() == 0
    if family != "deepseek_v3":  # an added bias starts at zero; DeepSeek-V3's own is a weight, loaded below
        assert handle.biases().abs().sum() == 0
    ref = _model(family)
    ref_handle = apply_loss_free_balancing(ref)
    with torch.no_grad():
        for b in ref_handle.bias_tensors():
            b.fill_(0.125)
    model.load_state_dict(ref.state_dict())
    assert handle.biases().unique().tolist() == [0.125]
    model.train()
    model(_tokens())
    assert handle.pending_loads().sum(-1).tolist() == [2 * 32] * 2


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_apply_after_to_empty_ignores_uninitialised_weights(family, fill):
    # to_empty leaves uninitialised memory (often NaN/Inf); the conformance probe must not read it.
    cfg = tiny_moe_config(family, vocab_size=VOCAB)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    weights = [r.weight for r in model.modules() if type(r).__name__.lower().endswith("topkrouter")]
    handle = apply_loss_free_balancing(model)
    assert [r.weight for r in handle.routers] == weights  # the probe put the model's own weights back
    assert all(r.weight.isnan().all() if fill != fill else r.weight.isinf().all() for r in handle.routers)
    assert all(b.dtype == torch.float32 and b.device.type == "cpu" for b in handle.bias_tensors())
    assert handle.biases().abs().sum() == 0 and handle.pending_loads().abs().sum() == 0
    # Then loading real weights makes every router route exactly as the patched reference's (the
    # whole model would also need its non-persistent buffers, e.g. rotary inv_freq, re-initialised).
    ref = _model(family)
    ref_handle = apply_loss_free_balancing(ref)
    model.load_state_dict(ref.state_dict())
    h = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    for r, r_ref in zip(handle.routers, ref_handle.routers):
        for a, b in zip(r.eval()(h), r_ref.eval()(h)):
            assert torch.equal(a, b)


def test_top1_with_normalised_gates_follows_transformers_and_warns_once(caplog):
    model = _model("qwen3_moe", top_k=1, norm_topk_prob=True)
    ref = copy.deepcopy(model)
    with caplog.at_level("WARNING", logger="moebalance.integrations.transformers"):
        handle = apply_loss_free_balancing(model)
    assert caplog.text.count("no gradient") == 1  # once for the model, not once per router
    _, weights_TK, _ = handle.routers[0](torch.randn(6, model.config.hidden_size))
    assert torch.equal(weights_TK, torch.ones_like(weights_TK))  # transformers' rule: one gate, normalised
    x = _tokens()
    assert torch.equal(model(x).logits, ref(x).logits)


def test_config_records_the_keys_save_pretrained_writes(tmp_path):
    from safetensors import safe_open

    model = _model("mixtral")  # transformers saves Mixtral's mlp as block_sparse_moe
    apply_loss_free_balancing(model)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = sorted(k for k in f.keys() if k.endswith("expert_bias"))
    assert model.config.moebalance_loss_free["bias_keys"] == saved
    assert all("block_sparse_moe" in k for k in saved)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_nan_inputs_carry_no_load_and_move_no_bias(family):
    model = _model(family)
    handle = apply_loss_free_balancing(model)
    model.train()
    embeds = torch.full((2, 8, model.config.hidden_size), float("nan"))
    model(inputs_embeds=embeds)
    assert handle.pending_loads().sum() == 0
    handle.step()
    assert handle.biases().abs().sum() == 0


def test_underflowed_scores_give_finite_gates():
    # logits [200, 0, 0, 0]: the softmax of experts 1-3 underflows to 0; a bias choosing two of them
    model = _model("qwen2_moe", num_experts=4, norm_topk_prob=True)
    handle = apply_loss_free_balancing(model)
    gate = handle.routers[0]
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[0, 0] = 200.0
        handle.bias_tensors()[0].copy_(torch.tensor([0.0, 2.0, 2.0, 0.0]))
    h = torch.zeros(3, model.config.hidden_size)
    h[:, 0] = 1.0
    _, weights, index = gate(h)
    assert index.sort(-1).values.tolist() == [[1, 2]] * 3
    assert torch.isfinite(weights).all() and torch.equal(weights, torch.full_like(weights, 0.5))


@pytest.mark.parametrize("rule", ["sign", "error", "smebu", "proportional"])
def test_every_load_based_rule_reaches_the_handle(rule):
    from moebalance import LossFreeBalancer

    model = _model("qwen3_moe")
    handle = apply_loss_free_balancing(model, update=rule)
    model.train()
    model(_tokens())
    loads = handle.pending_loads()
    handle.step()
    ref = LossFreeBalancer(1e-3, rule).bias_delta(loads, torch.zeros_like(loads))
    torch.testing.assert_close(handle.biases(), ref)  # the handle applies the rule's own delta
    # quantile (from the routers' scores): tests/test_transformers_quantile.py


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_counts_each_token_once(reentrant):
    # reentrant: the first forward runs without grad, the recomputation in the backward is counted;
    # non-reentrant: the first forward is counted, the recomputation is not
    model = _model("mixtral")
    handle = apply_loss_free_balancing(model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = _tokens(batch=2, seq=12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 6:] = 0
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert handle.pending_loads().sum(-1).tolist() == [18 * 2] * 2  # 18 real tokens x K, padding out


def test_a_deep_copy_has_its_own_padding_mask():
    model = _model("mixtral")
    handle = apply_loss_free_balancing(model)
    twin = copy.deepcopy(model)
    twin_handle = apply_loss_free_balancing(twin)
    assert twin_handle is not handle
    twin.train()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 6:] = 0
    twin(input_ids=_tokens(batch=2, seq=12), attention_mask=mask)
    assert twin_handle.pending_loads().sum(-1).tolist() == [18 * 2] * 2
    assert handle.pending_loads().sum() == 0


def test_torch_compile_trains_a_patched_model():
    model = _model("mixtral")
    handle = apply_loss_free_balancing(model)
    model.train()
    compiled = torch.compile(model, backend="aot_eager")
    ids = _tokens(batch=2, seq=12)
    compiled(input_ids=ids, labels=ids).loss.backward()  # the gates are divided in place downstream
    assert handle.pending_loads().sum(-1).tolist() == [24 * 2] * 2


def test_own_bias_keeps_float32_through_a_bf16_reload(tmp_path):
    from moebalance.integrations.transformers.tiny import tiny_config_for

    model = transformers.AutoModelForCausalLM.from_config(tiny_config_for("minimax_m2"))  # bias not kept fp32
    handle = apply_loss_free_balancing(model)
    with torch.no_grad():
        for b in handle.bias_tensors():
            b += 0.123456789
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(apply_loss_free_balancing(again).biases(), handle.biases())


def test_attaching_the_optimizer_again_with_its_scaler_uses_the_scaler():
    model = _model("mixtral")
    handle = apply_loss_free_balancing(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu")
    first = handle.attach(opt)
    hook = handle.attach(opt, scaler=scaler)
    assert hook is not first and hook.scaler is scaler and not first.attached


def test_bad_model_and_probe_inputs_name_the_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_loss_free_balancing(None)
    with pytest.raises(TypeError, match="probe_inputs must be a dict"):
        apply_loss_free_balancing(_model("mixtral"), probe_inputs=_tokens())
    handle = apply_loss_free_balancing(_model("mixtral"))
    with pytest.raises(TypeError, match="batches must be an iterable"):
        handle.validation_loads(None)


def test_padding_is_not_counted():
    model = _model("qwen3_moe")
    handle = apply_loss_free_balancing(model)
    model.train()
    x = _tokens(batch=2, seq=16)
    mask = torch.ones_like(x)
    mask[1, 10:] = 0
    model(input_ids=x, attention_mask=mask)
    assert handle.pending_loads().sum(-1).tolist() == [2 * int(mask.sum())] * 2
    handle.reset_loads()
    model(x)  # no mask: every token counts
    assert handle.pending_loads().sum(-1).tolist() == [2 * x.numel()] * 2
    loads = handle.validation_loads([{"input_ids": x, "attention_mask": mask}])
    assert loads.sum(-1).tolist() == [2 * int(mask.sum())] * 2



@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_padding_is_not_counted_for_float_masks_and_the_base_model(family):
    # transformers attends to the non-zero entries of any 2-D mask (bool, int, float) and its
    # base model takes the mask too: the loads must exclude the same padding in every case.
    model = _model(family)
    handle = apply_loss_free_balancing(model)
    model.train()
    x = _tokens(batch=2, seq=16)
    mask = torch.ones_like(x)
    mask[1, 10:] = 0
    expected = [2 * int(mask.sum())] * 2
    for call in (
        lambda: model(x, attention_mask=mask.float()),
        lambda: model(x, attention_mask=mask.bool()),
        lambda: model.model(x, attention_mask=mask),
        lambda: model.model(x, mask),
    ):
        handle.reset_loads()
        call()
        assert handle.pending_loads().sum(-1).tolist() == expected
    handle.reset_loads()
    model.model(x)  # no mask: every token counts
    assert handle.pending_loads().sum(-1).tolist() == [2 * x.numel()] * 2


def test_validation_loads_refuses_a_bare_tensor_and_bad_ids():
    model = _model("olmoe")
    handle = apply_loss_free_balancing(model)
    x = _tokens()
    with pytest.raises(TypeError, match=r"pass \[tensor\]"):
        handle.validation_loads(x)  # was a deep shape error from the attention
    for bad in (x[0], x.float()):
        with pytest.raises(ValueError, match=r"input_ids must be a \[B, S\] integer tensor"):
            handle.validation_loads([bad])
    assert model.training  # mode restored after the error
    assert handle.validation_loads([x]).sum(-1).tolist() == [2 * x.numel()] * 2

def test_config_records_loss_free_and_plain_reload_warns(tmp_path, caplog):
    model = _save_with_bias("qwen2_moe", tmp_path, 0.1)
    record = model.config.moebalance_loss_free
    assert record["bias_update_rate"] == 1e-3 and record["bias_name"] == "expert_bias"
    assert record["bias_keys"][0] == "model.layers.0.mlp.gate.expert_bias"
    saved = __import__("json").loads((tmp_path / "config.json").read_text())
    assert saved["moebalance_loss_free"]["used_by_plain_transformers"] is False
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # without apply_loss_free_balancing
    finally:
        transformers.logging.disable_propagation()
    assert "mlp.gate.expert_bias" in caplog.text and "UNEXPECTED" in caplog.text  # names what is lost


def test_export_biases_uses_deepseek_naming():
    model = _model("mixtral")
    handle = apply_loss_free_balancing(model)
    exported = handle.export_biases()
    assert sorted(exported) == [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(2)]
    assert all(t.dtype == torch.float32 and t.shape == (8,) for t in exported.values())
    with pytest.raises(ValueError, match="without dots"):
        handle.export_biases("a.b")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dist_timeout_s"):
        apply_loss_free_balancing(_model("olmoe"), dist_timeout_s=0)
    with pytest.raises(ValueError, match="update_rate"):
        apply_loss_free_balancing(_model("olmoe"), update_rate=-1)
    # Refused at apply, not at the first step (a str all_reduce) nor silently (1e39 makes NaN biases).
    model = _model("olmoe")
    for kw, match in (
        (dict(all_reduce="sum"), "all_reduce must be"),
        (dict(disable_aux_loss="no"), "disable_aux_loss must be True or False"),
        (dict(update_rate=1e39), r"update_rate must be .*float32"),
    ):
        with pytest.raises(ValueError, match=match):
            apply_loss_free_balancing(model, **kw)
    with pytest.raises(TypeError, match="load_biases_from must be a folder path"):
        apply_loss_free_balancing(model, load_biases_from=3)
    assert not hasattr(model.model.layers[0].mlp.gate, "expert_bias")  # nothing patched on the way


def test_center_through_the_integration():
    model = _model("olmoe")
    handle = apply_loss_free_balancing(model, update_rate=0.01, center=True)
    model.train()
    for seed in range(3):
        model(_tokens(seed=seed))
        handle.step()
    assert handle.biases().mean(-1).abs().max() < 1e-6
    assert handle.biases().abs().max() > 0


@pytest.mark.slow
def test_eval_metrics_carry_the_evaluation_prefix(tmp_path):
    # Several eval datasets: each one's MaxVio_global under its own prefix, none lost to the next.
    model = _model("olmoe")
    handle = apply_loss_free_balancing(model)
    trainer = _trainer(model, tmp_path, 1)
    handle.attach(trainer)
    metrics = trainer.evaluate(eval_dataset={"a": _Windows(4), "b": _Windows(8)})
    for name, n in (("a", 4), ("b", 8)):
        expected = max_violation(handle.validation_loads([_Windows(n)[:]["input_ids"]]))
        assert metrics[f"eval_{name}_moe/maxvio_global"] == pytest.approx(expected.mean().item())
    assert "eval_moe/maxvio_global" not in metrics
    # Another prefix is an evaluation too: its loads, not the training log's bias metrics.
    test = trainer.evaluate(metric_key_prefix="test")
    assert "test_moe/maxvio_global" in test and "moe/bias_min" not in trainer.state.log_history[-1]
