"""The bias rules of moebalance.rules behind LossFreeBalancer: each against a float64 reference
written from its formula on a hand example, the schedules and freezes, Quantile Balancing's
guards, and (2 gloo ranks, in the shared distributed job) identical biases equal to one process."""

import json
import math

import numpy as np
import pytest
import torch

from moebalance.balancing import Balancing, LossFreeBalancer
from moebalance.routing import TopKRouter
from moebalance.rules import (
    ProportionalRule,
    QuantileRule,
    RateSchedule,
    SMEBURule,
    make_rule,
    parse_target_load,
    quantile_bias,
)
from moebalance.train.config import RunConfig, apply_overrides

U = 0.01
LOADS = [[1.0, 3.0, 2.0, 6.0], [4.0, 4.0, 0.0, 4.0]]  # two layers, E = 4, row means 3 and 3


def _delta(update, loads=LOADS, **kw):
    return LossFreeBalancer(U, update, all_reduce=None, **kw).bias_delta(torch.tensor(loads))


def test_sign_rule_is_algorithm_1():
    ref = [[U * np.sign(np.mean(r) - c) for c in r] for r in np.array(LOADS, dtype=np.float64)]
    torch.testing.assert_close(_delta("sign").double(), torch.tensor(ref), rtol=0, atol=1e-9)


def test_error_rule_is_the_relative_error():
    ref = [[U * (np.mean(r) - c) / np.mean(r) for c in r] for r in np.array(LOADS, dtype=np.float64)]
    torch.testing.assert_close(_delta("error").double(), torch.tensor(ref), rtol=1e-6, atol=1e-9)


def _smebu_ref(loads_steps, kappa, beta):
    m = np.zeros_like(np.array(loads_steps[0], dtype=np.float64))
    for loads in loads_steps:
        c = np.array(loads, dtype=np.float64)
        mean = c.mean(-1, keepdims=True)
        t = np.tanh(kappa * (mean - c) / mean)
        d = U * (t - t.mean(-1, keepdims=True))
        m = beta * m + (1 - beta) * d
    return m


def test_smebu_is_tanh_clamp_mean_centred_with_momentum():
    second = [[6.0, 2.0, 3.0, 1.0], [1.0, 5.0, 3.0, 3.0]]
    balancer = LossFreeBalancer(U, SMEBURule(kappa=3.0, momentum=0.7), all_reduce=None)
    first = balancer.bias_delta(torch.tensor(LOADS))
    torch.testing.assert_close(first.double(), torch.tensor(_smebu_ref([LOADS], 3.0, 0.7)), rtol=1e-5, atol=1e-9)
    got = balancer.bias_delta(torch.tensor(second))
    torch.testing.assert_close(got.double(), torch.tensor(_smebu_ref([LOADS, second], 3.0, 0.7)), rtol=1e-5, atol=1e-9)
    assert abs(float(got.sum())) < 1e-8  # mean-centred: the biases' mean does not drift


def test_smebu_state_round_trip_continues_identically():
    a = LossFreeBalancer(U, "smebu", all_reduce=None)
    a.bias_delta(torch.tensor(LOADS))
    b = LossFreeBalancer(U, "smebu", all_reduce=None)
    b.load_state_dict(a.state_dict())
    nxt = torch.tensor([[2.0, 2.0, 5.0, 3.0], [3.0, 3.0, 3.0, 3.0]])
    assert torch.equal(a.bias_delta(nxt), b.bias_delta(nxt))


def test_proportional_rule_moves_towards_the_target_share():
    weights = "1,2,3,4"
    got = LossFreeBalancer(U, ProportionalRule(weights), all_reduce=None).bias_delta(torch.tensor(LOADS))
    target = np.array([1, 2, 3, 4], dtype=np.float64) / 10
    ref = [U * (target - np.array(r) / np.sum(r)) for r in np.array(LOADS, dtype=np.float64)]
    torch.testing.assert_close(got.double(), torch.tensor(np.array(ref)), rtol=1e-5, atol=1e-9)
    uniform = LossFreeBalancer(U, "proportional", all_reduce=None).bias_delta(torch.tensor(LOADS))
    ref_u = [U * (0.25 - np.array(r) / np.sum(r)) for r in np.array(LOADS, dtype=np.float64)]
    torch.testing.assert_close(uniform.double(), torch.tensor(np.array(ref_u)), rtol=1e-5, atol=1e-9)


def test_rows_without_load_are_left_alone():
    for rule in ("sign", "error", "smebu", "proportional"):
        assert torch.count_nonzero(_delta(rule, [[0.0, 0.0, 0.0, 0.0]])) == 0, rule


