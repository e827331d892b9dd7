"""Section 7 "trainer": the trainer's tokens/s against a dense model of the same active parameters.

Three competitors in one round-robin, each call ``--trainer-steps`` optimizer steps of the
``default`` preset's model and batch (``moebalance train``; ``--quick``: the ``smoke`` preset's):

* ``train``: :func:`moebalance.train.loop.train` itself, as ``moebalance train`` runs it (tqdm
  off; TensorBoard, ``metrics.jsonl``, the host reads of the per-step record, the final evaluation
  of a two-batch validation split and the final checkpoint included). Two figures: the wall clock
  of the whole call, and the loop's own tokens/s (its ``summary.json``: time from the batch draw to
  the bias update, the logging after it left out).
* ``moe``: the same model's bare step (batch draw, forward under the run's autocast, backward,
  gradient clipping, AdamW from ``build_optimizer``, the LR schedule, the Loss-Free bias update),
  no host reads and no logging.
* ``dense``: the same bare step of the dense twin: every MoE feed-forward replaced by one SwiGLU
  of hidden size ``top_k * d_expert`` (plus the shared experts' width), i.e. the same active
  expert parameters; the router (``D * E`` weights per layer) is what the twin lacks.
* ``train_malloc_<other>`` (on CPU): ``train()`` again in a child process with the other
  ``train.malloc`` setting than this process's ``--malloc`` (the allocator setting is
  process-wide), so that what ``train.malloc=reuse`` gains is one side-by-side ratio too. The
  child is started before the timing and waits for each call; the time is read in this process.

The tokens are random ids of the preset's vocabulary (nothing is read from disk); the three start
from the same seed. Ratios are of medians measured side by side.
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import tempfile
from pathlib import Path

import numpy as np
import torch
from pieces import fmt, model_flops_per_token, table
from timing import Timer

from moebalance.balancing import Balancing
from moebalance.experts import SwiGLU
from moebalance.moe import MoELayer
from moebalance.train.config import RunConfig, get_preset
from moebalance.train.data import TokenData, sample_batch
from moebalance.train.loop import _autocast, build_optimizer, lr_at, train
from moebalance.train.model import MoETransformer


def trainer_config(args) -> RunConfig:
    """The preset the section runs (``default``; ``smoke`` with ``--quick``) for ``--trainer-steps``
    steps, on the benchmark's device and first dtype, with no intermediate evaluation."""
    cfg = get_preset("smoke" if args.quick else "default")
    t = cfg.train
    t.max_steps, t.warmup_steps = args.trainer_steps, min(t.warmup_steps, args.trainer_steps)
    t.eval_every, t.device, t.dtype = args.trainer_steps + 1, args.device, args.dtypes[0]
    cfg.model.vocab_size = cfg.data.vocab_size  # what the tokenizer gives the model in a real run
    t.threads = 0  # the benchmark's --threads holds for the whole process
    t.tensorboard = not args.quick
    return cfg


def random_tokens(cfg: RunConfig, seed: int = 0) -> TokenData:
    """Random ids of the model's vocabulary: 64 training windows' worth, two batches of validation."""
    rng = np.random.default_rng(seed)
    t = cfg.train
    n_train, n_val = 64 * t.batch_size * (t.seq_len + 1), 2 * t.batch_size * t.seq_len + 1
    ids = rng.integers(0, cfg.model.vocab_size, n_train + n_val).astype(np.uint16)
    return TokenData(ids[:n_train], ids[n_train:], cfg.model.vocab_size, f"random-{seed}", "random token ids")


def dense_twin(cfg: RunConfig) -> MoETransformer:
    """:class:`MoETransformer` with every MoE feed-forward replaced by a SwiGLU of the same active
    expert width (``top_k * d_expert + num_shared_experts * d_expert``), initialised by the model's
    own :meth:`~MoETransformer.reset_parameters`."""
    m = cfg.model
    model = MoETransformer(m, cfg.balance)
    for block in model.blocks:
        if isinstance(block.ffn, MoELayer):
            block.ffn = SwiGLU(m.d_model, (m.top_k + m.num_shared_experts) * m.d_expert)
    model.reset_parameters()
    return model


def active_parameters(model: MoETransformer) -> int:
    """Parameters one token uses: all of them, less the routed experts it is not sent to."""
    m = model.cfg
    idle = sum((m.num_experts - m.top_k) * 3 * m.d_model * m.d_expert for b in model.blocks if isinstance(b.ffn, MoELayer))
    return sum(p.numel() for p in model.parameters()) - idle


