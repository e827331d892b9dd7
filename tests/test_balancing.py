import pytest
import torch
from torch import nn

from moebalance import AuxLossBalancer, LossFreeBalancer, MoELayer, TopKRouter
from moebalance.balancing import find_routers, router_z_loss, sequence_aux_loss
from moebalance.losses import normalize_scores


def _fill(router: TopKRouter, loads):
    router.load_counts.copy_(torch.tensor(loads, dtype=torch.float32))


def test_update_moves_each_bias_by_exactly_u():
    router = TopKRouter(8, 4, 1)
    _fill(router, [10, 2, 4, 0])  # mean 4: overloaded, underloaded, exact, underloaded
    LossFreeBalancer(update_rate=1e-3).step(router)
    u = torch.tensor(1e-3, dtype=torch.float32).item()  # u as float32 holds it, exactly
    assert router.expert_bias.tolist() == [-u, u, 0.0, u]
    assert router.load_counts.sum().item() == 0  # counts cleared


def test_error_update_is_scale_free():
    a, b = TopKRouter(8, 4, 1), TopKRouter(8, 4, 1)
    _fill(a, [10, 2, 4, 0])
    _fill(b, [100, 20, 40, 0])
    bal = LossFreeBalancer(update_rate=1e-2, update="error")
    bal.step(a)
    bal.step(b)
    torch.testing.assert_close(a.expert_bias, b.expert_bias)
    torch.testing.assert_close(a.expert_bias, 1e-2 * torch.tensor([-1.5, 0.5, 0.0, 1.0]))


def test_step_updates_every_layer_of_a_model():
    model = nn.Sequential(MoELayer(8, 16, 4, 2), MoELayer(8, 16, 4, 2))
    routers = find_routers(model)
    assert len(routers) == 2
    model.train()
    h = torch.randn(32, 8)
    for layer in model:
        h = layer(h).output
    loads = LossFreeBalancer().step(model)
    assert loads.shape == (2, 4) and loads.sum().item() == 2 * 32 * 2
    for r, row in zip(routers, loads):
        expected = 1e-3 * torch.sign(row.mean() - row)
        torch.testing.assert_close(r.expert_bias, expected)


def test_gradient_accumulation_gives_one_update():
    router = TopKRouter(8, 4, 2)
    router.train()
    xs = [torch.randn(16, 8) for _ in range(4)]
    total = sum(router(x).tokens_per_expert for x in xs)
    assert torch.equal(router.load_counts, total.float())
    LossFreeBalancer(update_rate=1e-3).step(router)
    assert router.expert_bias.abs().max().item() <= torch.tensor(1e-3).item()  # one step of u, not four
    expected = 1e-3 * torch.sign(total.float().mean() - total.float())
    torch.testing.assert_close(router.expert_bias, expected)


def test_eval_forward_changes_no_count_and_no_bias():
    layer = MoELayer(8, 16, 4, 2).eval()
    layer(torch.randn(10, 8))
    assert layer.router.load_counts.sum().item() == 0
    LossFreeBalancer().step(layer)
    assert torch.equal(layer.router.expert_bias, torch.zeros(4))


def test_bf16_model_keeps_small_updates():
    layer = MoELayer(8, 16, 4, 2).to(torch.bfloat16)
    assert layer.router.expert_bias.dtype == torch.float32
    layer.router.expert_bias.fill_(1.0)
    _fill(layer.router, [0, 10, 10, 10])
    LossFreeBalancer(update_rate=1e-3).step(layer)
    assert layer.router.expert_bias[0].item() == pytest.approx(1.001, abs=1e-7)
    assert layer.router.expert_bias[1].item() == pytest.approx(0.999, abs=1e-7)


def test_all_reduce_hook_sees_the_loads():
    router = TopKRouter(8, 4, 1)
    _fill(router, [1, 1, 1, 5])

    def fake_all_reduce(t):  # another rank with the opposite skew
        t.add_(torch.tensor([[5, 1, 1, 1]], dtype=t.dtype))

    LossFreeBalancer(all_reduce=fake_all_reduce).step(router)
    torch.testing.assert_close(router.expert_bias, 1e-3 * torch.tensor([-1.0, 1.0, 1.0, -1.0]))


def test_invalid_rates():
    with pytest.raises(ValueError, match="update_rate"):
        LossFreeBalancer(update_rate=0)
    with pytest.raises(ValueError, match="update"):
        LossFreeBalancer(update="magnitude")
    with pytest.raises(ValueError, match="coeff"):
        AuxLossBalancer(coeff=-1)
    for bad in ("1e-3", True, None, torch.tensor(1e-3)):  # ValueError naming the field, not a TypeError
        with pytest.raises(ValueError, match="update_rate must be a number"):
            LossFreeBalancer(update_rate=bad)
        with pytest.raises(ValueError, match="coeff must be a number"):
            AuxLossBalancer(coeff=bad)
    # Outside float32: 1e39 would make the float32 delta inf and the biases NaN; 1e-50 underflows to 0.
    for bad in (1e39, 1e-50):
        with pytest.raises(ValueError, match=r"update_rate must be .*float32"):
            LossFreeBalancer(update_rate=bad)
    assert LossFreeBalancer(update_rate=1.0).update_rate == 1.0


