"""Our formulas against their counterparts in `transformers` (test-only dependency, tiny configs,
nothing downloaded).

* Mixtral ``load_balancing_loss_func`` = ``K * batch_aux_loss`` over all layers' tokens
  concatenated (see :func:`moebalance.losses.batch_aux_loss`).
* ``DeepseekV3TopkRouter`` (sigmoid scores + ``e_score_correction_bias``, group-limited, normalised
  and scaled gates) = :class:`moebalance.routing.TopKRouter` with ``bias_mode="additive"``.
"""

import pytest
import torch

# transformers is a test-only dependency (the `dev` extra); DeepSeek-V3 arrived in its 4.5x line.
load_balancing_loss_func = pytest.importorskip("transformers.models.mixtral.modeling_mixtral").load_balancing_loss_func
_ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
DeepseekV3Config, DeepseekV3TopkRouter = _ds.DeepseekV3Config, _ds.DeepseekV3TopkRouter

from moebalance.losses import batch_aux_loss  # noqa: E402
from moebalance.routing import TopKRouter, route_topk  # noqa: E402


@pytest.mark.parametrize("E,K,layers", [(4, 1, 1), (8, 2, 2), (6, 3, 3)])
@pytest.mark.parametrize("padded", [False, True])
def test_mixtral_load_balancing_loss(E, K, layers, padded):
    B, S = 3, 5
    gate_logits = tuple(torch.randn(B * S, E) for _ in range(layers))
    mask_BS = torch.ones(B, S, dtype=torch.long)
    if padded:
        mask_BS[0, 3:] = 0
        mask_BS[2, 1:] = 0
    theirs = load_balancing_loss_func(gate_logits, E, K, mask_BS if padded else None)
    # Mixtral pools the layers: f and P over the concatenation of every layer's tokens.
    scores = torch.cat(gate_logits).softmax(-1)
    indices = route_topk(scores, K)
    mask = mask_BS.reshape(-1).bool().repeat(layers) if padded else None
    ours = batch_aux_loss(scores, indices, mask)
    torch.testing.assert_close(ours * K, theirs)


def test_mixtral_balanced_value_is_top_k():
    E, K = 4, 2
    # Identical logits per token would tie; a cyclic pattern gives every expert the same load.
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0]] * 4)
    theirs = load_balancing_loss_func((logits,), E, K)
    ours = batch_aux_loss(logits.softmax(-1), route_topk(logits.softmax(-1), K))
    torch.testing.assert_close(ours, torch.tensor(1.0))
    torch.testing.assert_close(theirs, torch.tensor(float(K)))


def _pair(E=8, K=2, n_group=4, topk_group=2, norm=True, scale=2.5, D=16):
    hf_cfg = DeepseekV3Config(
        hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm, routed_scaling_factor=scale,
    )
    theirs = DeepseekV3TopkRouter(hf_cfg)
    ours = TopKRouter(D, E, K, "sigmoid", norm, scale, "additive", n_group, topk_group)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    return ours, theirs


def _by_expert(indices, gates):
    order = indices.argsort(-1)
    return indices.gather(-1, order), gates.gather(-1, order)


@pytest.mark.parametrize("E,K,n_group,topk_group,norm,scale", [(8, 2, 4, 2, True, 2.5), (8, 3, 2, 1, False, 1.0), (16, 4, 4, 3, True, 1.0), (6, 2, 1, 1, True, 1.0)])
def test_deepseek_v3_router_matches(E, K, n_group, topk_group, norm, scale):
    ours, theirs = _pair(E, K, n_group, topk_group, norm, scale)
    bias = 0.05 * torch.rand(E)  # biased scores stay positive: zero-filling would change nothing
    ours.expert_bias.copy_(bias)
    theirs.e_score_correction_bias.copy_(bias)
    x = torch.randn(32, 16)
    out = ours(x)
    logits, gates, indices = theirs(x)
    torch.testing.assert_close(out.logits, logits)
    i1, g1 = _by_expert(out.indices, out.gates)
    i2, g2 = _by_expert(indices, gates)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(g1, g2)


def _zero_fill_route(scores, bias, K, n_group, topk_group):
    """The group masking of transformers 4.x's DeepseekV3 router: dropped groups set to 0."""
    choice = scores + bias
    T, E = choice.shape
    groups = choice.view(T, n_group, E // n_group)
    keep = groups.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    mask = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, keep, True)
    return groups.masked_fill(~mask[..., None], 0.0).view(T, E).topk(K, dim=-1).indices


def test_dropped_groups_never_win_with_negative_biases():
    """With biases below -1 every biased score is negative, and a 0-filled dropped group would beat
    every kept expert. We mask with -inf (as transformers 5.x does); 4.x's zero fill differs."""
    E, K, n_group, topk_group = 8, 2, 4, 2
    ours, theirs = _pair(E, K, n_group, topk_group)
    bias = -1.5 - 0.1 * torch.rand(E)
    ours.expert_bias.copy_(bias)
    theirs.e_score_correction_bias.copy_(bias)
    x = torch.randn(32, 16)
    out = ours(x)
    choice = (out.scores + bias).view(32, n_group, E // n_group)
    kept_groups = choice.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    chosen_groups = out.indices // (E // n_group)
    assert all(set(c.tolist()) <= set(k.tolist()) for c, k in zip(chosen_groups, kept_groups))
    zero_filled = _zero_fill_route(out.scores, bias, K, n_group, topk_group)
    assert not torch.equal(zero_filled.sort(-1).values, out.indices.sort(-1).values)  # the input matters
    _, _, hf_indices = theirs(x)
    hf_sorted = hf_indices.sort(-1).values
    # transformers >= 5 masks with -inf and agrees with us; an older, zero-filling one agrees with
    # the zero-fill reference instead (the documented, deliberate difference).
    assert torch.equal(hf_sorted, out.indices.sort(-1).values) or torch.equal(hf_sorted, zero_filled.sort(-1).values)
