"""Dispatch, capacity dropping, kernel choice, mixed precision and gradients of the experts."""

import pytest
import torch
import torch.nn.functional as F

from moebalance import MoELayer
from moebalance import experts as ex
from moebalance.experts import GroupedExperts, SwiGLU, combine, expert_capacity, expert_compute_plan, permute
from moebalance.train.config import ModelConfig
from moebalance.train.model import MoETransformer


def _kept_pairs(indices_TK, gates_TK, capacity, policy, mask_T=None):
    """Reference: serve each expert's pairs one by one in policy order, keep the first `capacity`."""
    T, K = indices_TK.shape
    pairs = [(t, k) for t in range(T) for k in range(K)]
    pad = (lambda t: False) if mask_T is None else (lambda t: not bool(mask_T[t]))
    if policy == "score":
        pairs.sort(key=lambda p: (pad(p[0]), -gates_TK[p].item()))
    else:
        pairs.sort(key=lambda p: (pad(p[0]), p[0] * K + p[1]))
    taken, kept, dropped = {}, set(), 0
    for t, k in pairs:
        e = int(indices_TK[t, k])
        if taken.get(e, 0) < capacity:
            taken[e] = taken.get(e, 0) + 1
            kept.add((t, k))
        elif not pad(t):
            dropped += 1
    return kept, dropped


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("T,E,K,capacity", [(12, 4, 2, 3), (20, 3, 1, 4), (7, 6, 3, 0), (9, 4, 2, 100)])
@pytest.mark.parametrize("masked", [False, True])
def test_capacity_keeps_the_policy_pairs(policy, T, E, K, capacity, masked):
    gen = torch.Generator().manual_seed(T * E + K)
    scores = torch.rand(T, E, generator=gen)
    scores[:, 0] += 0.5  # expert 0 over-full
    gates, indices = scores.topk(K, dim=-1)
    mask = torch.rand(T, generator=gen) > 0.3 if masked else None
    x = torch.arange(T, dtype=torch.float64)[:, None].expand(T, 2)
    x_ND, d = permute(x, indices, gates, E, capacity, policy, mask)
    kept, dropped = _kept_pairs(indices, gates, capacity, policy, mask)
    got = {(int(t), k) for t, g in zip(d.token_ids, d.gates) for k in range(K) if gates[t, k] == g}
    assert got == kept
    assert int(d.dropped) == dropped
    assert d.counts.sum().item() == x_ND.shape[0] == len(kept)
    assert int(d.counts.max()) <= capacity
    # rows are grouped by expert in expert order
    experts_N = torch.cat([torch.full((int(c),), e) for e, c in enumerate(d.counts)])
    for t, g, e in zip(d.token_ids, d.gates, experts_N):
        assert ((indices[t] == e) & (gates[t] == g)).any()
    assert torch.equal(x_ND[:, 0].long(), d.token_ids)


def test_dropless_permute_is_stable_and_combine_inverts_it():
    indices = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    gates = torch.rand(4, 2)
    x = torch.randn(4, 3)
    x_ND, d = permute(x, indices, gates, 3)
    assert d.token_ids.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]  # expert 0, 1, 2; token order inside
    assert d.counts.tolist() == [3, 2, 3] and int(d.dropped) == 0
    out = combine(x_ND, d, 4)
    torch.testing.assert_close(out, x * gates.sum(1, keepdim=True))


def test_expert_capacity():
    assert expert_capacity(100, 2, 8, 1.0) == 25
    assert expert_capacity(100, 2, 8, 1.25) == 32  # ceil(31.25)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(100, 2, 8, 0.0)


