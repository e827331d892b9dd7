"""Bad calls to the library's public API: each is refused with a ValueError or TypeError whose
message names the argument (issue 22, "Library calls: a clear error, never a silent wrong answer").

One table, one row per bad call: ``(argument named in the message, call)``. The calls cover the
arguments of every public function and class of the library floor (routing, balancing, losses,
metrics, experts, moe): wrong types (a float size, a string flag, a non-tensor), values outside
the range, tensors of the wrong rank, shape or dtype, and masks with the right number of entries
in the wrong shape. Before issue 22 many of them raised an obscure error deep in PyTorch
(``ZeroDivisionError``, ``AttributeError``, ``empty(): argument 'size'``) or returned a wrong answer.
"""

import math

import pytest
import torch
from torch import nn

from moebalance import (
    AuxLossBalancer,
    Balancing,
    ExpertChoiceRouter,
    LossFreeBalancer,
    MoELayer,
    TopKRouter,
    batch_aux_loss,
    global_batch_aux_loss,
    importance_loss,
    max_violation,
    router_z_loss,
    sequence_aux_loss,
)
from moebalance.balancing import (
    GlobalBatchCounts,
    OptimizerHook,
    find_routers,
    pop_expert_loads,
    sum_over_default_group_,
    unwrap_optimizer,
)
from moebalance.experts import (
    Dispatch,
    GroupedExperts,
    SwiGLU,
    combine,
    expert_capacity,
    expert_compute_plan,
    permute,
)
from moebalance.losses import expert_counts, normalize_scores
from moebalance.metrics import coefficient_of_variation, dead_experts, load_share
from moebalance.routing import (
    chosen_experts,
    count_tokens_per_expert,
    expert_choice_capacity,
    route_expert_choice,
    route_topk,
)

T, D, E, K = 4, 16, 8, 2
NAN = float("nan")


def scores():
    return torch.rand(T, E)


def ids(*rows):
    return torch.tensor(rows) if rows else torch.randint(0, E, (T, K))