def test_aux_loss_matches_eq2_by_hand():
    # 1 sequence, T=4 tokens, N=3 experts, K=1
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    indices = torch.tensor([[0], [0], [1], [0]])
    f = torch.tensor([3 / 4 * 3, 3 / 4 * 1, 0.0])  # N/(K T) * count
    P = scores.mean(0)
    expected = (f * P).sum()
    torch.testing.assert_close(sequence_aux_loss(scores, indices, seq_len=4), expected)
    # two sequences: the mean of the per-sequence losses
    s2 = torch.cat([scores, scores.flip(1)])
    i2 = torch.cat([indices, 2 - indices])
    torch.testing.assert_close(sequence_aux_loss(s2, i2, seq_len=4), expected)


def test_aux_loss_uniform_routing_value():
    # E=4, K=2, every expert chosen equally often: f_i = 1, loss = sum_i P_i.
    scores = torch.full((8, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(sequence_aux_loss(scores, indices, seq_len=8), torch.tensor(1.0))
    sig = torch.rand(8, 4)
    torch.testing.assert_close(sequence_aux_loss(sig, indices, seq_len=8), sig.mean(0).sum())


def test_aux_balancer_scales_and_sums_layers():
    layer = MoELayer(8, 16, 4, 2)
    x = torch.randn(2, 6, 8)
    r1, r2 = layer(x).routing, layer(x * 2).routing
    manual = 1e-2 * (sequence_aux_loss(r1.scores, r1.indices, 6) + sequence_aux_loss(r2.scores, r2.indices, 6))
    torch.testing.assert_close(AuxLossBalancer(1e-2, scores="raw")([r1, r2]), manual)
    norm = [normalize_scores(r.scores) for r in (r1, r2)]
    manual = 1e-2 * (sequence_aux_loss(norm[0], r1.indices, 6) + sequence_aux_loss(norm[1], r2.indices, 6))
    torch.testing.assert_close(AuxLossBalancer(1e-2)([r1, r2]), manual)
    loss = AuxLossBalancer(1e-2)(r1)
    loss.backward()
    assert layer.router.weight.grad is not None
    with pytest.raises(ValueError, match="B, S, D"):
        AuxLossBalancer()(layer(x.view(12, 8)).routing)


def test_aux_loss_mask():
    scores = torch.rand(6, 4)
    indices = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 1], [0, 1]])
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    torch.testing.assert_close(
        sequence_aux_loss(scores, indices, 6, mask), sequence_aux_loss(scores[:4], indices[:4], 4)
    )


