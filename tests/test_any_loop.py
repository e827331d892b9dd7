"""Loss-Free Balancing outside our trainer: the optimizer hook (plain loop, Accelerate, own DDP
loop with accumulation), per-rank counters under DDP's buffer broadcast, centring, meta-device
initialisation and the top-1 normalisation rule."""

import os

import pytest
import torch

from moebalance import LossFreeBalancer
from moebalance.moe import MoELayer
from moebalance.routing import TopKRouter


def _layer(seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(8, 16, num_experts=4, top_k=2)


def _skewed(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen) + torch.linspace(-1, 1, 8)


# ---------------------------------------------------------------------------------------------
# Optimizer hook
# ---------------------------------------------------------------------------------------------


def test_hook_updates_once_per_real_step_and_detaches():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    balancer = LossFreeBalancer(0.01)
    hook = balancer.attach(opt, layer)
    counts = torch.zeros(4)
    for micro in range(4):  # accumulation 2: two micro-batches, then a step
        out = layer(_skewed(32, micro))
        out.output.sum().backward()
        counts += out.routing.tokens_per_expert
        if micro % 2 == 1:
            opt.step()
            opt.zero_grad()
    assert hook.steps == 2
    assert layer.router.load_counts.sum() == 0  # cleared by the hook's step
    hook.detach()
    hook.detach()  # idempotent
    layer(_skewed(32, 9))
    before = layer.router.expert_bias.clone()
    opt.step()
    assert torch.equal(layer.router.expert_bias, before)  # no hook any more
    assert not hook.attached


def test_hook_refuses_what_is_not_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LossFreeBalancer().attach(object(), _layer())
    with pytest.raises(ValueError, match="no TopKRouter"):
        LossFreeBalancer().attach(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), torch.nn.Linear(2, 2))


def test_unwrap_finds_the_inner_optimizer():
    from moebalance.balancing import unwrap_optimizer

    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    class Wrapper:  # Lightning keeps it as ._optimizer, Accelerate as .optimizer
        def __init__(self, opt):
            self._optimizer = opt

        def step(self):
            self._optimizer.step()

    assert unwrap_optimizer(Wrapper(Wrapper(inner))) is inner
    assert unwrap_optimizer(inner) is inner


def test_hook_under_accelerate_accumulation():
    accelerate = pytest.importorskip("accelerate")
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    try:
        model, opt = accelerator.prepare(layer, opt)
        balancer = LossFreeBalancer(0.01)
        hook = balancer.attach(opt, model)  # the AcceleratedOptimizer: the hook goes on the inner one
        assert hook.optimizer is opt.optimizer
        loads = []
        original = balancer.step
        balancer.step = lambda m: loads.append(original(m)) or loads[-1]
        for micro in range(6):
            with accelerator.accumulate(model):
                out = model(_skewed(16, micro))
                accelerator.backward(out.output.float().pow(2).mean())
                opt.step()  # called every micro-batch; Accelerate skips the inner step on 2 of 3
                opt.zero_grad()
        assert hook.steps == 3 and len(loads) == 3
        assert [int(x.sum()) for x in loads] == [2 * 2 * 16] * 3  # 2 micro-batches x 16 tokens x K=2
    finally:
        accelerate.state.AcceleratorState._reset_state(True)