def bare_steps(cfg: RunConfig, model: MoETransformer, data: TokenData, steps: int):
    """A closure running ``steps`` bare optimizer steps of ``model`` (see the module docstring)."""
    device = torch.device(cfg.train.device)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s % cfg.train.max_steps, cfg) / cfg.train.lr)
    balancing = Balancing.from_config(cfg.balance) if model.routers else None
    gen = torch.Generator().manual_seed(cfg.train.seed)
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf

    def run() -> None:
        for _ in range(steps):
            x, y = sample_batch(data.train, cfg.train.batch_size, cfg.train.seq_len, gen)
            with _autocast(cfg):
                out = model(x.to(device), y.to(device))
            extra, _ = balancing.loss(out.routing) if balancing is not None else (None, {})
            (out.loss if extra is None else out.loss + extra).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if balancing is not None:
                balancing.after_step(model)

    return run


def adamw_step_seconds(cfg: RunConfig, model: MoETransformer, device: torch.device, timer: Timer) -> dict[str, float]:
    """AdamW's step alone on ``model``'s parameters (a copy each) with fixed gradients, side by side:
    PyTorch's per-parameter loop (its CPU default, so ``train.adamw_impl=default`` there),
    ``foreach`` (its CUDA default) and ``fused`` (``train.adamw_impl=fused``), with
    ``build_optimizer``'s groups. Median seconds per step."""
    fns = {}
    for impl, flags in (("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        m = copy.deepcopy(model).to(device)
        gen = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in build_optimizer(m, cfg).param_groups]
        fns[impl] = torch.optim.AdamW(groups, **flags).step
    return timer.compare(fns)


def _train_worker(conn, cfg_dict: dict, data: TokenData, threads: int, workdir: str) -> None:
    """Child process of ``train_malloc_<other>``: one ``train()`` per request, its own tokens/s back."""
    torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    n = 0
    while conn.recv():
        n += 1
        conn.send(train(cfg, Path(workdir) / f"child{n}", data=data, progress=False).tokens_per_s)


def _other_malloc_train(cfg: RunConfig, data: TokenData, workdir: str, in_loop: list[float]):
    """``(closure, stop)`` of the child-process competitor (see the module docstring): ``train()``
    with the other ``train.malloc`` setting than ``cfg``'s; its own tokens/s go to ``in_loop``."""
    other = copy.deepcopy(cfg)
    other.train.malloc = _other(cfg.train.malloc)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_train_worker, args=(child, other.to_dict(), data, torch.get_num_threads(), workdir), daemon=True)
    proc.start()

    def call() -> None:
        parent.send(True)
        in_loop.append(parent.recv())

    def stop() -> None:
        parent.send(False)
        proc.join(timeout=60)

    return call, stop


def _other(malloc: str) -> str:
    return "system" if malloc == "reuse" else "reuse"


def _competitors(cfg: RunConfig, data: TokenData, device: torch.device, workdir: str, in_loop: dict[str, list[float]]):
    """``({name: closure}, stop, (moe, dense))``: the closures of :func:`run`, what ends the child
    process (``None`` off CPU), and the two models of the bare steps."""
    steps = cfg.train.max_steps
    in_loop["train"] = []

    def train_run() -> None:
        result = train(cfg, Path(workdir) / f"run{len(in_loop['train'])}", data=data, progress=False)
        in_loop["train"].append(result.tokens_per_s)

    torch.manual_seed(cfg.train.seed)
    moe = MoETransformer(cfg.model, cfg.balance)
    torch.manual_seed(cfg.train.seed)
    dense = dense_twin(cfg)
    fns = {"train": train_run, "moe": bare_steps(cfg, moe, data, steps), "dense": bare_steps(cfg, dense, data, steps)}
    stop = None
    if device.type == "cpu":
        name = f"train_malloc_{_other(cfg.train.malloc)}"
        fns[name], stop = _other_malloc_train(cfg, data, workdir, in_loop.setdefault(name, []))
    return fns, stop, (moe, dense)