def test_z_loss_finite_for_huge_logits():
    logits = torch.tensor([[100.0, -50.0, 3.0], [200.0, 200.0, 0.0]])
    z = router_z_loss(logits)
    expected = ((100 + torch.log1p(torch.exp(torch.tensor(-103.0)))) ** 2 + (200 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert torch.isfinite(z)
    torch.testing.assert_close(z, expected)


def test_infinite_rates_and_mixed_expert_counts_rejected():
    with pytest.raises(ValueError, match="update_rate"):
        LossFreeBalancer(update_rate=float("inf"))
    with pytest.raises(ValueError, match="coeff"):
        AuxLossBalancer(coeff=float("inf"))
    model = nn.Sequential(MoELayer(8, 16, 4, 2), MoELayer(8, 16, 6, 2))
    with pytest.raises(ValueError, match="different num_experts"):
        LossFreeBalancer().step(model)
    LossFreeBalancer().step(model[1])  # one at a time works


def test_rate_scale_scales_the_update_and_is_checked():
    router = TopKRouter(8, 4, 1)
    _fill(router, [10, 2, 4, 0])
    LossFreeBalancer(update_rate=1e-3).step(router, rate_scale=0.25)
    assert router.expert_bias.tolist() == pytest.approx([-2.5e-4, 2.5e-4, 0.0, 2.5e-4])
    for bad in (-0.1, 1.5, float("nan"), "1"):
        with pytest.raises(ValueError, match="rate_scale"):
            LossFreeBalancer().bias_delta(torch.ones(4), rate_scale=bad)


def test_bias_update_schedule_lr_follows_the_decay_after_warmup():
    from moebalance.train.config import RunConfig, apply_overrides
    from moebalance.train.loop import bias_rate_scale, lr_at

    const = RunConfig()
    assert {bias_rate_scale(s, const) for s in range(const.train.max_steps)} == {1.0}
    cfg = apply_overrides(RunConfig(), ["balance.bias_update_schedule=lr"])
    t = cfg.train
    assert [bias_rate_scale(s, cfg) for s in range(t.warmup_steps)] == [1.0] * t.warmup_steps  # catch-up at full u
    scales = [bias_rate_scale(s, cfg) for s in range(t.warmup_steps, t.max_steps)]
    assert scales == sorted(scales, reverse=True)  # slows down with the learning rate
    assert scales[-1] == pytest.approx(lr_at(t.max_steps - 1, cfg) / t.lr) and scales[-1] < 0.11


def test_bad_rate_scale_in_step_keeps_the_step_loads():
    # The refusal comes before the loads are read: retrying with a valid scale updates from them.
    router = TopKRouter(8, 4, 1)
    _fill(router, [10, 2, 4, 0])
    for bad in (1.5, float("nan"), torch.tensor(0.5)):
        with pytest.raises(ValueError, match="rate_scale"):
            LossFreeBalancer().step(router, rate_scale=bad)
    assert router.load_counts.tolist() == [10, 2, 4, 0]
    assert router.expert_bias.tolist() == [0.0, 0.0, 0.0, 0.0]
    LossFreeBalancer(update_rate=1e-3).step(router)
    assert router.expert_bias.tolist() == pytest.approx([-1e-3, 1e-3, 0.0, 1e-3])


def test_integers_too_large_for_a_float_are_refused_by_name():
    with pytest.raises(ValueError, match="update_rate"):
        LossFreeBalancer(update_rate=10**400)
    with pytest.raises(ValueError, match="rate_scale"):
        LossFreeBalancer().bias_delta(torch.ones(4), rate_scale=10**400)
    with pytest.raises(ValueError, match="coeff"):
        AuxLossBalancer(coeff=10**400)


def test_step_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        LossFreeBalancer().step(torch.ones(4))
    with pytest.raises(TypeError, match="nn.Module"):
        find_routers([TopKRouter(8, 4, 1)])


def test_a_tensor_or_numpy_float32_rate_is_refused_as_not_an_int_or_float():
    np = pytest.importorskip("numpy")
    for bad in (torch.tensor(1e-3), np.float32(1e-3)):
        with pytest.raises(ValueError, match=r"update_rate must be a number \(int or float\)"):
            LossFreeBalancer(update_rate=bad)
        with pytest.raises(ValueError, match=r"rate_scale must be .*\(int or float\)"):
            LossFreeBalancer().bias_delta(torch.ones(4), rate_scale=bad)
    assert LossFreeBalancer(update_rate=np.float64(1e-3)).update_rate == 1e-3  # a float subclass


# --- Non-finite inputs and loads never move the bias (issue 22) ---

NAN_BATCH = (2, 4, 16)


@pytest.mark.parametrize("bias_mode", ["additive", "multiplicative"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_batch_of_nonfinite_tokens_carries_no_load_and_moves_no_bias(bias_mode, bad):
    router = TopKRouter(16, 8, 2, bias_mode=bias_mode)
    before = router.expert_bias.clone()
    out = router(torch.full(NAN_BATCH, bad))
    assert out.tokens_per_expert.sum().item() == 0
    loads = LossFreeBalancer().step(router)
    assert loads.sum().item() == 0
    assert torch.equal(router.expert_bias, before)


def test_moe_layer_with_a_nan_batch_moves_no_bias():
    layer = MoELayer(16, 32, 8, 2)
    layer(torch.full(NAN_BATCH, float("nan")))
    LossFreeBalancer().step(layer)
    assert torch.equal(layer.router.expert_bias, torch.zeros(8))


def test_only_the_finite_tokens_of_a_batch_are_counted():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2)
    x = torch.randn(2, 4, 16)
    clean = router(x).tokens_per_expert
    router.load_counts.zero_()
    x_bad = torch.cat([x, torch.full((2, 3, 16), float("nan"))], dim=1)  # 3 NaN tokens per sequence
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 1] = False  # padding and NaN exclusions combine
    out = router(x_bad, mask)
    expected = clean - router(x[0, 1].unsqueeze(0)).tokens_per_expert
    assert torch.equal(out.tokens_per_expert, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("update", ["sign", "error"])
@pytest.mark.parametrize("center", [False, True])
def test_nonfinite_loads_give_a_zero_delta(bad, update, center):
    loads = torch.tensor([[3.0, 1.0, bad, 0.0], [4.0, 2.0, 1.0, 1.0]])
    bias = torch.ones(2, 4)
    delta = LossFreeBalancer(update=update, center=center).bias_delta(loads, bias)
    assert torch.equal(delta, torch.zeros(2, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_step_whose_all_reduced_loads_are_not_finite_moves_no_bias(bad):
    routers = nn.ModuleList([TopKRouter(8, 4, 1), TopKRouter(8, 4, 1)])
    _fill(routers[0], [10, 2, 4, 0])
    _fill(routers[1], [10, 2, 4, 0])

    def broken_sum_(loads_LE):  # one garbage entry in one layer's global loads
        loads_LE[1, 3] = bad

    loads = LossFreeBalancer(all_reduce=broken_sum_).step(routers)
    assert not torch.isfinite(loads).all()  # returned as the update saw them
    for router in routers:
        assert torch.equal(router.expert_bias, torch.zeros(4))
