"""Section 4 "balancing": the price of balancing. One full training step (forward, backward,
AdamW, balancing) of the default small LM with ``none``, ``loss_free`` and ``aux_loss``; the
Loss-Free bias update alone for 64 layers x 256 experts, for every bias rule of
``moebalance.rules`` beside the sign rule (and, for the quantile rule, what the routers record
during the step); training tokens/s against the machine's dense GEMM rate. The first of
``--dtypes`` (bf16 under autocast, as the trainer runs it)."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from pieces import DTYPES, fmt, model_flops_per_token, table
from timing import Timer, fwd_bwd

from moebalance.balancing import Balancing, LossFreeBalancer
from moebalance.routing import TopKRouter
from moebalance.rules import QuantileRule, make_rule
from moebalance.train.config import ModelConfig
from moebalance.train.model import MoETransformer


def _strategy_steps(cfg: ModelConfig, x, y, device: torch.device, dtype: torch.dtype, timer: Timer):
    """One training-step closure per strategy, and the times of the balancing call inside each."""
    fns = {}
    after_step_s: dict[str, list[float]] = {}  # the balancing call at the end of each step, timed inside it
    for strategy in ("none", "loss_free", "aux_loss"):
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(device)  # float32 weights; bf16 runs under autocast, as the trainer does
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        bal = Balancing(strategy)

        def step(model=model, opt=opt, bal=bal, times=after_step_s.setdefault(strategy, [])) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(x, y)
            extra, _ = bal.loss(out.routing)
            loss = out.loss if extra is None else out.loss + extra
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(timer.once(lambda: bal.after_step(model)))

        fns[strategy] = step
    return fns, after_step_s


#: The rules timed beside the sign rule (section 4b): name -> rule factory.
RULE_CASES = {
    "sign": lambda: make_rule("sign"),
    "error": lambda: make_rule("error"),
    "smebu": lambda: make_rule("smebu"),
    "proportional": lambda: make_rule("proportional"),
    "quantile_microbatch": lambda: QuantileRule("microbatch"),
    "quantile_pooled": lambda: QuantileRule("pooled"),
    "quantile_histogram": lambda: QuantileRule("histogram", bins=1000),
}


def rule_costs(args, timer: Timer, device: torch.device, gen: torch.Generator) -> list[dict]:
    """Per rule, 64 layers x 256 experts (top-8): the median µs of one ``LossFreeBalancer.step``
    (loads read and all-reduced as in one process, the rule's update, the counters cleared) and,
    for the quantile rule, of recording one micro-batch's scores in all 64 routers (what the
    routers add to a training forward). Round-robin over the rules, ``args.bias_calls`` rounds;
    the loads and scores are set before each timed call, outside it."""
    layers, experts, top_k = 64, 256, 8
    tokens = 256 if args.quick else 4096  # tokens of the recorded micro-batch (T*K divisible by E)
    routers = torch.nn.ModuleList(TopKRouter(8, experts, top_k) for _ in range(layers)).to(device)
    loads = torch.randint(0, 100, (layers, experts), generator=gen).float().to(device)
    scores = torch.rand(layers, tokens, experts, generator=gen).to(device)
    balancers = {name: LossFreeBalancer(1e-3, make(), all_reduce=None) for name, make in RULE_CASES.items()}
    step_s: dict[str, list[float]] = {name: [] for name in RULE_CASES}
    record_s: dict[str, list[float]] = {name: [] for name in RULE_CASES if name.startswith("quantile")}

    def record() -> None:
        for r, s_TE in zip(routers, scores):
            r.score_recorder(s_TE, r.expert_bias)

    for _ in range(args.bias_calls + 1):  # the first round is a warm-up
        for name, lf in balancers.items():
            for r, row in zip(routers, loads):
                r.load_counts.copy_(row)
                r.score_recorder = None
            if name in record_s:
                lf.prepare(routers)
                record_s[name].append(timer.once(record))
            step_s[name].append(timer.once(lambda lf=lf: lf.step(routers)))
    for r in routers:
        r.score_recorder = None
    rows = []
    for name in RULE_CASES:
        step_us = statistics.median(step_s[name][1:]) * 1e6
        row = {"rule": name, "update_us": step_us, "record_us": statistics.median(record_s[name][1:]) * 1e6 if name in record_s else None}
        rows.append(row)
    sign_us = rows[0]["update_us"]
    for row in rows:
        row["update_over_sign"] = row["update_us"] / sign_us
        row["tokens"] = tokens
    return rows


def dense_gemm_seconds(n: int, D: int, device: torch.device, dtype: torch.dtype, timer: Timer) -> tuple[float, int]:
    """The machine's dense ceiling: median seconds and FLOPs of fwd+bwd of a ``[n, D] x [D, 4D]``
    GEMM pair, under the same autocast as the model."""
    a = torch.randn(n, D, device=device, requires_grad=True)
    w = torch.randn(4 * D, D, device=device, requires_grad=True)
    v = torch.randn(D, 4 * D, device=device, requires_grad=True)
    gd = torch.randn(n, D, device=device)
    gemm_module = torch.nn.ParameterList([w, v])

    def gemm_pair() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return F.linear(F.linear(a, w), v).float()

    seconds = timer.compare({"gemm": fwd_bwd(gemm_module, gemm_pair, gd)})["gemm"]
    return seconds, 2 * n * D * 4 * D * 2 * 3  # two GEMMs, forward + two backward products each


def run(args, timer: Timer, device: torch.device) -> dict:
    """The step of each strategy (one round-robin), the bias update alone, the dense GEMM rate."""
    cfg = ModelConfig(**args.lm)
    B, S = args.lm_batch, args.lm_seq
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    dtype = DTYPES[args.dtypes[0]]
    fns, after_step_s = _strategy_steps(cfg, x, y, device, dtype, timer)
    t = timer.compare(fns)

    # The bias update alone: Algorithm 1 for 64 layers x 256 experts (the loads read, the sign
    # update, the counters cleared), median of many calls.
    routers = torch.nn.ModuleList(TopKRouter(8, 256, 8) for _ in range(64)).to(device)
    for r in routers:
        r.load_counts.copy_(torch.randint(0, 100, (256,), generator=gen).float())
    lf = LossFreeBalancer(1e-3)
    upd = [timer.once(lambda: lf.step(routers)) for _ in range(args.bias_calls)]

    rules = rule_costs(args, timer, device, gen)
    gemm, gemm_flops = dense_gemm_seconds(B * S, cfg.d_model, device, dtype, timer)
    flops_tok = model_flops_per_token(cfg, S)
    res = {
        "model": args.lm, "batch": B, "seq_len": S, "dtype": args.dtypes[0],
        **{f"ms_step_{k}": v * 1e3 for k, v in t.items()},
        "loss_free_over_none": t["loss_free"] / t["none"],
        "aux_loss_over_none": t["aux_loss"] / t["none"],
        "bias_update_us_in_step": statistics.median(after_step_s["loss_free"]) * 1e6,
        "bias_update_share_of_step": statistics.median(after_step_s["loss_free"]) / t["loss_free"],
        "bias_update_us_64x256": statistics.median(upd) * 1e6,
        "tokens_per_s": B * S / t["loss_free"],
        "model_tflops_per_token": flops_tok / 1e12,
        "dense_gemm_gflops": gemm_flops / gemm / 1e9,
        "fraction_of_dense_ceiling": flops_tok * B * S / t["loss_free"] / (gemm_flops / gemm),
    }
    print("  balancing " + fmt(res), flush=True)
    for row in rules:
        print("  bias rule " + fmt(row), flush=True)
    res["rules"] = rules
    return res


def markdown(b: dict, res: dict) -> str:
    out = "\n### 4. The price of balancing: one training step of the small LM\n\n"
    out += table([b], [("ms_step_none", "none ms", ".1f"), ("ms_step_loss_free", "loss_free ms", ".1f"), ("ms_step_aux_loss", "aux_loss ms", ".1f"),
                       ("loss_free_over_none", "loss_free / none", ".3f"), ("aux_loss_over_none", "aux_loss / none", ".3f"),
                       ("bias_update_us_in_step", "bias update in the step (µs)", ".0f"),
                       ("bias_update_share_of_step", "its share of the step", ".2%"),
                       ("bias_update_us_64x256", "bias update, 64x256 (µs)", ".0f")])
    out += ("\nTraining throughput (loss_free): " + f"{b['tokens_per_s']:.0f} tokens/s, {b['model_tflops_per_token'] * 1e6:.2f} MFLOP/token, "
            f"{b['fraction_of_dense_ceiling']:.2f} of the dense GEMM rate ({b['dense_gemm_gflops']:.1f} GFLOP/s).\n")
    if b.get("rules"):
        tokens = b["rules"][0]["tokens"]
        out += ("\n#### 4b. Each bias rule's update beside the sign rule (64 layers x 256 experts, top-8)\n\n"
                f"`update`: one `LossFreeBalancer.step` in one process; `record`: the quantile rule's recording of one "
                f"micro-batch of {tokens} tokens in all 64 routers (added to the training forwards).\n\n")
        out += table(b["rules"], [("rule", "rule", ""), ("update_us", "update (µs)", ".0f"), ("update_over_sign", "update / sign", ".2f"),
                                  ("record_us", "record per micro-batch (µs)", ".0f")])
    return out
