import pytest
import torch

from moebalance.routing import TopKRouter, count_tokens_per_expert, route_topk

SHAPES = [  # (T, D, E, K)
    (1, 8, 4, 1),
    (7, 16, 8, 2),
    (33, 8, 16, 6),
    (5, 4, 3, 3),
]


@pytest.mark.parametrize("T,D,E,K", SHAPES)
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_output_shapes_and_counts(T, D, E, K, score_func):
    router = TopKRouter(D, E, K, score_func=score_func)
    out = router(torch.randn(T, D))
    assert out.gates.shape == (T, K) and out.gates.dtype == torch.float32
    assert out.indices.shape == (T, K) and out.indices.dtype == torch.int64
    assert out.scores.shape == (T, E)
    assert out.tokens_per_expert.shape == (E,) and out.tokens_per_expert.dtype == torch.int64
    assert out.tokens_per_expert.sum().item() == K * T
    # K distinct experts per token
    assert all(len(set(row.tolist())) == K for row in out.indices)


def test_bias_changes_choice_not_gates():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2, score_func="sigmoid")
    x = torch.randn(64, 16)
    before = router(x)
    router.expert_bias[3] = 10.0  # every token now picks expert 3
    after = router(x)
    assert (after.indices == 3).any(dim=1).all()
    assert not torch.equal(before.indices, after.indices)
    # gate of each chosen expert is exactly its unbiased score
    torch.testing.assert_close(after.gates, after.scores.gather(1, after.indices), rtol=0, atol=0)
    torch.testing.assert_close(after.scores, before.scores, rtol=0, atol=0)
    # counts follow the biased choice
    assert after.tokens_per_expert[3].item() == 64
    assert torch.equal(after.tokens_per_expert, count_tokens_per_expert(after.indices, 8))


def test_norm_topk_and_route_scale_use_unbiased_scores():
    router = TopKRouter(8, 6, 3, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5)
    router.expert_bias.copy_(torch.linspace(-1, 1, 6))
    out = router(torch.randn(10, 8))
    raw = out.scores.gather(1, out.indices)
    torch.testing.assert_close(out.gates, 2.5 * raw / raw.sum(-1, keepdim=True))


def test_bias_gets_no_gradient_and_is_not_a_parameter():
    router = TopKRouter(8, 4, 2)
    assert "expert_bias" not in dict(router.named_parameters())
    assert "expert_bias" in router.state_dict()
    assert "load_counts" not in router.state_dict()
    out = router(torch.randn(5, 8, requires_grad=True))
    (out.gates * torch.randn_like(out.gates)).sum().backward()
    assert router.expert_bias.grad is None and not router.expert_bias.requires_grad
    assert router.weight.grad is not None


def test_bias_stays_float32_after_bf16_cast():
    router = TopKRouter(8, 4, 2).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32
    assert router.load_counts.dtype == torch.float32
    router.expert_bias.fill_(1.0)
    router.expert_bias += 1e-3
    assert router.expert_bias[0].item() == pytest.approx(1.001, abs=1e-6)
    router.half().double()
    assert router.expert_bias.dtype == torch.float32


def test_counts_only_in_training_mode():
    router = TopKRouter(8, 4, 2)
    x = torch.randn(6, 8)
    router.eval()
    router(x)
    assert router.load_counts.sum().item() == 0
    router.train()
    out = router(x)
    assert torch.equal(router.load_counts, out.tokens_per_expert.float())


def test_counts_only_with_grad_enabled():
    # an RL rollout or generate() in training mode runs under no_grad / inference_mode: it trains
    # nothing, so its tokens must not enter the next bias update (Megatron-Core counts the same way)
    router = TopKRouter(8, 4, 2).train()
    x = torch.randn(6, 8)
    with torch.no_grad():
        router(x)
    with torch.inference_mode():
        router(x)
    assert router.load_counts.sum().item() == 0
    out = router(x)
    assert torch.equal(router.load_counts, out.tokens_per_expert.float())
    with torch.no_grad(), torch.enable_grad():  # what counts is the grad mode of the forward
        router(x)
    assert torch.equal(router.load_counts, 2 * out.tokens_per_expert.float())


def test_mask_excludes_padding():
    router = TopKRouter(8, 4, 2)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = router(x, mask)
    assert out.tokens_per_expert.sum().item() == 2 * 8
    assert out.seq_len == 5


def test_batched_input_equals_flat():
    router = TopKRouter(8, 4, 2)
    x = torch.randn(3, 4, 8)
    a, b = router(x), router(x.view(12, 8))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.gates, b.gates)


def test_multiplicative_bias_starts_at_one():
    router = TopKRouter(8, 4, 2, bias_mode="multiplicative")
    assert torch.equal(router.expert_bias, torch.ones(4))
    scores = torch.rand(5, 4)
    assert torch.equal(route_topk(scores, 2, router.expert_bias, bias_mode="multiplicative"), scores.topk(2).indices)


def test_group_limited_routing_masks_with_minus_inf():
    # 2 groups of 2; negative biased scores must not let a dropped group win through a 0 fill.
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.05]])
    bias = torch.tensor([-5.0, -5.0, 0.0, 0.0])
    idx = route_topk(scores, 2, bias, n_group=2, topk_group=1)
    assert sorted(idx[0].tolist()) == [2, 3]
    idx = route_topk(scores, 2, None, n_group=2, topk_group=1)
    assert sorted(idx[0].tolist()) == [0, 1]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_experts=0, top_k=1), "num_experts"),
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, top_k=0), "top_k"),
        (dict(num_experts=4, top_k=2, score_func="relu"), "score_func"),
        (dict(num_experts=4, top_k=2, route_scale=0.0), "route_scale"),
        (dict(num_experts=6, top_k=2, n_group=4), "n_group"),
        (dict(num_experts=8, top_k=2, n_group=2, topk_group=3), "topk_group"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TopKRouter(8, **kwargs)


@pytest.mark.parametrize("bad", [1.5, True])
def test_top_k_must_be_an_integer(bad):
    with pytest.raises(ValueError, match="top_k must be an integer"):
        TopKRouter(8, 4, bad)


def test_router_rejects_integer_input_and_bad_shapes():
    router = TopKRouter(8, 4, 2)
    with pytest.raises(ValueError, match="floating-point"):
        router(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[T, d_model=8\]"):
        router(torch.ones(2, 3, 4, 8))


def test_infinite_scale_rejected():
    with pytest.raises(ValueError, match="route_scale"):
        TopKRouter(8, 4, 2, route_scale=float("inf"))
    with pytest.raises(ValueError, match="route_scale must be a number"):
        TopKRouter(8, 4, 2, route_scale="2.5")