@pytest.mark.parametrize(
    "T,K,E,cf,expected",
    [
        (100, 1, 11, 1.1, 10),  # 1.1 * 100 / 11 = 10.000000000000002 in floating point
        (100, 1, 11, 1.11, 11),  # 10.09...: a real fraction still rounds up
        (64, 2, 8, 1.0, 16),
        (5, 2, 2, 4.0, 5),  # at most T
        (16, 2, 8, 1e300, 16),  # a huge factor is dropless, not an OverflowError
        (0, 2, 8, 1.0, 0),
    ],
)
def test_one_capacity_rule_for_token_and_expert_choice(T, K, E, cf, expected):
    from moebalance.routing import expert_choice_capacity

    assert expert_capacity(T, K, E, cf) == expected
    assert expert_choice_capacity(T, E, K, cf) == expected


def test_layer_with_a_huge_capacity_factor_is_dropless():
    torch.manual_seed(0)
    dropless = MoELayer(16, 32, 8, 2).double()
    huge = MoELayer(16, 32, 8, 2, capacity_factor=1e300).double()
    huge.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = huge(x)
    assert int(out.dropped_tokens) == 0
    torch.testing.assert_close(out.output, dropless(x).output)


def _combine_error_ratio(y_ND, d, num_tokens):
    """Mean error of ``combine`` against a float64 reference, over that of rounding the reference once."""
    ref = torch.zeros(num_tokens, y_ND.shape[-1], dtype=torch.float64)
    ref.index_add_(0, d.token_ids, y_ND.double() * d.gates.double().unsqueeze(-1))
    err = (combine(y_ND, d, num_tokens).double() - ref).abs().mean()
    one_rounding = (ref.to(y_ND.dtype).double() - ref).abs().mean()
    return float(err / one_rounding)