def test_target_load_is_checked():
    with pytest.raises(ValueError, match="target_load"):
        parse_target_load("1,-1")
    with pytest.raises(ValueError, match="3 weights"):
        parse_target_load("1,1", num_experts=3)
    with pytest.raises(ValueError, match="target_load"):
        LossFreeBalancer(U, ProportionalRule("1,1,1"), all_reduce=None).bias_delta(torch.tensor(LOADS))


# --- Quantile Balancing -------------------------------------------------------------------------

# A hand example: T = 4 tokens, E = 4 experts, K = 1, so C = T*K/E = 1.
SCORES = [[0.9, 0.2, 0.4, 0.1], [0.8, 0.7, 0.3, 0.2], [0.6, 0.5, 0.55, 0.05], [0.95, 0.1, 0.3, 0.35]]
BIAS = [0.1, -0.05, 0.0, -0.05]


def _qb_ref(scores, bias, k):
    """The formula, in float64 with explicit sorting: alpha_t = (K+1)-th largest of s_t + b;
    b_j = -[(C+1)-th largest over tokens of (s_tj - alpha_t)], C = T*K/E."""
    s, b = np.array(scores, dtype=np.float64), np.array(bias, dtype=np.float64)
    t, e = s.shape
    alpha = np.array([sorted(row + b, reverse=True)[k] for row in s])
    c = t * k // e
    return np.array([-sorted(s[:, j] - alpha, reverse=True)[c] for j in range(e)])


def _centre(x):
    return x - x.mean()


def test_quantile_bias_matches_the_formula():
    got = quantile_bias(torch.tensor(SCORES), torch.tensor(BIAS), 1)
    torch.testing.assert_close(got.double(), torch.tensor(_qb_ref(SCORES, BIAS, 1)), rtol=0, atol=1e-6)
    got2 = quantile_bias(torch.tensor(SCORES), torch.tensor(BIAS), 2)  # K = 2: C = 2
    torch.testing.assert_close(got2.double(), torch.tensor(_qb_ref(SCORES, BIAS, 2)), rtol=0, atol=1e-6)


def _identity_router(num_experts=4, top_k=1, **kw):
    """A router whose sigmoid scores are the sigmoid of its input (weight = identity)."""
    router = TopKRouter(num_experts, num_experts, top_k, **kw)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
        router.expert_bias.copy_(torch.tensor(BIAS))
    return router.train()


def _logit(scores):
    s = torch.tensor(scores, dtype=torch.float64)
    return torch.log(s / (1 - s)).float()


SECOND = [[0.3, 0.9, 0.2, 0.6], [0.1, 0.2, 0.85, 0.4], [0.7, 0.65, 0.1, 0.5], [0.2, 0.3, 0.4, 0.9]]


def _qb_step(estimator, ema=0.0, window=1, batches=(SCORES, SECOND), bins=1000):
    router = _identity_router()
    balancer = LossFreeBalancer(U, QuantileRule(estimator, ema=ema, window=window, bins=bins), all_reduce=None)
    balancer.prepare(router)
    for scores in batches:
        router(_logit(scores))
    balancer.step(router)
    return router.expert_bias.double()


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_quantile_microbatch_estimator_is_megatrons_mean_over_micro_batches(ema):
    scores_used = [torch.sigmoid(_logit(s)).double().numpy() for s in (SCORES, SECOND)]
    est = np.mean([_qb_ref(s, BIAS, 1) for s in scores_used], axis=0)
    ref = _centre(ema * np.array(BIAS) + (1 - ema) * _centre(est))
    torch.testing.assert_close(_qb_step("microbatch", ema), torch.tensor(ref), rtol=0, atol=1e-6)


def test_quantile_pooled_estimator_is_the_quantile_of_all_tokens():
    pooled = np.concatenate([torch.sigmoid(_logit(s)).double().numpy() for s in (SCORES, SECOND)])
    ref = _centre(_qb_ref(pooled, BIAS, 1))  # T = 8, C = 2
    torch.testing.assert_close(_qb_step("pooled"), torch.tensor(ref), rtol=0, atol=1e-6)


def test_quantile_histogram_estimator_is_the_pooled_quantile_within_a_bin():
    pooled = _qb_step("pooled")
    bins = 20000
    hist = _qb_step("histogram", bins=bins)
    width = (1 - min(BIAS)) - (-1 - max(BIAS))
    assert (hist - pooled).abs().max() <= 2 * width / bins
    coarse = _qb_step("histogram", bins=4)  # a coarse histogram is a different (worse) estimate
    assert (coarse - pooled).abs().max() > 2 * width / bins


