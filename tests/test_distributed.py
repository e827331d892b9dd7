"""Data- and expert-parallel training on 2 gloo processes against 1-process runs of the same global batch,
and bit-identical biases from the all-reduced loads."""

import json

import numpy as np
import pytest
import torch

from moebalance import parallel as distributed
from moebalance.lab.reporting import load_metrics
from moebalance.train.checkpoint import load_checkpoint
from moebalance.train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from moebalance.train.data import sample_local_batch

WORLD = 2
BATCH = 2  # sequences per rank and micro-batch
STEPS = 4


def _write_tokens(folder):
    gen = np.random.default_rng(0)
    # A little structure (a repeated motif plus noise) so the router sees distinct inputs.
    motif = gen.integers(0, 256, 37)
    train = np.concatenate([np.where(gen.random(37) < 0.3, gen.integers(0, 256, 37), motif) for _ in range(400)])
    folder.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(folder / "train.bin")
    gen.integers(0, 256, 2000).astype(np.uint16).tofile(folder / "val.bin")


def _cfg(data_dir, batch_size, expert_parallel=False, strategy="loss_free"):
    cfg = RunConfig(
        model=ModelConfig(
            vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, top_k=2, d_expert=32
        ),
        data=DataConfig(path=str(data_dir), bin_vocab_size=256),
        train=TrainConfig(
            seq_len=16,
            batch_size=batch_size,
            grad_accum=2,
            max_steps=STEPS,
            warmup_steps=1,
            eval_every=2,
            eval_tokens=512,
            tensorboard=False,
            expert_parallel=expert_parallel,
        ),
    )
    cfg.balance.strategy = strategy
    cfg.balance.bias_update_rate = 1e-2
    cfg.balance.aux_loss_coeff = 0.1  # large, so that a wrong gradient scale shows in the grad norm
    return cfg


def _balancing_check(rank, out_dir):
    """Routers fed deliberately different data per rank: biases equal only with the all-reduce."""
    from moebalance.balancing import Balancing
    from moebalance.routing import TopKRouter

    sums = {}
    for reduce in (True, False):
        torch.manual_seed(0)
        router = TopKRouter(8, 8, 2)
        gen = torch.Generator().manual_seed(100 + rank)  # different tokens on each rank
        skew = torch.linspace(-1, 1, 8) * (1 + rank)
        balancing = Balancing("loss_free", 1e-3, all_reduce=distributed.all_reduce_sum_ if reduce else None)
        for _ in range(6):
            router(torch.randn(50, 8, generator=gen) + skew)
            balancing.after_step(router)
        sums[reduce] = distributed.bias_checksum(router)
    gathered = [None] * WORLD
    torch.distributed.all_gather_object(gathered, sums)
    if rank == 0:
        (out_dir / "balancing.json").write_text(json.dumps(gathered))


def dist_job_part(rank, world, out_dir):
    """This module's share of the shared 2-rank job: a DP run, an EP run, the balancing check."""
    from pathlib import Path

    from moebalance.train.loop import train

    out_dir = Path(out_dir)
    if rank == 0:
        _write_tokens(out_dir / "data")
    torch.distributed.barrier()
    train(_cfg(out_dir / "data", BATCH), out_dir / "dp", progress=False)
    train(_cfg(out_dir / "data", BATCH, expert_parallel=True), out_dir / "ep", progress=False)
    train(_cfg(out_dir / "data", BATCH, strategy="global_aux_loss"), out_dir / "dp_global", progress=False)
    _balancing_check(rank, out_dir)


@pytest.fixture(scope="module")
def runs(dist_job):
    """The shared 2-rank job's runs, and the 1-process reference with the same global batch."""
    from moebalance.train.loop import train

    train(_cfg(dist_job / "data", BATCH * WORLD), dist_job / "single", progress=False)
    train(_cfg(dist_job / "data", BATCH * WORLD, strategy="global_aux_loss"), dist_job / "single_global", progress=False)
    return dist_job