def test_combine_sums_in_float32_and_rounds_once(monkeypatch):
    # The case: MoELayer(64, 128, 16, 8, softmax) in bf16, 256 tokens, experts computing in
    # bf16 (what a GPU or a CPU with native bf16 does; forced here). Summing the 8 weighted bf16
    # outputs in bf16 gave 1.8-1.9x the error of one rounding; float32 then one cast gives 1.0x.
    monkeypatch.setattr(ex, "_cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    layer = MoELayer(64, 128, 16, 8, score_func="softmax").to(torch.bfloat16)
    x = torch.randn(256, 64).to(torch.bfloat16)
    with torch.no_grad():
        routing = layer.router(x)
        x_ND, d = permute(x, routing.indices, routing.gates, 16)
        y_ND = layer.experts(x_ND, d.counts)
    assert y_ND.dtype == torch.bfloat16
    assert _combine_error_ratio(y_ND, d, 256) <= 1.05
    assert combine(y_ND, d, 256).dtype == torch.bfloat16


def test_combine_keeps_float64():
    torch.manual_seed(0)
    y = torch.randn(6, 4, dtype=torch.float64)
    d = ex.Dispatch(torch.tensor([0, 0, 1, 1, 2, 2]), torch.rand(6), torch.tensor([2, 2, 2]))
    out = combine(y, d, 3)  # float64 outputs are not narrowed to the float32 accumulator
    ref = torch.zeros(3, 4, dtype=torch.float64).index_add_(0, d.token_ids, y * d.gates.double().unsqueeze(-1))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_layer_with_capacity_matches_reference_and_counts_drops(policy):
    torch.manual_seed(3)
    T, D, Fh, E, K = 24, 8, 16, 4, 2
    layer = MoELayer(D, Fh, E, K, capacity_factor=0.75, drop_policy=policy).double()
    layer.router.expert_bias[1] = 5.0  # expert 1 over-full
    x = torch.randn(T, D, dtype=torch.float64)
    out = layer(x)
    r = out.routing
    kept, dropped = _kept_pairs(r.indices, r.gates, expert_capacity(T, K, E, 0.75), policy)
    assert dropped > 0 and int(out.dropped_tokens) == dropped == int(r.dropped_tokens)
    assert int(r.tokens_per_expert.sum()) == T * K  # the load before dropping
    e = layer.experts
    ref = torch.zeros_like(x)
    for t, k in kept:
        i, u = r.indices[t, k], x[t]
        ref[t] += r.gates[t, k] * (e.w2[i] @ (F.silu(e.w1[i] @ u) * (e.w3[i] @ u)))
    torch.testing.assert_close(out.output, ref)


def test_capacity_validation():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(8, 8, 4, 2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="drop_policy"):
        MoELayer(8, 8, 4, 2, capacity_factor=1.0, drop_policy="random")
    with pytest.raises(ValueError, match="model.capacity_factor"):
        ModelConfig(capacity_factor=-1.0)
    with pytest.raises(ValueError, match="model.drop_policy"):
        ModelConfig(drop_policy="random")


def test_model_reports_dropped_tokens():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, top_k=2, d_expert=16, capacity_factor=0.5)
    out = MoETransformer(cfg)(torch.randint(0, 64, (2, 16)))
    assert all(int(r.dropped_tokens) >= 2 * 16 * 2 // 2 for r in out.routing)  # half the pairs at least
    dropless = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, d_expert=16))
    assert all(int(r.dropped_tokens) == 0 for r in dropless(torch.randint(0, 64, (2, 16))).routing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_stride0_gradient_reaches_the_experts(dtype, use_grouped_mm):
    """``grouped_mm``'s backward rejects the stride-0 gradient of ``out.sum()``; the experts must not."""
    experts = GroupedExperts(4, 16, 32, use_grouped_mm).to(dtype)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    experts(x, counts).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    assert experts.w2.grad[1].abs().sum() == 0  # the empty expert gets no gradient
    assert experts.w2.grad[0].abs().sum() > 0


def test_compute_plan_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert expert_compute_plan(cpu, torch.float32, 64, 128) == ("grouped_mm", torch.float32)
    assert expert_compute_plan(cpu, torch.float32, 64, 128, use_grouped_mm=False) == ("loop", torch.float32)
    assert expert_compute_plan(cpu, torch.float64, 64, 128) == ("loop", torch.float64)
    assert expert_compute_plan(cpu, torch.float32, 64, 6)[0] == "loop"  # 24-byte rows: unaligned
    assert expert_compute_plan(cuda, torch.bfloat16, 64, 128) == ("grouped_mm", torch.bfloat16)
    assert expert_compute_plan(cuda, torch.float32, 64, 128) == ("loop", torch.float32)
    monkeypatch.setattr(ex, "_cpu_has_native_bf16", lambda: False)
    assert expert_compute_plan(cpu, torch.bfloat16, 64, 128) == ("grouped_mm", torch.float32)
    monkeypatch.setattr(ex, "_cpu_has_native_bf16", lambda: True)
    assert expert_compute_plan(cpu, torch.bfloat16, 64, 128) == ("grouped_mm", torch.bfloat16)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_autocast(native_bf16, monkeypatch):
    monkeypatch.setattr(ex, "_cpu_has_native_bf16", lambda: native_bf16)
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2, num_shared_experts=1)
    layer.router.expert_bias.copy_(torch.randn(8) * 0.1)
    layer.train()
    x = torch.randn(2, 12, 16, requires_grad=True)
    ref = layer(x).output
    layer.router.load_counts.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    r = out.routing
    for t in (r.logits, r.scores, r.gates, layer.router.expert_bias, layer.router.load_counts):
        assert t.dtype == torch.float32
    assert layer.router.load_counts.sum().item() == 2 * 12 * 2
    assert out.output.dtype == torch.float32 and out.output.shape == x.shape
    torch.testing.assert_close(out.output, ref, rtol=0.05, atol=0.02)
    out.output.sum().backward()  # stride-0 gradient under autocast too
    assert torch.isfinite(x.grad).all() and layer.experts.w1.grad.dtype == torch.float32