def test_quantile_pooled_window_pools_past_steps_with_the_current_bias():
    router = _identity_router()
    balancer = LossFreeBalancer(U, QuantileRule("pooled", window=2), all_reduce=None)
    balancer.prepare(router)
    router(_logit(SCORES))
    balancer.step(router)
    bias_now = router.expert_bias.double().numpy().copy()
    router(_logit(SECOND))
    balancer.step(router)
    pooled = np.concatenate([torch.sigmoid(_logit(s)).double().numpy() for s in (SCORES, SECOND)])
    ref = _centre(_qb_ref(pooled, bias_now, 1))
    torch.testing.assert_close(router.expert_bias.double(), torch.tensor(ref), rtol=0, atol=1e-6)


def test_quantile_histogram_window_pools_past_margins_as_measured():
    """Window 2: the (C+1)-th largest of the margins of both steps, each against its step's bias
    (the float64 reference), to within about a bin of the past step's histogram."""
    bins = 20000
    router = _identity_router()
    balancer = LossFreeBalancer(U, QuantileRule("histogram", window=2, bins=bins), all_reduce=None)
    balancer.prepare(router)
    margins = []
    for scores in (SCORES, SECOND):
        s = torch.sigmoid(_logit(scores)).double().numpy()
        b = router.expert_bias.double().numpy().copy()
        alpha = np.array([sorted(row + b, reverse=True)[1] for row in s])
        margins.append(s - alpha[:, None])
        router(_logit(scores))
        balancer.step(router)
    m = np.concatenate(margins)  # T = 8, C = 2
    ref = _centre(np.array([-sorted(m[:, j], reverse=True)[2] for j in range(4)]))
    width = 2 + 2 * float(router.expert_bias.abs().max())
    assert np.abs(router.expert_bias.double().numpy() - ref).max() <= 3 * width / bins
    assert balancer.state_dict()["history"][0].shape == (1, 4 * bins + 3)  # counts, tokens, lo, hi


def test_quantile_balances_a_fixed_batch():
    torch.manual_seed(0)
    router = TopKRouter(8, 8, 2).train()
    balancer = LossFreeBalancer(U, "quantile", all_reduce=None)
    balancer.prepare(router)
    x = torch.randn(256, 8) + 0.5
    first = router(x).tokens_per_expert.float()
    for _ in range(10):
        router(x)
        balancer.step(router)
    last = router(x).tokens_per_expert.float()
    assert (last.max() - last.mean()) / last.mean() < 0.1 < (first.max() - first.mean()) / first.mean()


def test_router_records_scores_once_per_training_forward_not_in_recomputation_or_eval():
    from torch.utils.checkpoint import checkpoint

    router = TopKRouter(8, 8, 2).train()
    LossFreeBalancer(U, QuantileRule("pooled"), all_reduce=None).prepare(router)
    x = torch.randn(16, 8, requires_grad=True)
    out = checkpoint(lambda h: router(h).gates, x, use_reentrant=False)
    out.sum().backward()  # recomputes the forward: it must not be recorded again
    router.eval()
    router(torch.randn(16, 8))
    recorded = router.score_recorder.pop(8, torch.device("cpu"))
    assert recorded.shape == (16, 8)
    torch.testing.assert_close(recorded, torch.sigmoid(x.detach() @ router.weight.detach().t()))


def test_quantile_guards_name_what_is_wrong():
    balancer = LossFreeBalancer(U, "quantile", all_reduce=None)
    with pytest.raises(ValueError, match="group-limited"):
        balancer.prepare(TopKRouter(8, 8, 2, n_group=2, topk_group=1))
    with pytest.raises(ValueError, match="additive"):
        balancer.prepare(TopKRouter(8, 8, 2, bias_mode="multiplicative"))
    router = TopKRouter(8, 8, 2).train()
    with pytest.raises(ValueError, match="prepare"):
        router(torch.randn(8, 8))
        balancer.step(router)
    balancer.prepare(router)
    with pytest.raises(ValueError, match="divisible by num_experts"):
        router(torch.randn(6, 8))  # 6 tokens * K=2 is not a multiple of E=8
    router.eval()
    router(torch.randn(6, 8))  # evaluation records nothing, so it is not refused
    with pytest.raises(ValueError, match="auxiliary loss"):
        Balancing("deepseek_v3", bias_update="quantile")
    with pytest.raises(ValueError, match="qb_window"):
        QuantileRule("histogram", window=0)
    with pytest.raises(ValueError, match="quantile rule needs the routers' scores"):
        balancer.bias_delta(torch.ones(1, 8))


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.n_group=2", "model.topk_group=2"], "model.n_group"),
        (["train.batch_size=1", "train.seq_len=7"], "train.batch_size * train.seq_len * model.top_k"),
        (["balance.strategy=deepseek_v3"], "balance.seq_aux_coeff"),
        (["balance.bias_mode=multiplicative"], "balance.bias_mode"),
    ],
)
def test_quantile_config_guards_name_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        apply_overrides(RunConfig(), ["balance.bias_update=quantile", *overrides])
    assert str(err.value).startswith(field)
    apply_overrides(RunConfig(), overrides)  # fine without the quantile rule


