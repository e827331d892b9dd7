"""Quantile Balancing (``update="quantile"``) through the transformers handle (tiny random configs, offline).

The reference is written from the formula (J. Su, kexue.fm/archives/11619; Megatron-LM
``qb_dual_update``), in float64, from scores recorded by hand with a forward hook on each router.
"""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moebalance import LossFreeBalancer  # noqa: E402
from moebalance.integrations.transformers import apply_loss_free_balancing, tiny_moe_config  # noqa: E402
from moebalance.metrics import max_violation  # noqa: E402
from moebalance.rules import QuantileRule  # noqa: E402

VOCAB, E, K = 128, 8, 2
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

#: family -> (config overrides, router logits -> the unbiased selection scores s)
FAMILIES = {
    "deepseek_v3": (dict(n_group=1, topk_group=1), lambda logits: logits.double().sigmoid()),  # own bias slot
    "mixtral": ({}, lambda logits: logits.double().softmax(-1)),  # added expert_bias
}


def _model(family: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    overrides = {**FAMILIES[family][0], **kw} if family in FAMILIES else kw
    return transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, vocab_size=VOCAB, **overrides))


def _batch(seed: int, pad: int = 0) -> dict:
    """``[2, 16]`` ids; the last ``pad`` tokens of row 1 are padding (28 real tokens: T*K/E = 7)."""
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _record(handle, family: str) -> list[list[torch.Tensor]]:
    """Per router, the float64 ``[T, E]`` scores of each training forward (a forward hook)."""
    to_scores = FAMILIES[family][1]
    seen: list[list[torch.Tensor]] = [[] for _ in handle.routers]
    for i, router in enumerate(handle.routers):
        router.register_forward_hook(lambda m, a, out, i=i: seen[i].append(to_scores(out[0].detach())) if m.training else None)
    return seen


def _estimate(s_TE: torch.Tensor, b_E: torch.Tensor) -> torch.Tensor:
    """One micro-batch's QB bias, float64: alpha_t = (K+1)-th largest of s_t + b;
    b_j = -[(C+1)-th largest over tokens of (s_tj - alpha_t)], C = T*K/E."""
    alpha = (s_TE + b_E).sort(-1, descending=True).values[:, K]
    capacity = s_TE.shape[0] * K // E
    return -(s_TE - alpha[:, None]).sort(0, descending=True).values[capacity]


def _reference(estimates: list[torch.Tensor], b_E: torch.Tensor, ema: float) -> torch.Tensor:
    """``centre(ema*b + (1-ema)*centre(mean of the estimates))``."""
    target = torch.stack(estimates).mean(0)
    target = target - target.mean()
    new = ema * b_E + (1 - ema) * target
    return new - new.mean()


def _start_biases(handle) -> torch.Tensor:
    with torch.no_grad():
        for i, b in enumerate(handle.bias_tensors()):
            b.copy_(torch.randn(E, generator=torch.Generator().manual_seed(10 + i)) * 0.01)
    return handle.biases().double()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("estimator", ["microbatch", "pooled", "histogram"])
def test_one_step_matches_the_formula_with_padding_masked(family, estimator):
    model = _model(family)
    bins = 20000  # histogram: a fine one, so that its quantile is close to the exact one
    handle = apply_loss_free_balancing(model, update=QuantileRule(estimator=estimator, ema=0.5, bins=bins))
    seen = _record(handle, family)
    b0 = _start_biases(handle)
    model.train()
    batch = _batch(1, pad=4)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    handle.step()
    real = batch["attention_mask"].reshape(-1).bool()
    want = torch.stack([_reference([_estimate(s[0][real], b)], b, 0.5) for s, b in zip(seen, b0)])
    # histogram: the quantile to within about one bin of the margins' range (2 + bias span) / bins
    tol = 1e-5 if estimator != "histogram" else 2.1 / bins
    torch.testing.assert_close(handle.biases().double(), want, atol=tol, rtol=0)
    assert handle.last_loads.sum(-1).tolist() == [real.sum().item() * K] * 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_accumulation_averages_micro_batches_and_a_skipped_step_is_forgotten(family):
    model = _model(family)
    handle = apply_loss_free_balancing(model, update="quantile")
    seen = _record(handle, family)
    b0 = _start_biases(handle)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    handle.attach(opt)
    model.train()
    skipped = _batch(5)
    model(**skipped, labels=skipped["input_ids"]).loss.backward()
    handle.discard_step()  # an overflowed step: its scores must not enter the next update
    for seed in (1, 2):  # two micro-batches of one optimizer step
        batch = _batch(seed)
        model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()  # the hook runs handle.step()
    assert handle.steps == 1 and handle.skipped_steps == 1
    want = torch.stack([_reference([_estimate(s[1], b), _estimate(s[2], b)], b, 0.0) for s, b in zip(seen, b0)])
    torch.testing.assert_close(handle.biases().double(), want, atol=1e-5, rtol=0)


