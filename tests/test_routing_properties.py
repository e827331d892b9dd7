"""Property tests (hypothesis) of the routing core: routing, counting, the bias update, MaxVio.

Random shapes, scores, biases and masks; each property is a sentence of arXiv 2408.15664 or of
SPEC.md. Tensors are drawn from a seeded torch generator so an example shrinks to a few integers.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebalance.balancing import LossFreeBalancer
from moebalance.metrics import max_violation
from moebalance.routing import TopKRouter, count_tokens_per_expert, route_topk

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routing_case(draw, grouped: bool = False):
    """(scores [T, E], bias [E], K, n_group, topk_group, mask [T])."""
    if grouped:
        n_group = draw(st.integers(2, 4))
        per_group = draw(st.integers(1, 4))
        num_experts = n_group * per_group
        topk_group = draw(st.integers(1, n_group))
        top_k = draw(st.integers(1, topk_group * per_group))
    else:
        num_experts = draw(st.integers(1, 12))
        n_group = topk_group = 1
        top_k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 5.0]))
    scores = torch.rand(tokens, num_experts, generator=gen)
    bias = (torch.rand(num_experts, generator=gen) * 2 - 1) * scale  # may push biased scores negative
    if draw(st.booleans()):  # ties are common with real (saturated) scores
        scores = (scores * 4).round() / 4
    mask = torch.rand(tokens, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return scores, bias, top_k, n_group, topk_group, mask


@SETTINGS
@given(st.one_of(routing_case(), routing_case(grouped=True)))
def test_exactly_k_distinct_experts_per_token(case):
    scores, bias, top_k, n_group, topk_group, _ = case
    idx = route_topk(scores, top_k, bias, n_group=n_group, topk_group=topk_group)
    assert idx.shape == (scores.shape[0], top_k)
    assert ((idx >= 0) & (idx < scores.shape[1])).all()
    assert all(len(set(row)) == top_k for row in idx.tolist())


@SETTINGS
@given(routing_case(grouped=True))
def test_group_limited_routing_never_picks_a_dropped_group(case):
    scores, bias, top_k, n_group, topk_group, _ = case
    idx = route_topk(scores, top_k, bias, n_group=n_group, topk_group=topk_group)
    assert all(len(set(row)) == top_k for row in idx.tolist())
    per_group = scores.shape[1] // n_group
    biased = (scores + bias).view(scores.shape[0], n_group, per_group)
    group_score = biased.topk(min(2, per_group), dim=-1).values.sum(-1)  # [T, n_group]
    for t, row in enumerate(idx.tolist()):
        groups = {i // per_group for i in row}
        assert len(groups) <= topk_group
        for g in groups:  # a chosen group is among the topk_group best (ties allowed)
            assert (group_score[t] > group_score[t, g]).sum() < topk_group


@SETTINGS
@given(routing_case(), st.booleans(), st.sampled_from([1.0, 2.5]), st.sampled_from(["sigmoid", "softmax"]))
def test_gates_come_from_unbiased_scores(case, norm, scale, score_func):
    scores, bias, top_k, _, _, _ = case
    num_tokens, num_experts = scores.shape
    norm = norm and top_k > 1  # top-1 with normalised gates is refused (tests/test_any_loop.py)
    router = TopKRouter(8, num_experts, top_k, score_func, norm_topk_prob=norm, route_scale=scale)
    router.expert_bias.copy_(bias)
    x = torch.randn(num_tokens, 8)
    out = router(x)
    expected = out.scores.gather(1, out.indices)
    if norm and top_k > 1:
        expected = expected / (expected.sum(-1, keepdim=True) + 1e-20)
    torch.testing.assert_close(out.gates, expected * scale, rtol=0, atol=0)
    # ... and those scores are G(logits) alone (no bias term), eq. 1.
    torch.testing.assert_close(out.scores, torch.sigmoid(out.logits) if score_func == "sigmoid" else torch.softmax(out.logits, -1))


@SETTINGS
@given(routing_case())
def test_counts_sum_to_k_times_unmasked_tokens(case):
    scores, bias, top_k, _, _, mask = case
    idx = route_topk(scores, top_k, bias)
    counts = count_tokens_per_expert(idx, scores.shape[1], mask)
    assert counts.dtype == torch.int64 and counts.shape == (scores.shape[1],)
    assert counts.sum().item() == top_k * int(mask.sum())
    reference = torch.zeros(scores.shape[1], dtype=torch.int64)
    for t in range(idx.shape[0]):
        if mask[t]:
            for i in idx[t]:
                reference[i] += 1
    assert torch.equal(counts, reference)


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 12),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1e-4, 1e-3, 1e-2, 0.5]),
    st.integers(1, 5),
)
def test_update_moves_each_bias_by_at_most_u(layers, num_experts, seed, rate, steps):
    gen = torch.Generator().manual_seed(seed)
    routers = torch.nn.ModuleList(TopKRouter(4, num_experts, 1) for _ in range(layers))
    for r in routers:
        r.expert_bias.copy_(torch.randn(num_experts, generator=gen))
    balancer = LossFreeBalancer(rate, "sign")
    for _ in range(steps):
        before = torch.stack([r.expert_bias.clone() for r in routers])
        for r in routers:
            r.load_counts.copy_(torch.randint(0, 50, (num_experts,), generator=gen).float())
        loads = balancer.step(routers)
        after = torch.stack([r.expert_bias for r in routers])
        moved = (after - before).abs()
        # float32 rounding of b + u can add at most half an ulp of b
        assert (moved <= rate + before.abs() * torch.finfo(torch.float32).eps).all()
        mean = loads.mean(-1, keepdim=True)
        assert ((moved > 0) == (loads != mean)).all()  # sign(e_i) = 0 exactly at the mean load
        assert not any(r.load_counts.any() for r in routers)  # counters cleared


@SETTINGS
@given(routing_case(), st.sampled_from(["additive", "multiplicative"]))
def test_bias_has_no_gradient(case, bias_mode):
    scores, bias, top_k, _, _, mask = case
    router = TopKRouter(8, scores.shape[1], top_k, bias_mode=bias_mode)
    router.expert_bias.copy_(bias)
    out = router(torch.randn(scores.shape[0], 8, requires_grad=True), mask)
    (out.gates * torch.randn_like(out.gates)).sum().backward()
    assert router.weight.grad is not None
    assert not router.expert_bias.requires_grad and router.expert_bias.grad is None
    assert all(p is not router.expert_bias for p in router.parameters())
    assert router.expert_bias.dtype == torch.float32


@SETTINGS
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=16), st.booleans())
def test_maxvio_is_zero_exactly_when_loads_are_equal(loads, make_equal):
    if make_equal:
        loads = [loads[0]] * len(loads)
    vio = max_violation(torch.tensor(loads))
    equal = len(set(loads)) == 1
    assert (vio.item() == 0.0) == equal
    assert vio.item() >= 0.0