def loads(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def sgd():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def topk_output(x=None):
    return TopKRouter(D, E, K)(torch.randn(2, 2, D) if x is None else x)


def expert_choice_output():
    return ExpertChoiceRouter(D, E, K)(torch.randn(2, 2, D))


def dispatch(n=T * K):
    return Dispatch(torch.arange(n) % T, torch.rand(n), torch.full((E,), n // E))


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


TRANSPOSED_MASK = torch.ones(3, 2, dtype=torch.bool)  # [S, B] for a [B=2, S=3] batch

BAD_CALLS = [
    # --- TopKRouter / ExpertChoiceRouter construction ---
    ("d_model", lambda: TopKRouter(16.5, E, K)),
    ("d_model", lambda: TopKRouter(0, E, K)),
    ("d_model", lambda: TopKRouter(True, E, K)),
    ("d_model", lambda: TopKRouter("16", E, K)),
    ("num_experts", lambda: TopKRouter(D, 0, 1)),
    ("num_experts", lambda: TopKRouter(D, 8.0, K)),
    ("top_k", lambda: TopKRouter(D, E, 0)),
    ("top_k", lambda: TopKRouter(D, E, 9)),
    ("top_k", lambda: TopKRouter(D, E, 2.0)),
    ("score_func", lambda: TopKRouter(D, E, K, score_func="relu")),
    ("norm_topk_prob", lambda: TopKRouter(D, E, K, norm_topk_prob="no")),
    ("norm_topk_prob", lambda: TopKRouter(D, E, K, norm_topk_prob=1)),
    ("norm_topk_prob", lambda: TopKRouter(D, E, K, norm_topk_prob=None)),
    ("route_scale", lambda: TopKRouter(D, E, K, route_scale=0)),
    ("route_scale", lambda: TopKRouter(D, E, K, route_scale=NAN)),
    ("route_scale", lambda: TopKRouter(D, E, K, route_scale="1")),
    ("bias_mode", lambda: TopKRouter(D, E, K, bias_mode="additve")),
    ("n_group", lambda: TopKRouter(D, E, K, n_group=3)),
    ("topk_group", lambda: TopKRouter(D, E, K, n_group=4, topk_group=5)),
    ("capacity_factor", lambda: ExpertChoiceRouter(D, E, K, capacity_factor=0)),
    ("capacity_factor", lambda: ExpertChoiceRouter(D, E, K, capacity_factor=math.inf)),
    ("capacity_factor", lambda: ExpertChoiceRouter(D, E, K, capacity_factor="1")),
    ("norm_topk_prob", lambda: ExpertChoiceRouter(D, E, K, norm_topk_prob="yes")),
    # --- router forward: input and mask ---
    ("x", lambda: TopKRouter(D, E, K)(torch.ones(T, D, dtype=torch.long))),
    ("x", lambda: TopKRouter(D, E, K)(torch.ones(T, D, dtype=torch.complex64))),
    ("x", lambda: TopKRouter(D, E, K)([[0.0] * D])),
    ("x", lambda: TopKRouter(D, E, K)(_x(D))),
    ("x", lambda: TopKRouter(D, E, K)(_x(T, D - 1))),
    ("x", lambda: TopKRouter(D, E, K)(_x(1, 2, 3, D))),
    ("mask", lambda: TopKRouter(D, E, K)(_x(2, 3, D), TRANSPOSED_MASK)),
    ("mask", lambda: TopKRouter(D, E, K)(_x(2, 3, D), torch.ones(6, dtype=torch.bool))),
    ("mask", lambda: TopKRouter(D, E, K)(_x(T, D), torch.ones(T - 1, dtype=torch.bool))),
    ("mask", lambda: TopKRouter(D, E, K)(_x(T, D), torch.full((T,), 0.5))),
    ("mask", lambda: TopKRouter(D, E, K)(_x(T, D), torch.full((T,), 2))),
    ("mask", lambda: TopKRouter(D, E, K)(_x(T, D), [True] * T)),
    ("mask", lambda: ExpertChoiceRouter(D, E, K)(_x(2, 3, D), TRANSPOSED_MASK)),
    ("x", lambda: ExpertChoiceRouter(D, E, K)(torch.ones(T, D, dtype=torch.int32))),
    # --- routing functions ---
    ("scores", lambda: route_topk(torch.ones(T, E, dtype=torch.long), K)),
    ("scores", lambda: route_topk(torch.rand(E), K)),
    ("top_k", lambda: route_topk(scores(), 0)),
    ("top_k", lambda: route_topk(scores(), E + 1)),
    ("bias", lambda: route_topk(scores(), K, torch.zeros(E - 1))),
    ("bias", lambda: route_topk(scores(), K, torch.zeros(E, dtype=torch.long))),
    ("bias_mode", lambda: route_topk(scores(), K, torch.zeros(E), bias_mode="mult")),
    ("n_group", lambda: route_topk(scores(), K, n_group=3)),
    ("num_experts", lambda: count_tokens_per_expert(ids(), 0)),
    ("num_experts", lambda: count_tokens_per_expert(ids(), 8.0)),
    ("indices", lambda: count_tokens_per_expert(ids().float(), E)),
    ("indices", lambda: count_tokens_per_expert(ids().reshape(-1), E)),
    ("indices", lambda: count_tokens_per_expert(ids([0, E]), E)),  # id E: bincount would give E+1 counts
    ("indices", lambda: count_tokens_per_expert(ids([0, -1]), E)),
    ("mask", lambda: count_tokens_per_expert(ids(), E, torch.ones(T + 1, dtype=torch.bool))),
    ("num_tokens", lambda: expert_choice_capacity(-1, E, K, 1.0)),
    ("num_experts", lambda: expert_choice_capacity(T, 0, K, 1.0)),
    ("top_k", lambda: expert_choice_capacity(T, E, 0, 1.0)),
    ("capacity_factor", lambda: expert_choice_capacity(T, E, K, -1.0)),
    ("capacity", lambda: route_expert_choice(scores(), -1)),
    ("capacity", lambda: route_expert_choice(scores(), T + 1)),
    ("capacity", lambda: route_expert_choice(scores(), 2.0)),
    ("scores_TE", lambda: route_expert_choice(torch.ones(T, E, dtype=torch.long), 1)),
    ("mask_T", lambda: route_expert_choice(scores(), 1, torch.ones(2, 2, dtype=torch.bool))),
    ("out", lambda: chosen_experts(None)),
    ("out", lambda: chosen_experts(ids())),
    # --- MoELayer ---
    ("d_model", lambda: MoELayer(16.0, 32, E, K)),
    ("d_ff", lambda: MoELayer(D, 0, E, K)),
    ("d_ff", lambda: MoELayer(D, 2.5, E, K)),
    ("num_experts", lambda: MoELayer(D, 32, -1, K)),
    ("top_k", lambda: MoELayer(D, 32, E, -1)),
    ("num_shared_experts", lambda: MoELayer(D, 32, E, K, num_shared_experts=-1)),
    ("num_shared_experts", lambda: MoELayer(D, 32, E, K, num_shared_experts=1.5)),
    ("use_grouped_mm", lambda: MoELayer(D, 32, E, K, use_grouped_mm="yes")),
    ("routing", lambda: MoELayer(D, 32, E, K, routing="dense")),
    ("expert_choice_capacity", lambda: MoELayer(D, 32, E, K, expert_choice_capacity=0)),
    ("expert_choice_capacity", lambda: MoELayer(D, 32, E, K, routing="expert_choice", expert_choice_capacity=NAN)),
    ("capacity_factor", lambda: MoELayer(D, 32, E, K, capacity_factor=0)),
    ("capacity_factor", lambda: MoELayer(D, 32, E, K, capacity_factor=-1.0)),
    ("capacity_factor", lambda: MoELayer(D, 32, E, K, capacity_factor="1.25")),
    ("capacity_factor", lambda: MoELayer(D, 32, E, K, capacity_factor=NAN)),
    ("capacity_factor", lambda: MoELayer(D, 32, E, K, routing="expert_choice", capacity_factor=1.0)),
    ("drop_policy", lambda: MoELayer(D, 32, E, K, capacity_factor=1.0, drop_policy="random")),
    ("norm_topk_prob", lambda: MoELayer(D, 32, E, K, norm_topk_prob="False")),
    ("mask", lambda: MoELayer(D, 32, E, K)(_x(2, 3, D), TRANSPOSED_MASK)),
    ("x", lambda: MoELayer(D, 32, E, K)(_x(T, D + 1))),
    # --- experts ---
    ("num_tokens", lambda: expert_capacity(-1, K, E, 1.0)),
    ("num_tokens", lambda: expert_capacity(10.0, K, E, 1.0)),
    ("top_k", lambda: expert_capacity(T, 0, E, 1.0)),
    ("num_experts", lambda: expert_capacity(T, K, 0, 1.0)),
    ("capacity_factor", lambda: expert_capacity(T, K, E, 0.0)),
    ("capacity_factor", lambda: expert_capacity(T, K, E, math.inf)),
    ("capacity_factor", lambda: expert_capacity(T, K, E, None)),
    ("x_TD", lambda: permute(torch.ones(T, D, dtype=torch.long), ids(), torch.rand(T, K), E)),
    ("x_TD", lambda: permute(_x(D), ids(), torch.rand(T, K), E)),
    ("indices_TK", lambda: permute(_x(T, D), ids().float(), torch.rand(T, K), E)),
    ("indices_TK", lambda: permute(_x(T, D), ids()[:-1], torch.rand(T - 1, K), E)),
    ("indices_TK", lambda: permute(_x(T, D), ids().clamp(max=E - 1).index_fill(0, torch.tensor([0]), E), torch.rand(T, K), E)),
    ("indices_TK", lambda: permute(_x(T, D), ids().index_fill(0, torch.tensor([0]), -3), torch.rand(T, K), E)),
    ("gates_TK", lambda: permute(_x(T, D), ids(), torch.rand(T, K + 1), E)),
    ("gates_TK", lambda: permute(_x(T, D), ids(), torch.ones(T, K, dtype=torch.long), E)),
    ("num_experts", lambda: permute(_x(T, D), ids(), torch.rand(T, K), 0)),
    ("capacity", lambda: permute(_x(T, D), ids(), torch.rand(T, K), E, capacity=-1)),
    ("capacity", lambda: permute(_x(T, D), ids(), torch.rand(T, K), E, capacity=2.5)),
    ("drop_policy", lambda: permute(_x(T, D), ids(), torch.rand(T, K), E, capacity=1, drop_policy="last")),
    ("mask_T", lambda: permute(_x(T, D), ids(), torch.rand(T, K), E, 1, "position", torch.ones(2, 2, dtype=torch.bool))),
    ("y_ND", lambda: combine(_x(T * K), dispatch(), T)),
    ("y_ND", lambda: combine(torch.ones(T * K, D, dtype=torch.long), dispatch(), T)),
    ("dispatch", lambda: combine(_x(T * K, D), None, T)),
    ("dispatch", lambda: combine(_x(T * K + 1, D), dispatch(), T)),
    ("num_tokens", lambda: combine(_x(T * K, D), dispatch(), -1)),
    ("num_tokens", lambda: combine(_x(T * K, D), dispatch(), float(T))),
    ("num_experts", lambda: GroupedExperts(0, D, 32)),
    ("d_model", lambda: GroupedExperts(E, 1.5, 32)),
    ("d_ff", lambda: GroupedExperts(E, D, 0)),
    ("use_grouped_mm", lambda: GroupedExperts(E, D, 32, use_grouped_mm=1)),
    ("x_ND", lambda: GroupedExperts(E, D, 32)(_x(E, D + 1), torch.ones(E, dtype=torch.long))),
    ("x_ND", lambda: GroupedExperts(E, D, 32)(torch.ones(E, D, dtype=torch.long), torch.ones(E, dtype=torch.long))),
    ("counts_E", lambda: GroupedExperts(E, D, 32)(_x(E, D), torch.full((E,), 2))),  # sums to 16, not 8
    ("counts_E", lambda: GroupedExperts(E, D, 32)(_x(E, D), torch.ones(E))),
    ("counts_E", lambda: GroupedExperts(E, D, 32)(_x(E, D), torch.ones(E - 1, dtype=torch.long))),
    ("counts_E", lambda: GroupedExperts(E, D, 32)(_x(E, D), torch.tensor([-1, 3, 1, 1, 1, 1, 1, 1]))),
    ("device", lambda: expert_compute_plan("cpu", torch.float32, D, 32)),
    ("dtype", lambda: expert_compute_plan(torch.device("cpu"), "float32", D, 32)),
    ("d_model", lambda: expert_compute_plan(torch.device("cpu"), torch.float32, 0, 32)),
    ("d_ff", lambda: expert_compute_plan(torch.device("cpu"), torch.float32, D, 32.0)),
    ("use_grouped_mm", lambda: expert_compute_plan(torch.device("cpu"), torch.float32, D, 32, "no")),
    ("d_model", lambda: SwiGLU(0, 32)),
    ("d_ff", lambda: SwiGLU(D, "32")),
    # --- losses ---
    ("scores_TE", lambda: sequence_aux_loss(torch.ones(T, E, dtype=torch.long), ids(), 2)),
    ("scores_TE", lambda: sequence_aux_loss(torch.rand(T * E), ids(), 2)),
    ("scores_TE", lambda: sequence_aux_loss(torch.rand(T, E).numpy(), ids(), 2)),
    ("indices_TK", lambda: sequence_aux_loss(scores(), ids().float(), 2)),
    ("indices_TK", lambda: sequence_aux_loss(scores(), ids()[:2], 2)),
    ("indices_TK", lambda: sequence_aux_loss(scores(), ids().index_fill(0, torch.tensor([1]), E), 2)),
    ("indices_TK", lambda: sequence_aux_loss(scores(), torch.randint(0, E, (T, E + 1)), 2)),
    ("seq_len", lambda: sequence_aux_loss(scores(), ids(), 0)),
    ("seq_len", lambda: sequence_aux_loss(scores(), ids(), 3)),
    ("seq_len", lambda: sequence_aux_loss(scores(), ids(), 2.0)),
    ("mask_T", lambda: sequence_aux_loss(scores(), ids(), 2, torch.ones(2, 2, dtype=torch.bool))),
    ("mask_T", lambda: sequence_aux_loss(scores(), ids(), 2, torch.ones(T))),
    ("indices_TK", lambda: batch_aux_loss(scores(), ids().index_fill(0, torch.tensor([1]), -1))),
    ("scores_TE", lambda: batch_aux_loss(torch.ones(T, E, dtype=torch.bool), ids())),
    ("mask_T", lambda: batch_aux_loss(scores(), ids(), torch.ones(T + 1, dtype=torch.bool))),
    ("top_k", lambda: global_batch_aux_loss(scores(), torch.ones(E), 0)),
    ("top_k", lambda: global_batch_aux_loss(scores(), torch.ones(E), -1)),
    ("top_k", lambda: global_batch_aux_loss(scores(), torch.ones(E), E + 1)),
    ("top_k", lambda: global_batch_aux_loss(scores(), torch.ones(E), 2.0)),
    ("global_counts_E", lambda: global_batch_aux_loss(scores(), -torch.ones(E), K)),
    ("global_counts_E", lambda: global_batch_aux_loss(scores(), torch.full((E,), NAN), K)),
    ("global_counts_E", lambda: global_batch_aux_loss(scores(), torch.ones(E - 1), K)),
    ("global_counts_E", lambda: global_batch_aux_loss(scores(), torch.ones(E, dtype=torch.complex64), K)),
    ("global_counts_E", lambda: global_batch_aux_loss(scores(), [1.0] * E, K)),
    ("scores_TE", lambda: global_batch_aux_loss(torch.rand(E), torch.ones(E), K)),
    ("mask_T", lambda: global_batch_aux_loss(scores(), torch.ones(E), K, torch.ones(T, 1, dtype=torch.bool))),
    ("scores_TE", lambda: importance_loss(torch.ones(T, E, dtype=torch.long))),
    ("mask_T", lambda: importance_loss(scores(), torch.ones(T + 2, dtype=torch.bool))),
    ("logits_TE", lambda: router_z_loss(torch.ones(T, E, dtype=torch.long))),
    ("logits_TE", lambda: router_z_loss(torch.ones(2, T, E))),
    ("mask_T", lambda: router_z_loss(scores(), torch.ones(T - 1, dtype=torch.bool))),
    ("scores_TE", lambda: normalize_scores(torch.ones(T, E, dtype=torch.long))),
    ("num_experts", lambda: expert_counts(ids(), 0)),
    ("indices_TK", lambda: expert_counts(ids(), K)),  # ids up to 7 for 2 experts
    # --- metrics ---
    ("tokens_per_expert", lambda: max_violation(loads(1.0, -1.0, 2.0))),
    ("tokens_per_expert", lambda: max_violation(torch.ones(2, 2, 2))),
    ("tokens_per_expert", lambda: max_violation(torch.ones(3, dtype=torch.complex64))),
    ("tokens_per_expert", lambda: max_violation(torch.ones(3, dtype=torch.bool))),
    ("tokens_per_expert", lambda: max_violation(loads(1.0, NAN))),
    ("tokens_per_expert", lambda: max_violation(torch.ones(2, 0))),
    ("tokens_per_expert", lambda: max_violation([1, 2, 3])),
    ("tokens_per_expert", lambda: coefficient_of_variation(loads(-1.0, 1.0))),
    ("tokens_per_expert", lambda: load_share(torch.ones(3, dtype=torch.complex64))),
    ("tokens_per_expert", lambda: dead_experts(torch.ones(1, 1, 1))),
    # --- LossFreeBalancer ---
    ("update_rate", lambda: LossFreeBalancer(0)),
    ("update_rate", lambda: LossFreeBalancer(-1e-3)),
    ("update_rate", lambda: LossFreeBalancer(NAN)),
    ("update_rate", lambda: LossFreeBalancer("1e-3")),
    ("update_rate", lambda: LossFreeBalancer(1e300)),
    ("update", lambda: LossFreeBalancer(update="signum")),
    ("center", lambda: LossFreeBalancer(center="no")),
    ("all_reduce", lambda: LossFreeBalancer(all_reduce=3)),
    ("model", lambda: LossFreeBalancer().step(None)),
    ("model", lambda: LossFreeBalancer().step(nn.Linear(2, 2))),  # no TopKRouter in the model
    ("rate_scale", lambda: LossFreeBalancer().step(TopKRouter(D, E, K), rate_scale=2.0)),
    ("rate_scale", lambda: LossFreeBalancer().step(TopKRouter(D, E, K), rate_scale="1")),
    ("loads_LE", lambda: LossFreeBalancer().bias_delta(loads(1.0, -1.0, 2.0))),
    ("loads_LE", lambda: LossFreeBalancer().bias_delta(torch.ones(2, 2, 2))),
    ("loads_LE", lambda: LossFreeBalancer().bias_delta(torch.ones(3, dtype=torch.complex64))),
    ("loads_LE", lambda: LossFreeBalancer().bias_delta(torch.ones(3, dtype=torch.bool))),
    ("loads_LE", lambda: LossFreeBalancer().bias_delta(loads(1.0, -math.inf))),
    ("loads_LE", lambda: LossFreeBalancer().bias_delta([1.0, 2.0])),
    ("loads_LE", lambda: LossFreeBalancer().bias_delta(torch.ones(2, 0))),
    ("bias_LE", lambda: LossFreeBalancer(center=True).bias_delta(torch.ones(2, E))),
    ("bias_LE", lambda: LossFreeBalancer(center=True).bias_delta(torch.ones(2, E), torch.zeros(E))),
    ("bias_LE", lambda: LossFreeBalancer(center=True).bias_delta(torch.ones(2, E), torch.zeros(2, E - 1))),
    ("rate_scale", lambda: LossFreeBalancer().bias_delta(torch.ones(E), rate_scale=-0.5)),
    ("optimizer", lambda: LossFreeBalancer().attach("sgd", TopKRouter(D, E, K))),
    ("model", lambda: LossFreeBalancer().attach(sgd(), None)),
    ("optimizer", lambda: unwrap_optimizer(3)),
    ("optimizer", lambda: OptimizerHook(None, lambda: None)),
    ("update", lambda: OptimizerHook(sgd(), 3)),
    ("model", lambda: find_routers(None)),
    ("routers", lambda: pop_expert_loads([nn.Linear(2, 2)])),
    ("tensor", lambda: sum_over_default_group_([1.0])),
    # --- AuxLossBalancer ---
    ("coeff", lambda: AuxLossBalancer(-1e-3)),
    ("coeff", lambda: AuxLossBalancer(NAN)),
    ("coeff", lambda: AuxLossBalancer("1e-3")),
    ("scores", lambda: AuxLossBalancer(scores="softmax")),
    ("routing", lambda: AuxLossBalancer()([])),
    ("routing", lambda: AuxLossBalancer()(None)),
    ("routing", lambda: AuxLossBalancer()([ids()])),
    ("routing", lambda: AuxLossBalancer()(expert_choice_output())),  # [E, C] token ids, not [T, K]
    ("routing", lambda: AuxLossBalancer()(topk_output(torch.randn(T, D)))),  # [T, D]: no sequences
    # --- GlobalBatchCounts and Balancing ---
    ("all_reduce", lambda: GlobalBatchCounts(all_reduce="sum")),
    ("routing", lambda: GlobalBatchCounts().add([])),
    ("routing", lambda: GlobalBatchCounts().add(scores())),
    ("strategy", lambda: Balancing("lossfree")),
    ("aux_loss_coeff", lambda: Balancing("aux_loss", aux_loss_coeff=-1.0)),
    ("aux_loss_coeff", lambda: Balancing("aux_loss", aux_loss_coeff="1e-3")),
    ("z_loss_coeff", lambda: Balancing(z_loss_coeff=NAN)),
    ("seq_aux_coeff", lambda: Balancing("deepseek_v3", seq_aux_coeff=-1e-4)),
    ("aux_loss_scores", lambda: Balancing(aux_loss_scores="normalised")),
    ("update_rate", lambda: Balancing("aux_loss", bias_update_rate=0.0)),  # refused even where unused
    ("update", lambda: Balancing("none", bias_update="signum")),
    ("center", lambda: Balancing(bias_center=1)),
    ("all_reduce", lambda: Balancing(all_reduce="auto")),
    ("routing", lambda: Balancing("aux_loss").loss([])),
    ("routing", lambda: Balancing("aux_loss").loss(scores())),
    ("routing", lambda: Balancing("batch_aux_loss").loss([expert_choice_output()])),
    ("rate_scale", lambda: Balancing("none").after_step(TopKRouter(D, E, K), rate_scale=1.5)),
    ("model", lambda: Balancing("none").after_step("model")),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_CALLS)])
def test_bad_call_is_refused_naming_the_argument(name, call):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert name in str(err.value), f"the message does not name {name!r}: {err.value}"


def test_the_table_covers_every_public_name_of_the_library():
    """Every name exported by ``moebalance`` that takes arguments has at least one bad call above."""
    import inspect

    import moebalance

    source = inspect.getsource(inspect.getmodule(test_the_table_covers_every_public_name_of_the_library))
    table = source[source.index("BAD_CALLS = [") : source.index("\n]\n")]
    untested = [
        name
        for name in moebalance.__all__
        if callable(getattr(moebalance, name)) and name not in ("MoEOutput", "RouterOutput") and f"{name}(" not in table
    ]
    assert untested == []


@pytest.mark.parametrize("loss", ["sequence", "batch", "global", "importance", "z"])
def test_every_loss_of_an_empty_batch_is_zero(loss):
    scores_TE = torch.zeros(0, E, requires_grad=True)
    indices_TK = torch.zeros(0, K, dtype=torch.long)
    value = {
        "sequence": lambda: sequence_aux_loss(scores_TE, indices_TK, 4),
        "batch": lambda: batch_aux_loss(scores_TE, indices_TK),
        "global": lambda: global_batch_aux_loss(scores_TE, torch.zeros(E), K),
        "importance": lambda: importance_loss(scores_TE),
        "z": lambda: router_z_loss(scores_TE),
    }[loss]()
    assert value.shape == () and value.item() == 0.0
    value.backward()  # still part of the graph


def test_integer_mask_of_zeros_and_ones_is_accepted_like_bool():
    router = TopKRouter(D, E, K)
    x = torch.randn(2, 3, D)
    as_int = router(x, torch.tensor([[1, 1, 0], [1, 0, 1]]))
    as_bool = router(x, torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool))
    assert torch.equal(as_int.tokens_per_expert, as_bool.tokens_per_expert)
    assert as_int.tokens_per_expert.sum().item() == K * 4