def test_bf16_weights_grouped_and_loop_agree():
    torch.manual_seed(2)
    a = MoELayer(16, 32, 4, 2).to(torch.bfloat16)
    b = MoELayer(16, 32, 4, 2, use_grouped_mm=False).to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    ya, yb = a(x).output, b(x).output
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-2)


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_bf16_weights_computed_in_float32_keep_bf16_memory_and_exact_gradients(use_grouped_mm, monkeypatch):
    monkeypatch.setattr(ex, "_cpu_has_native_bf16", lambda: False)
    torch.manual_seed(4)
    E, D, Fh = 8, 16, 32
    low = GroupedExperts(E, D, Fh, use_grouped_mm).to(torch.bfloat16)
    ref = GroupedExperts(E, D, Fh, use_grouped_mm)
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    counts = torch.tensor([4, 0, 6, 2, 3, 1, 0, 4])
    x = torch.randn(20, D).to(torch.bfloat16)
    x_low, x_ref = x.clone().requires_grad_(), x.float().requires_grad_()
    g = torch.randn(20, D)
    y_low, saved = _saved_bytes(lambda: low(x_low, counts))
    weights_fp32 = 3 * E * Fh * D * 4
    assert 0 < saved < weights_fp32  # outer hooks still see the saves; no float32 weight copy is held
    y_ref = ref(x_ref, counts)
    torch.testing.assert_close(y_low, y_ref)  # same float32 compute
    (y_low * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x_low.grad, x_ref.grad.to(torch.bfloat16))
    for a, b in zip(low.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad.to(torch.bfloat16))


@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_bf16_on_cpu_without_bf16_gemms_computes_in_float32(autocast, monkeypatch):
    # Shared experts and dense layers follow the routed experts' plan: native bf16 GEMMs are
    # emulated (and 20-30x slower) on such CPUs.
    monkeypatch.setattr(ex, "_cpu_has_native_bf16", lambda: False)
    torch.manual_seed(5)
    D, Fh, N = 64, 128, 4  # few rows: float32 weight copies would outweigh all activations
    ref = SwiGLU(D, Fh)
    low = SwiGLU(D, Fh)
    low.load_state_dict(ref.state_dict())
    if not autocast:
        low.to(torch.bfloat16)
        ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x = torch.randn(N, D).to(torch.bfloat16)
    x_low, x_ref = x.clone().requires_grad_(), x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_low, saved = _saved_bytes(lambda: low(x_low))
    assert y_low.dtype == torch.bfloat16
    y_ref = ref(x_ref)
    torch.testing.assert_close(y_low, y_ref.to(torch.bfloat16))  # float32 compute, rounded once
    if not autocast:
        assert saved < 3 * Fh * D * 4  # the bf16 weights are kept, not float32 copies
    g = torch.randn(N, D)
    (y_low.float() * g).sum().backward()
    (y_ref.to(torch.bfloat16).float() * g).sum().backward()
    torch.testing.assert_close(x_low.grad, x_ref.grad.to(torch.bfloat16))
    for a, b in zip(low.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad.to(a.grad.dtype))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float64), (torch.float64, torch.float32)])
def test_mixed_input_and_weight_dtypes_with_a_shared_expert(x_dtype, w_dtype):
    # Shared expert or not, a layer takes an input of another dtype than its weights (promoted
    # compute) and answers in the input's dtype.
    torch.manual_seed(6)
    ref = MoELayer(16, 32, 4, 2, num_shared_experts=1)
    layer = MoELayer(16, 32, 4, 2, num_shared_experts=1).to(w_dtype)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 16).to(x_dtype)
    out = layer(x).output
    assert out.dtype == x_dtype
    tol = dict(rtol=3e-2, atol=3e-2) if torch.bfloat16 in (x_dtype, w_dtype) else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref(x.float()).output, **tol)
    shared = SwiGLU(16, 32).to(w_dtype)
    assert shared(x).dtype == torch.promote_types(x_dtype, w_dtype)