def _assert_same_start(run_dir, ref_dir):
    got, got_eval = load_metrics(run_dir)
    ref, ref_eval = load_metrics(ref_dir)
    assert len(got) == len(ref) == STEPS
    # First step: same weights, same global batch, so the same routing and exactly the same loads.
    assert got[0]["loads"] == ref[0]["loads"]
    for g, r in zip(got[:3], ref[:3]):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
    # Evaluation covers the whole (same) validation slice across ranks.
    assert got_eval[0]["val_tokens"] == ref_eval[0]["val_tokens"]
    assert got_eval[0]["val_loss"] == pytest.approx(ref_eval[0]["val_loss"], rel=1e-4)
    assert got_eval[0]["loads"] == ref_eval[0]["loads"]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["dp", "ep"])
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, mode):
    _assert_same_start(runs / mode, runs / "single")


@pytest.mark.distributed
def test_global_batch_aux_loss_does_not_depend_on_the_number_of_ranks(runs):
    # f_i is counted over the global micro-batch on every rank (all-reduced), P_i over local
    # tokens; DDP's mean over ranks then gives the 1-process gradient: same loss, same grad norm.
    _assert_same_start(runs / "dp_global", runs / "single_global")
    got, _ = load_metrics(runs / "dp_global")
    ref, _ = load_metrics(runs / "single_global")
    for g, r in zip(got[:3], ref[:3]):
        assert g["aux_loss"] == pytest.approx(r["aux_loss"], rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["dp", "ep"])
def test_every_rank_ends_with_bit_identical_biases(runs, mode):
    sums = json.loads((runs / mode / "bias_checksums.json").read_text())
    assert sums["world_size"] == WORLD and sums["identical"]
    assert len(set(sums["checksums"])) == 1
    # The biases moved (a checksum of untouched zeros would be identical trivially).
    train_recs, _ = load_metrics(runs / mode)
    assert train_recs[-1]["bias_max"] > train_recs[-1]["bias_min"]


@pytest.mark.distributed
def test_expert_parallel_checkpoint_is_the_full_model(runs):
    ep = load_checkpoint(runs / "ep" / "checkpoint.pt")["model"]
    single = load_checkpoint(runs / "single" / "checkpoint.pt")["model"]
    assert ep.keys() == single.keys()
    for k in single:
        assert ep[k].shape == single[k].shape, k
    torch.testing.assert_close(ep["blocks.0.ffn.experts.w1"], single["blocks.0.ffn.experts.w1"], rtol=1e-3, atol=1e-4)


@pytest.mark.distributed
def test_bias_all_reduce_makes_different_data_agree(runs):
    per_rank = json.loads((runs / "balancing.json").read_text())
    with_reduce = {r["true"] for r in per_rank}
    without = {r["false"] for r in per_rank}
    assert len(with_reduce) == 1
    assert len(without) == WORLD  # the ranks' data really differ: local loads give different biases


def test_sample_local_batch_splits_the_global_batch():
    data = np.arange(1000, dtype=np.uint16)
    full, _ = sample_local_batch(data, 6, 8, torch.Generator().manual_seed(3), distributed.DistContext())
    parts = [
        sample_local_batch(
            data, 3, 8, torch.Generator().manual_seed(3), distributed.DistContext(rank=r, world_size=2)
        )[0]
        for r in range(2)
    ]
    assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(parts[0], parts[1])


def test_all_reduce_refuses_bfloat16():
    with pytest.raises(TypeError, match="bfloat16"):
        distributed.all_reduce_sum_(torch.zeros(2, 4, dtype=torch.bfloat16))


def test_torchrun_command():
    cmd = distributed.torchrun_command(2, ["train", "--preset", "smoke"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=2" in cmd and cmd[-3:] == ["train", "--preset", "smoke"]
    with pytest.raises(ValueError, match="nproc"):
        distributed.torchrun_command(0, [])