def test_every_rule_builds_from_config_and_balancing_runs_it():
    for rule in ("sign", "error", "smebu", "proportional", "quantile"):
        cfg = apply_overrides(RunConfig(), [f"balance.bias_update={rule}"])
        balancing = Balancing.from_config(cfg.balance)
        assert balancing.bias.rule.name == rule
    cfg = apply_overrides(RunConfig(), ["balance.bias_update=quantile", "balance.qb_estimator=histogram", "balance.qb_bins=64", "balance.qb_ema=0.5"])
    rule = Balancing.from_config(cfg.balance).bias.rule
    assert (rule.estimator, rule.bins, rule.ema) == ("histogram", 64, 0.5)


# --- schedules and freezing ---------------------------------------------------------------------


def test_rate_schedules():
    assert RateSchedule().scale(10**6) == 1.0
    decay = RateSchedule("decay", decay_steps=100)
    assert [decay.scale(s) for s in (0, 100, 300)] == [1.0, 0.5, 0.25]
    steps = RateSchedule(freeze_after_steps=3)
    assert [steps.scale(s) for s in range(5)] == [1, 1, 1, 0, 0]
    tokens = RateSchedule(freeze_after_tokens=2048)
    assert [tokens.scale(s, (s + 1) * 1024) for s in range(3)] == [1, 1, 0]
    with pytest.raises(ValueError, match="decay_steps"):
        RateSchedule("decay", decay_steps=0)


def test_trainer_schedule_freezes_after_tokens():
    from moebalance.train.loop import bias_rate_scale

    cfg = apply_overrides(RunConfig(), ["balance.bias_freeze_after_tokens=3072"])  # 1024 tokens a step
    assert [bias_rate_scale(s, cfg) for s in range(4)] == [1, 1, 1, 0]
    assert [bias_rate_scale(s, cfg, world_size=3) for s in range(2)] == [1, 0]
    cfg = apply_overrides(RunConfig(), ["balance.bias_update_schedule=decay", "balance.bias_decay_steps=10"])
    assert bias_rate_scale(10, cfg) == 0.5


@pytest.mark.parametrize("rule", ["sign", "smebu", "quantile"])
def test_a_frozen_router_keeps_its_bias_and_a_zero_rate_moves_nothing(rule):
    torch.manual_seed(0)
    model = torch.nn.Sequential(TopKRouter(8, 8, 2), TopKRouter(8, 8, 2)).train()
    model[0].bias_frozen = True
    balancer = LossFreeBalancer(U, rule, all_reduce=None)
    balancer.prepare(model)
    x = torch.randn(32, 8) + 0.5
    for router in model:
        router(x)
    balancer.step(model)
    assert torch.count_nonzero(model[0].expert_bias) == 0
    assert torch.count_nonzero(model[1].expert_bias) > 0
    before = model[1].expert_bias.clone()
    for router in model:
        router(x)
    balancer.step(model, rate_scale=0.0)
    assert torch.equal(model[1].expert_bias, before)


def test_make_rule_refuses_unknown_names_and_options():
    with pytest.raises(ValueError, match="bias_update must be one of"):
        make_rule("pid")
    with pytest.raises(ValueError, match="takes no option"):
        make_rule("sign", kappa=1.0)


# --- 2 gloo ranks (part of the shared distributed job, tests/distributed_helpers.py) -------------

DIST_RULES = ["sign", "error", "smebu", "proportional", "quantile:microbatch", "quantile:pooled", "quantile:histogram"]
DIST_STEPS = 3


def _dist_rule(name):
    rule, _, estimator = name.partition(":")
    if rule == "quantile":
        return QuantileRule(estimator, ema=0.5, window=2, bins=256)
    return make_rule(rule)