def _steps_with_an_overflow(fused: bool, pass_scaler: bool = True):
    """Three GradScaler steps of AdamW on a MoE layer, the second with inf gradients on purpose;
    returns the layer, the hook, the biases after each step and the loads of each update."""
    layer = _layer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu")  # CPU: enabled, and AdamW(fused=True) takes its found_inf
    balancer = LossFreeBalancer(0.01)
    hook = balancer.attach(opt, layer, scaler=scaler if pass_scaler else None)
    loads, original = [], balancer.step
    balancer.step = lambda m: loads.append(original(m)) or loads[-1]
    biases, weights = [], []
    for step in range(3):
        out = layer(_skewed(32, step))
        loss = out.output.float().pow(2).mean() * (float("inf") if step == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        biases.append(layer.router.expert_bias.clone())
        weights.append(layer.router.weight.detach().clone())
    assert torch.equal(weights[1], weights[0])  # the scaler did skip the weights of step 1
    return layer, hook, biases, loads, scaler


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_hook_never_updates_on_a_step_the_grad_scaler_skips(fused):
    layer, hook, biases, loads, scaler = _steps_with_an_overflow(fused)
    assert hook.steps == 2 and hook.skipped == 1
    assert not torch.equal(biases[0], torch.zeros(4)) and torch.equal(biases[1], biases[0])
    # the loads of the skipped step were discarded, not carried into the next update
    assert [int(x.sum()) for x in loads] == [32 * 2, 32 * 2]
    assert layer.router.load_counts.sum() == 0
    hook.detach()
    assert "update" not in scaler.__dict__  # the scaler's own update() again


def test_hook_without_the_scaler_of_a_non_fused_optimizer_carries_the_loads():
    # documented fallback: the scaler never calls step(), so nothing tells the hook
    _, hook, biases, loads, _ = _steps_with_an_overflow(False, pass_scaler=False)
    assert hook.scaler is None and hook.skipped == 0
    assert torch.equal(biases[1], biases[0])  # still no update on the skipped step
    assert [int(x.sum()) for x in loads] == [32 * 2, 2 * 32 * 2]


def test_hook_under_accelerate_with_a_grad_scaler_discards_an_overflow_step():
    accelerate = pytest.importorskip("accelerate")
    layer = _layer()
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16 builds on a GPU; the CPU runs it too
    try:
        model, opt = accelerator.prepare(layer, torch.optim.SGD(layer.parameters(), lr=1e-3))
        balancer = LossFreeBalancer(0.01)
        hook = balancer.attach(opt, model)  # no scaler= : the AcceleratedOptimizer's own is found
        assert hook.scaler is accelerator.scaler
        biases = []
        for step in range(3):
            out = model(_skewed(16, step))
            accelerator.backward(out.output.float().pow(2).mean() * (float("inf") if step == 1 else 1.0))
            opt.step()
            opt.zero_grad()
            biases.append(layer.router.expert_bias.clone())
        assert accelerator.optimizer_step_was_skipped is False  # the last step ran
        assert hook.steps == 2 and hook.skipped == 1 and torch.equal(biases[1], biases[0])
        assert layer.router.load_counts.sum() == 0
    finally:
        accelerate.state.AcceleratorState._reset_state(True)


def test_hook_finds_the_scaler_of_a_wrapper():
    from moebalance.balancing import OptimizerHook, grad_scaler_of

    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")

    class Wrapper:  # Accelerate's AcceleratedOptimizer keeps the scaler as .scaler
        def __init__(self, opt, scaler):
            self.optimizer, self.scaler = opt, scaler

    assert grad_scaler_of(Wrapper(inner, scaler)) is scaler
    assert grad_scaler_of(Wrapper(inner, None)) is None
    assert grad_scaler_of(Wrapper(inner, torch.amp.GradScaler("cpu", enabled=False))) is None
    first = OptimizerHook(Wrapper(inner, scaler), lambda: None)
    second = OptimizerHook(inner, lambda: None, scaler=scaler)
    assert first.scaler is scaler and scaler.update == second._scaler_update
    second.detach()
    assert scaler.update == first._scaler_update  # the earlier wrapper again
    first.detach()
    assert "update" not in scaler.__dict__
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        OptimizerHook(inner, lambda: None, scaler=object())


# ---------------------------------------------------------------------------------------------
# Centring
# ---------------------------------------------------------------------------------------------


def test_center_keeps_mean_zero_and_routing_unchanged():
    plain, centred = _layer(), _layer()
    b_plain, b_centred = LossFreeBalancer(0.05), LossFreeBalancer(0.05, center=True)
    for step in range(6):
        x = _skewed(64, step)
        out_p, out_c = plain(x), centred(x)
        assert torch.equal(out_p.routing.indices, out_c.routing.indices)  # a shift never changes top-K
        b_plain.step(plain), b_centred.step(centred)
    bias_p, bias_c = plain.router.expert_bias, centred.router.expert_bias
    assert abs(bias_c.mean().item()) < 1e-6
    assert abs(bias_p.mean().item()) > 1e-3  # the paper's rule drifts here: 3 of 4 experts were under-loaded
    torch.testing.assert_close(bias_c, bias_p - bias_p.mean())


def test_center_refuses_multiplicative_and_needs_biases():
    router = TopKRouter(8, 4, 2, bias_mode="multiplicative")
    with pytest.raises(ValueError, match="additive"):
        LossFreeBalancer(center=True).step(router)
    with pytest.raises(ValueError, match="bias_LE"):
        LossFreeBalancer(center=True).bias_delta(torch.ones(4))
    with pytest.raises(ValueError, match="center"):
        LossFreeBalancer(center=1)


# ---------------------------------------------------------------------------------------------
# Meta device, top-1 normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_mode", ["additive", "multiplicative"])
def test_meta_device_init_then_to_empty(bias_mode):
    with torch.device("meta"):
        router = TopKRouter(8, 4, 2, bias_mode=bias_mode)
    assert router.expert_bias.is_meta
    router.to_empty(device="cpu")
    assert router.expert_bias.dtype == torch.float32 and router.load_counts.device.type == "cpu"
    assert router.expert_bias.tolist() == [1.0 if bias_mode == "multiplicative" else 0.0] * 4
    assert router.load_counts.tolist() == [0.0] * 4
    saved = TopKRouter(8, 4, 2, bias_mode=bias_mode)
    saved.expert_bias.fill_(0.25)
    router.load_state_dict(saved.state_dict())
    assert router.expert_bias.tolist() == [0.25] * 4


def test_top1_with_norm_topk_prob_is_refused():
    with pytest.raises(ValueError, match="no gradient"):
        TopKRouter(8, 4, 1, norm_topk_prob=True)
    from moebalance.train.config import ModelConfig

    with pytest.raises(ValueError, match="model.norm_topk_prob"):
        ModelConfig(num_experts=4, top_k=1, norm_topk_prob=True)
    TopKRouter(8, 4, 1, norm_topk_prob=False)  # fine
    ModelConfig(num_experts=4, top_k=1, norm_topk_prob=True, routing="expert_choice")  # not constant there


def test_load_counts_are_not_a_buffer():
    router = TopKRouter(8, 4, 2)
    assert "load_counts" not in dict(router.named_buffers())
    assert "expert_bias" in dict(router.named_buffers())


# ---------------------------------------------------------------------------------------------
# Own DDP loops, 2 gloo ranks, accumulation 2, default DDP (buffers broadcast), no no_sync
# ---------------------------------------------------------------------------------------------


def _gathered_sum(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.zeros_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t)
    return sum(parts)


def _core_part(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moebalance.parallel import all_reduce_sum_

    layer = _layer()
    model = DDP(layer)  # broadcast_buffers=True, as users write it
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    balancer = LossFreeBalancer(0.01, all_reduce=all_reduce_sum_)
    balancer.attach(opt, model)
    out = {"loads": [], "expected": [], "biases": []}
    original = balancer.step
    balancer.step = lambda m: out["loads"].append(original(m)) or out["loads"][-1]
    for step in range(2):
        own = torch.zeros(4)
        for micro in range(2):
            res = model(_skewed(24, 100 * rank + 10 * step + micro))
            res.output.pow(2).mean().backward()
            own += res.routing.tokens_per_expert
        opt.step()
        opt.zero_grad()
        out["expected"].append(_gathered_sum(own))
        out["biases"].append(layer.router.expert_bias.clone())
    return out


def _hf_part(rank: int) -> dict:
    import transformers
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moebalance.integrations.transformers import apply_loss_free_balancing, tiny_moe_config

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_moe_config("olmoe", vocab_size=128))
    handle = apply_loss_free_balancing(hf, update_rate=0.01)
    own = torch.zeros(handle.num_layers, 8)

    def recorder(i):
        def hook(module, args, output):
            if module.training:
                own[i] += torch.bincount(output[2].reshape(-1), minlength=8).float()

        return hook

    for i, r in enumerate(handle.routers):
        r.register_forward_hook(recorder(i))
    model = DDP(hf)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):  # accumulation 2, no no_sync
        x = torch.randint(0, 128, (2, 16), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
    opt.step()
    handle.step()  # by hand, as in a plain loop (the core part uses the optimizer hook)
    return {"loads": handle.last_loads, "expected": _gathered_sum(own), "biases": handle.biases(), "steps": handle.steps}


def _auto_part(rank: int) -> dict:
    """``LossFreeBalancer`` without ``all_reduce=`` in a DDP loop sums the loads over the default
    group; ``all_reduce=None`` keeps them local. Rank 1's tokens prefer the other experts, so the
    local loads give another sign than the global ones."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, kwargs in (("auto", {}), ("none", {"all_reduce": None})):
        layer = _layer()
        model = DDP(layer)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        balancer = LossFreeBalancer(0.01, **kwargs)
        balancer.attach(opt, model)
        x = _skewed(48, 2000 + rank) * (1.0 if rank == 0 else -1.0)
        res = model(x)
        res.output.pow(2).mean().backward()
        own = res.routing.tokens_per_expert.float()
        opt.step()
        out[name] = {"own": own, "global": _gathered_sum(own), "biases": layer.router.expert_bias.clone()}
    return out


def _fsdp2_part(rank: int) -> dict:
    """FSDP2 (``fully_shard``) on CPU with gloo: the hook's update uses the global loads."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    from moebalance.parallel import all_reduce_sum_

    layer = _layer()
    fully_shard(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    LossFreeBalancer(0.01, all_reduce=all_reduce_sum_).attach(opt, layer)
    own = torch.zeros(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP2 warns that the layer returns a view; nothing writes to it
        for micro in range(2):
            res = layer(_skewed(24, 1000 + 10 * rank + micro))
            res.output.pow(2).mean().backward()
            own += res.routing.tokens_per_expert
    opt.step()
    return {"expected": _gathered_sum(own), "biases": layer.router.expert_bias.clone()}


def _timeout_part(rank: int, out_dir: str) -> dict:
    """Rank 1 hangs (never joins the update); rank 0 must fail fast with a message."""
    from moebalance.integrations.transformers.handle import timed_all_reduce

    if rank == 1:
        import time

        deadline = time.time() + 60
        while not os.path.exists(f"{out_dir}/rank0.pt") and time.time() < deadline:
            time.sleep(0.1)
        return {}
    try:
        timed_all_reduce(1.0)(torch.zeros(2, 4))
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"error": None}


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {"core": _core_part(rank), "hf": _hf_part(rank), "fsdp2": _fsdp2_part(rank), "auto": _auto_part(rank)}
    torch.distributed.barrier()
    result["timeout"] = _timeout_part(rank, out_dir)
    torch.save(result, f"{out_dir}/tmp{rank}.pt")
    os.replace(f"{out_dir}/tmp{rank}.pt", f"{out_dir}/rank{rank}.pt")
    os._exit(0)  # the timed-out collective leaves the group unusable; nothing to tear down


@pytest.mark.slow
@pytest.mark.distributed
def test_own_ddp_loops_with_accumulation(tmp_path):
    transformers = pytest.importorskip("transformers")
    from moebalance.integrations.transformers import tiny_moe_config

    transformers.AutoModelForCausalLM.from_config(tiny_moe_config("olmoe", vocab_size=128))  # import before fork
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in res:
        core = r["core"]
        for loads, expected in zip(core["loads"], core["expected"]):
            torch.testing.assert_close(loads[0], expected)  # == the sum of each rank's own counts
        torch.testing.assert_close(r["hf"]["loads"], r["hf"]["expected"])
        assert r["hf"]["steps"] == 1
    for a, b in zip(res[0]["core"]["biases"], res[1]["core"]["biases"]):
        assert torch.equal(a, b)
    assert torch.equal(res[0]["hf"]["biases"], res[1]["hf"]["biases"])
    first = res[0]["core"]["expected"][0]
    torch.testing.assert_close(res[0]["core"]["biases"][0], 0.01 * torch.sign(first.mean() - first))
    fsdp = [r["fsdp2"] for r in res]
    assert torch.equal(fsdp[0]["biases"], fsdp[1]["biases"])
    total = fsdp[0]["expected"]
    torch.testing.assert_close(fsdp[0]["biases"], 0.01 * torch.sign(total.mean() - total))
    # all_reduce="auto" (the default): both ranks update from the global loads, identically;
    # all_reduce=None: each rank from its own (the precondition: their signs differ here).
    for r in res:
        auto, none = r["auto"]["auto"], r["auto"]["none"]
        sign = lambda c: torch.sign(c.mean() - c)  # noqa: E731
        assert not torch.equal(sign(auto["own"]), sign(auto["global"]))
        torch.testing.assert_close(auto["biases"], 0.01 * sign(auto["global"]))
        torch.testing.assert_close(none["biases"], 0.01 * sign(none["own"]))
    assert torch.equal(res[0]["auto"]["auto"]["biases"], res[1]["auto"]["auto"]["biases"])
    err = res[0]["timeout"]["error"]
    assert err is not None and "rank 0 of 2" in err and "dist_timeout_s=1 s" in err


def test_all_reduce_auto_is_a_no_op_without_a_process_group_and_checks_its_argument():
    assert not torch.distributed.is_initialized()
    balancer = LossFreeBalancer(0.01)
    assert balancer.all_reduce == "auto"
    layer = _layer()
    own = layer(_skewed(32, 5)).routing.tokens_per_expert.float()
    torch.testing.assert_close(balancer.step(layer)[0], own)
    for bad in ("sum", 3, "AUTO"):
        with pytest.raises(ValueError, match="all_reduce must be 'auto', None or a function"):
            LossFreeBalancer(0.01, all_reduce=bad)


def test_bias_center_in_the_trainer_config():
    from moebalance.balancing import Balancing
    from moebalance.train.config import BalanceConfig

    with pytest.raises(ValueError, match="balance.bias_center"):
        BalanceConfig(bias_center=True, bias_mode="multiplicative")
    balancing = Balancing.from_config(BalanceConfig(bias_center=True, bias_update_rate=0.05))
    layer = _layer()
    layer(_skewed(64, 0))
    balancing.after_step(layer)
    assert abs(layer.router.expert_bias.mean().item()) < 1e-7 and layer.router.expert_bias.abs().max() > 0


def test_failed_all_reduce_names_the_rank_and_the_timeout(monkeypatch):
    from moebalance.parallel import process

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def timed_out(*args, **kwargs):
        raise RuntimeError("[gloo] Timed out waiting 1000ms for recv operation to complete")

    monkeypatch.setattr(dist, "all_reduce", timed_out)
    monkeypatch.setattr(process, "_TIMEOUT_S", [7.0])
    with pytest.raises(RuntimeError, match=r"rank 1 of 2: .*train.dist_timeout_s=7 s.*Timed out"):
        process.all_reduce_sum_(torch.zeros(2, 4))