def run(args, timer: Timer, device: torch.device) -> dict:
    """The competitors in one round-robin; tokens/s and their ratios."""
    cfg = trainer_config(args)
    cfg.train.malloc = args.malloc  # as this process is set: train() must not change it
    data = random_tokens(cfg)
    in_loop: dict[str, list[float]] = {}  # the trainer's own tokens/s of each call
    workdir = tempfile.TemporaryDirectory(prefix="bench_trainer_")
    fns, stop, (moe, dense) = _competitors(cfg, data, device, workdir.name, in_loop)
    try:
        t = timer.compare(fns)
    finally:
        if stop is not None:
            stop()
        workdir.cleanup()
    adamw = adamw_step_seconds(cfg, moe, device, timer)
    tokens = cfg.train.max_steps * cfg.train.batch_size * cfg.train.seq_len
    tps = {k: tokens / v for k, v in t.items()}
    own = {k: float(np.median(v[1:] or v)) for k, v in in_loop.items()}  # the warm-up call left out
    res = {
        "preset": "smoke" if args.quick else "default", "steps_per_call": cfg.train.max_steps, "batch": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len, "dtype": cfg.train.dtype, "vocab_size": cfg.model.vocab_size, "malloc": cfg.train.malloc,
        "params_moe": sum(p.numel() for p in moe.parameters()), "params_moe_active": active_parameters(moe),
        "params_dense": sum(p.numel() for p in dense.parameters()),
        "mflop_per_token": model_flops_per_token(cfg.model, cfg.train.seq_len) / 1e6,
        **{f"s_{k}": v for k, v in t.items()},
        **{f"tokens_per_s_{k}": v for k, v in tps.items()},
        **{f"tokens_per_s_{k}_in_loop": v for k, v in own.items()},
        "train_over_dense": tps["train"] / tps["dense"],
        "train_in_loop_over_dense": own["train"] / tps["dense"],
        "moe_over_dense": tps["moe"] / tps["dense"],
        "train_over_moe": tps["train"] / tps["moe"],
        **{f"ms_adamw_{k}": v * 1e3 for k, v in adamw.items()},
        "adamw_loop_over_foreach": adamw["loop"] / adamw["foreach"],
        "adamw_loop_over_fused": adamw["loop"] / adamw["fused"],
        "adamw_foreach_share_of_moe_step": adamw["foreach"] / (t["moe"] / cfg.train.max_steps),
    }
    for name in (n for n in tps if n.startswith("train_malloc_")):
        reuse, system = ("train", name) if cfg.train.malloc == "reuse" else (name, "train")
        res["malloc_reuse_over_system"] = tps[reuse] / tps[system]
        res["malloc_reuse_over_system_in_loop"] = own[reuse] / own[system]
    print("  trainer " + fmt(res), flush=True)
    return res


def markdown(r: dict, res: dict) -> str:
    head = (f"\n### 7. Trainer speed: `moebalance train` ({r['preset']} preset) against a dense model of the same active parameters\n\n"
            f"{r['steps_per_call']} optimizer steps of {r['batch']} x {r['seq_len']} tokens per call, {r['dtype']}, "
            f"vocabulary {r['vocab_size']}, {r['mflop_per_token']:.2f} MFLOP/token (MoE), `train.malloc={r['malloc']}` in this process.\n\n")
    speeds = table([r], [("tokens_per_s_train", "train() tokens/s (wall)", ".0f"), ("tokens_per_s_train_in_loop", "train() tokens/s (its own)", ".0f"),
                         ("tokens_per_s_moe", "MoE bare step tokens/s", ".0f"), ("tokens_per_s_dense", "dense twin tokens/s", ".0f")])
    ratios = table([r], [("train_over_dense", "train (wall) / dense", ".2f"), ("train_in_loop_over_dense", "train (own) / dense", ".2f"),
                         ("moe_over_dense", "MoE bare / dense", ".2f"), ("train_over_moe", "train (wall) / MoE bare", ".2f"),
                         ("malloc_reuse_over_system", "train.malloc reuse / system (wall)", ".2f"),
                         ("malloc_reuse_over_system_in_loop", "reuse / system (own)", ".2f")])
    adamw = table([r], [("ms_adamw_loop", "per-parameter loop ms", ".1f"), ("ms_adamw_foreach", "foreach ms", ".1f"), ("ms_adamw_fused", "fused ms", ".1f"),
                        ("adamw_loop_over_foreach", "loop / foreach", ".2f"), ("adamw_loop_over_fused", "loop / fused", ".2f"),
                        ("adamw_foreach_share_of_moe_step", "foreach share of a bare MoE step", ".1%")])
    return head + speeds + "\n" + ratios + "\nAdamW step alone on the MoE model's parameters (fixed gradients, one round-robin):\n\n" + adamw
