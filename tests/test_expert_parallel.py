"""Expert-parallel MoE layer: 2 gloo processes give the single-process layer's output and gradients."""

import pytest
import torch
import torch.distributed as dist

from moebalance.moe import MoELayer

CASES = [  # (T per rank, D, F, E, K, shared, grouped_mm, skew)
    (7, 8, 16, 4, 2, 0, True, False),
    (5, 8, 8, 8, 3, 1, False, False),
    (6, 8, 16, 4, 1, 0, True, True),  # every token to expert 0: rank 1 receives nothing
]


def _layer(D, Fh, E, K, shared, grouped, skew):
    torch.manual_seed(0)
    layer = MoELayer(D, Fh, E, K, num_shared_experts=shared, use_grouped_mm=grouped).double()
    if skew:
        layer.router.expert_bias[0] = 100.0
    return layer


def _inputs(T, D, world):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(world * T, D, generator=gen, dtype=torch.float64)
    w = torch.randn(world * T, D, generator=gen, dtype=torch.float64)
    return x, w


def dist_job_part(rank, world, out_dir):
    """This module's share of the shared 2-rank job (runs inside each rank)."""
    for i, case in enumerate(CASES):
        _ep_case(rank, world, case, f"{out_dir}/ep-case{i}-rank{rank}.pt")


def _ep_case(rank, world, case, path):
    from moebalance.parallel.expert_parallel import ExpertParallelMoELayer

    T, D, Fh, E, K, shared, grouped, skew = case
    ep = ExpertParallelMoELayer(_layer(D, Fh, E, K, shared, grouped, skew))
    x, w = _inputs(T, D, world)
    x_r = x[rank * T : (rank + 1) * T].clone().requires_grad_(True)
    out = ep(x_r).output
    (out * w[rank * T : (rank + 1) * T]).sum().backward()
    # Replicated parameters: sum the per-rank gradients as DDP would (it averages; we compare sums).
    for p in (ep.router.weight, *(ep.shared_experts.parameters() if ep.shared_experts else ())):
        dist.all_reduce(p.grad)
    torch.save(
        {
            "out": out.detach(),
            "x_grad": x_r.grad,
            "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
            "router_grad": ep.router.weight.grad,
            "loads": ep.router.load_counts.clone(),
        },
        path,
    )


@pytest.mark.distributed
@pytest.mark.parametrize("i", range(len(CASES)))
def test_expert_parallel_matches_single_process(i, dist_job):
    world = 2
    T, D, Fh, E, K, shared, grouped, skew = CASES[i]
    ref = _layer(D, Fh, E, K, shared, grouped, skew)
    x, w = _inputs(T, D, world)
    x = x.requires_grad_(True)
    out = ref(x).output
    (out * w).sum().backward()
    E_local = E // world
    for rank in range(world):
        got = torch.load(dist_job / f"ep-case{i}-rank{rank}.pt")
        rows = slice(rank * T, (rank + 1) * T)
        torch.testing.assert_close(got["out"], out[rows].detach())
        torch.testing.assert_close(got["x_grad"], x.grad[rows])
        torch.testing.assert_close(got["router_grad"], ref.router.weight.grad)
        for name, g in got["expert_grads"].items():
            torch.testing.assert_close(g, getattr(ref.experts, name).grad[rank * E_local : (rank + 1) * E_local])
        # Each rank counted only its own tokens.
        assert got["loads"].sum().item() == T * K