def _rank_batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 16, 8, generator=gen) + 0.3 * (rank + 1)  # [B, S, D]: 32 tokens, ranks differ


def _dist_model():
    torch.manual_seed(7)
    return torch.nn.Sequential(TopKRouter(8, 8, 2), TopKRouter(8, 8, 2)).train()


def _run_rule(name, ranks, all_reduce):
    """Biases after DIST_STEPS steps whose micro-batches are the given ranks' batches."""
    model = _dist_model()
    balancer = LossFreeBalancer(0.05, _dist_rule(name), all_reduce=all_reduce)
    balancer.prepare(model)
    for step in range(DIST_STEPS):
        for rank in ranks:
            h = _rank_batch(rank, step)
            for router in model:
                router(h)
        balancer.step(model)
    return [r.expert_bias.tolist() for r in model]


def dist_job_part(rank, world_size, out_dir):
    from pathlib import Path

    biases = {name: _run_rule(name, [rank], "auto") for name in DIST_RULES}
    (Path(out_dir) / f"rules_rank{rank}.json").write_text(json.dumps(biases))


@pytest.mark.distributed
@pytest.mark.parametrize("name", DIST_RULES)
def test_two_ranks_end_with_identical_biases_equal_to_one_process(dist_job, name):
    from distributed_helpers import DIST_WORLD

    per_rank = [json.loads((dist_job / f"rules_rank{r}.json").read_text())[name] for r in range(DIST_WORLD)]
    assert all(b == per_rank[0] for b in per_rank)  # bit-identical on every rank
    one_process = _run_rule(name, list(range(DIST_WORLD)), None)  # the ranks' batches as micro-batches
    assert per_rank[0] == one_process
    assert any(v != 0 for row in one_process for v in row)
    local_only = _run_rule(name, [0], None)
    assert local_only != one_process  # rank 0's own data alone gives other biases: the reduce mattered
    assert all(math.isfinite(v) for row in one_process for v in row)


# --- the trainer: rule state in checkpoints -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["balance.bias_update=smebu", "balance.bias_update_rate=0.05"],
        ["balance.bias_update=quantile", "balance.qb_estimator=pooled", "balance.qb_window=3", "balance.qb_ema=0.5",
         "train.grad_accum=2", "model.activation_checkpointing=true"],
    ],
    ids=["smebu", "quantile_pooled_window"],
)
def test_resume_with_a_stateful_rule_is_bit_identical(tmp_path, monkeypatch, extra):
    """SMEBU's momentum and the quantile window are saved with the checkpoint: a run stopped and
    resumed ends exactly as one that never stopped."""
    import numpy as np

    from moebalance.train.checkpoint import load_checkpoint
    from moebalance.train.loop import train
    from test_resume import Crash, assert_same_run, crash_at_batch, tiny_cfg

    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 128, size=20_000, dtype=np.uint16).tofile(tokens)
    ref = tmp_path / "ref"
    train(tiny_cfg(tokens, *extra), ref, progress=False)
    accum = 2 if "train.grad_accum=2" in extra else 1
    crash_at_batch(monkeypatch, accum * 6 + 1)  # the first batch of step 7, after the checkpoint of step 4
    with pytest.raises(Crash):
        train(tiny_cfg(tokens, *extra), tmp_path / "run", progress=False)
    monkeypatch.undo()
    train(tiny_cfg(tokens, *extra), tmp_path / "run", progress=False, resume=True)
    assert_same_run(ref, tmp_path / "run")
    state = load_checkpoint(ref / "checkpoint.pt")["balancing"]
    assert state.get("momentum") is not None or len(state.get("history", [])) == 3


@pytest.mark.parametrize("estimator", ["microbatch", "histogram", "pooled"])
@pytest.mark.parametrize("empty", ["masked", "nan"])
def test_quantile_a_micro_batch_without_counted_tokens_records_nothing(estimator, empty):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) + 0.5
    biases = []
    for with_empty in (True, False):
        torch.manual_seed(0)
        router = TopKRouter(8, 8, 2).train()
        balancer = LossFreeBalancer(U, QuantileRule(estimator), all_reduce=None)
        balancer.prepare(router)
        if with_empty and empty == "masked":
            router(torch.randn(16, 8), mask=torch.zeros(16, dtype=torch.bool))
        elif with_empty:
            router(torch.full((16, 8), float("nan")))
        router(x)
        balancer.step(router)
        biases.append(router.expert_bias.clone())
    assert biases[0].abs().max() > 0
    torch.testing.assert_close(biases[0], biases[1], atol=0, rtol=0)