def test_frozen_mode_moves_nothing_and_the_records_are_cleared():
    model = _model("mixtral")
    handle = apply_loss_free_balancing(model, update="quantile", mode="frozen")
    model.train()
    batch = _batch(1)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    handle.step()
    assert torch.equal(handle.biases(), torch.zeros(2, E))
    assert all(r.moebalance_score_recorder.stat is None for r in handle.routers)


def test_group_limited_routing_is_refused_naming_the_field():
    model = _model("deepseek_v3", n_group=2, topk_group=1)  # the tiny default: group-limited
    with pytest.raises(ValueError, match=r"group-limited routing \(DeepseekV3Config.n_group=2 with topk_group=1\)"):
        apply_loss_free_balancing(model, update="quantile")
    assert not hasattr(model.model.layers[0].mlp.gate, "moebalance_load_counts")  # nothing stays patched
    handle = apply_loss_free_balancing(model)  # sign: fine; switching it to quantile later is refused too
    with pytest.raises(ValueError, match="n_group=2"):
        handle.balancer = LossFreeBalancer(update="quantile")
    assert handle.balancer.update == "sign" and "moebalance_score_recorder" not in handle.routers[0].__dict__


def test_the_models_own_aux_loss_is_refused_beside_quantile():
    model = _model("mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.02 with output_router_logits=True"):
        apply_loss_free_balancing(model, update="quantile", disable_aux_loss=False)
    apply_loss_free_balancing(model, update="quantile")  # disable_aux_loss=True turns it off
    assert model.config.router_aux_loss_coef == 0


class _LogitBiasRouter(nn.Module):
    """A router whose own bias is added to the logits before the softmax: its top-K input is not s + b."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = E, K
        self.weight = nn.Parameter(torch.randn(E, 16))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(E))

    def forward(self, x):
        probs = (x @ self.weight.t() + self.e_score_correction_bias).softmax(-1)
        return torch.topk(probs, K, dim=-1).indices


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = _LogitBiasRouter()

    def forward(self, x):
        return self.router(x)


def test_an_own_bias_that_is_not_added_to_the_scores_is_refused():
    torch.manual_seed(0)
    model = _Toy()
    inputs = {"x": torch.randn(12, 16)}
    apply_loss_free_balancing(_Toy(), probe_inputs=inputs)  # the load-based rules take it
    with pytest.raises(ValueError, match="does not choose on its scores plus its own bias router.e_score_correction_bias"):
        apply_loss_free_balancing(model, update="quantile", probe_inputs=inputs)


def test_a_few_quantile_steps_lower_maxvio_on_a_fixed_batch():
    model = _model("qwen3_moe")
    handle = apply_loss_free_balancing(model, update="quantile")
    batch = _batch(7)
    before = max_violation(handle.validation_loads([batch])).mean().item()
    model.train()
    for _ in range(3):  # no weight update: the bias alone balances
        model(**batch)
        handle.step()
    after = max_violation(handle.validation_loads([batch])).mean().item()
    assert after < 0.5 * before, (before, after)


class _Counting:
    """A ScoreRecorder that also notes how many tokens each call hands it."""

    def __init__(self, inner, seen: list):
        self.inner, self.seen = inner, seen

    def __call__(self, scores_TE, bias_E, mask_T):
        self.seen.append(scores_TE.shape[0])
        self.inner(scores_TE, bias_E, mask_T)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_trainer_with_accumulation_updates_once_per_optimizer_step(tmp_path):
    from hf_helpers import TokenWindows

    model = _model("mixtral")
    handle = apply_loss_free_balancing(model, update="quantile")
    recorded = []
    for r in handle.routers:  # count the micro-batches each router records
        r.moebalance_score_recorder = _Counting(r.moebalance_score_recorder, recorded)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenWindows(8, 16, VOCAB))
    handle.attach(trainer)
    trainer.train()
    assert handle.steps == 2 and recorded == [32] * 8  # 2 steps x 2 micro-batches x 2 routers, 32 tokens each
    biases = handle.biases()
    assert biases.abs().max() > 0 and biases.mean(-1).abs().max() < 1e-6  # moved, and centred


@pytest.mark.parametrize("estimator", ["microbatch", "histogram", "pooled"])
@pytest.mark.parametrize("empty", ["masked", "nan"])
def test_a_micro_batch_without_counted_tokens_records_nothing(estimator, empty):
    from moebalance.integrations.transformers.tiny import tiny_config_for

    cfg = tiny_config_for("mixtral")
    good = _batch(3)
    good["input_ids"] = good["input_ids"] % cfg.vocab_size
    biases = []
    for with_empty in (True, False):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).train()
        handle = apply_loss_free_balancing(model, update=QuantileRule(estimator=estimator))
        if with_empty and empty == "masked":
            model(input_ids=good["input_ids"], attention_mask=torch.zeros_like(good["input_ids"]))
        elif with_empty:
            model(inputs_embeds=torch.full((2, 16, cfg.hidden_size), float("nan")))
        model(**good, labels=good["input_ids"]).loss.backward()
        handle.step()
        biases.append(handle.biases().clone())
    assert biases[0].abs().max() > 0
    torch.testing.assert_close(biases[0], biases[1], atol=0, rtol=0)
