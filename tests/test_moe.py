import pytest
import torch
import torch.nn.functional as F

from moebalance import LossFreeBalancer, MoELayer, max_violation


def reference_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Token-by-token eq. 1: h_t = sum_i g_{i,t} FFN_i(u_t) (+ shared)."""
    r = layer.router(x_TD)
    e = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(r.indices.shape[1]):
            i = r.indices[t, k]
            u = x_TD[t]
            ffn = e.w2[i] @ (F.silu(e.w1[i] @ u) * (e.w3[i] @ u))
            out[t] += r.gates[t, k] * ffn
    if layer.shared_experts is not None:
        out += layer.shared_experts(x_TD)
    return out


SHAPES = [  # (T, D, F, E, K, shared)
    (1, 8, 16, 4, 1, 0),
    (13, 8, 16, 4, 2, 0),
    (32, 16, 8, 8, 3, 1),
    (9, 4, 4, 6, 6, 2),
]


@pytest.mark.parametrize("T,D,Fh,E,K,shared", SHAPES)
@pytest.mark.parametrize("grouped", [True, False])
def test_matches_token_loop(T, D, Fh, E, K, shared, grouped):
    layer = MoELayer(D, Fh, E, K, num_shared_experts=shared, use_grouped_mm=grouped).double()
    layer.router.expert_bias.copy_(torch.randn(E))  # the bias must not leak into the output weights
    x = torch.randn(T, D, dtype=torch.float64)
    got = layer(x).output
    torch.testing.assert_close(got, reference_moe(layer, x))


def test_grouped_and_loop_agree_with_gradients():
    torch.manual_seed(1)
    a = MoELayer(16, 32, 8, 2, use_grouped_mm=True)
    b = MoELayer(16, 32, 8, 2, use_grouped_mm=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 10, 16)
    w = torch.randn(4, 10, 16)
    (a(x).output * w).sum().backward()
    (b(x).output * w).sum().backward()
    torch.testing.assert_close(a(x).output, b(x).output, rtol=1e-5, atol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5)


def test_shape_preserved_and_empty_experts():
    layer = MoELayer(8, 16, 16, 1)
    layer.router.expert_bias[0] = 100.0  # every token to expert 0, the other 15 get nothing
    x = torch.randn(2, 3, 8)
    out = layer(x)
    assert out.output.shape == x.shape
    assert out.routing.tokens_per_expert[0].item() == 6
    out.output.sum().backward()  # a stride-0 upstream gradient must be fine too


def test_bf16_autocast_keeps_router_in_float32():
    layer = MoELayer(16, 32, 4, 2)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.routing.scores.dtype == torch.float32
    assert out.routing.gates.dtype == torch.float32
    assert layer.router.expert_bias.dtype == torch.float32


def _skewed_layer(seed: int) -> tuple[MoELayer, torch.Tensor]:
    torch.manual_seed(seed)
    d, num_experts = 16, 8
    layer = MoELayer(d, 32, num_experts, 2)
    direction = torch.randn(d)
    direction /= direction.norm()
    with torch.no_grad():  # router strongly prefers experts 0 and 1 for inputs along `direction`
        skew = torch.tensor([2.0, 1.5] + [-1.5] * (num_experts - 2))
        layer.router.weight.copy_(skew[:, None] * direction[None, :] + 0.3 * torch.randn(num_experts, d))
    return layer, direction


def _train_layer(layer: MoELayer, direction: torch.Tensor, balancer, steps: int = 120) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    target = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    vio = []
    for _ in range(steps):
        x = direction + 0.5 * torch.randn(64, 16, generator=gen)
        loss = F.mse_loss(layer(x).output, target(x).detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
        loads = balancer.step(layer) if balancer else layer.router.load_counts.clone()
        layer.router.load_counts.zero_()
        vio.append(max_violation(loads).item())
    return vio


def test_loss_free_balancing_undoes_a_skewed_start():
    layer, direction = _skewed_layer(0)
    lf = _train_layer(layer, direction, LossFreeBalancer(update_rate=1e-2))
    layer, direction = _skewed_layer(0)
    none = _train_layer(layer, direction, None)
    start = lf[0]
    assert start > 2.5  # two of eight experts take everything: MaxVio = 3
    assert sum(lf[-20:]) / 20 < 0.25 * start
    assert sum(none[-20:]) / 20 > 0.8 * start
