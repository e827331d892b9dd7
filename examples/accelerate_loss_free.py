"""Loss-Free Balancing in an Accelerate loop with gradient accumulation: a tiny Hugging Face MoE
(Qwen3-MoE by default) built from a config (nothing downloaded), trained on moebalance's built-in
corpus (the Python standard library, BPE-tokenized once and cached).

    python examples/accelerate_loss_free.py --out runs/accelerate
    accelerate launch --num_processes 2 examples/accelerate_loss_free.py --out runs/accelerate_dp2  # 2+ GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loss_free.py --out runs/accelerate_dp2  # CPU only

On a machine without GPUs, ``--multi_gpu`` is what starts 2 processes (through torchrun; this
script's ``Accelerator(cpu=True)`` then runs them data-parallel on CPU with gloo); ``--cpu
--num_processes 2`` starts a single process there (accelerate 1.16, no MPI hostfile).
``torchrun --nproc_per_node 2 examples/accelerate_loss_free.py ...`` works too.

The moebalance part is the lines marked ``# <-- moebalance``. ``optimizer.step()`` is called on
every micro-batch, as Accelerate's loops do; Accelerate skips the inner step until the last
micro-batch of the accumulation, and the bias update (a step hook on the inner optimizer) runs
only then. Under several processes the loads are summed over the ranks before the update. It
writes ``summary.json`` (validation loss, MaxVio_global per layer, MaxVio_batch of the first and
last steps) on the main process.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import accelerate
import torch
import transformers

from moebalance.integrations.transformers import TINY_FAMILIES, apply_loss_free_balancing, tiny_moe_config
from moebalance.metrics import max_violation
from moebalance.train.config import DataConfig
from moebalance.train.data import prepare_data


def windows(tokens, seq_len: int, limit: int = 0) -> torch.Tensor:
    """``[N, seq_len]`` int64 non-overlapping windows of a 1-D token array (the first ``limit``)."""
    n = len(tokens) // seq_len
    out = torch.from_numpy(tokens[: n * seq_len].astype("int64")).view(n, seq_len)
    return out[:limit] if limit else out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen3_moe", choices=TINY_FAMILIES)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--update-rate", type=float, default=1e-3, help="bias update rate u (paper default 1e-3)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary of the built-in corpus")
    p.add_argument("--max-files", type=int, default=200, help="first N files of the built-in corpus (0: all)")
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--out", default="runs/accelerate")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = prepare_data(DataConfig(vocab_size=args.vocab_size, max_files=args.max_files))
    train, val = windows(data.train, args.seq_len), windows(data.val, args.seq_len, args.val_windows)
    config = tiny_moe_config(args.family, vocab_size=data.vocab_size, hidden_size=args.hidden_size,
                             expert_hidden=args.hidden_size, max_seq_len=args.seq_len)
    model = transformers.AutoModelForCausalLM.from_config(config)
    balancing = apply_loss_free_balancing(model, args.update_rate)  # <-- moebalance: biases, aux loss off
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    balancing.attach(optimizer)  # <-- moebalance: one bias update per real optimizer step

    model.train()
    vio_batch, batches = [], iter(loader)
    while balancing.steps < args.steps:
        x = next(batches, None)
        if x is None:
            batches = iter(loader)
            continue
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=x, labels=x).loss)
            optimizer.step()  # a real step only on the last micro-batch of each accumulation
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            vio_batch.append(max_violation(balancing.last_loads).mean().item())

    model = accelerator.unwrap_model(model)
    vio_L = max_violation(balancing.validation_loads(val.split(args.batch_size)))  # <-- moebalance
    model.eval()
    with torch.no_grad():
        val_loss = sum(model(input_ids=x, labels=x).loss.item() for x in val.split(args.batch_size))
    val_loss /= len(val.split(args.batch_size))
    summary = {
        "family": args.family, "steps": balancing.steps, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
        "maxvio_global": vio_L.mean().item(), "maxvio_global_per_layer": vio_L.tolist(),
        "maxvio_batch_first_step": vio_batch[0], "maxvio_batch_last_step": vio_batch[-1],
        "bias_range": [balancing.biases().min().item(), balancing.biases().max().item()],
    }
    if accelerator.is_main_process:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
