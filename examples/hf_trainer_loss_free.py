"""Train a tiny Hugging Face MoE (Qwen3-MoE by default) with Loss-Free Balancing and ``Trainer``.

The model is built from a config (random init, nothing downloaded) and trained on moebalance's
built-in corpus (the Python standard library, BPE-tokenized once and cached). The default run takes
a minute or two on 2 CPU cores:

    python examples/hf_trainer_loss_free.py --out runs/hf_example
    python examples/hf_trainer_loss_free.py --no-balance --out runs/hf_example_aux   # transformers' aux loss only

It writes ``summary.json`` (validation loss, MaxVio_global per layer, and ``maxvio_batch_first_log`` /
``maxvio_batch_last_log``: the ``moe/maxvio_batch`` of the first and last training logs, each the
mean MaxVio_batch over the optimizer steps since the previous log) and TensorBoard events under ``<out>/runs/`` (``moe/maxvio_batch``, bias range, ...).
The moebalance part is the three lines marked ``# <-- moebalance``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import transformers

from moebalance.integrations.transformers import TINY_FAMILIES, apply_loss_free_balancing, tiny_moe_config
from moebalance.metrics import max_violation
from moebalance.train.config import DataConfig
from moebalance.train.data import prepare_data


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len`` tokens of a 1-D token array (labels = inputs; the
    model shifts them)."""

    def __init__(self, tokens, seq_len: int, max_windows: int = 0) -> None:
        n = len(tokens) // seq_len
        self.windows = torch.from_numpy(tokens[: n * seq_len].astype("int64")).view(n, seq_len)
        if max_windows:
            self.windows = self.windows[:max_windows]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen3_moe", choices=TINY_FAMILIES)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--update-rate", type=float, default=1e-3, help="bias update rate u (paper default 1e-3)")
    p.add_argument("--no-balance", action="store_true", help="baseline: no bias, transformers' auxiliary loss")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary of the built-in corpus")
    p.add_argument("--max-files", type=int, default=200, help="first N files of the built-in corpus (0: all)")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows for the final evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--out", default="runs/hf_example")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = prepare_data(DataConfig(vocab_size=args.vocab_size, max_files=args.max_files))
    train_ds = TokenWindows(data.train, args.seq_len)
    val_ds = TokenWindows(data.val, args.seq_len, args.val_windows)

    config = tiny_moe_config(
        args.family,
        vocab_size=data.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden=args.hidden_size,
        max_seq_len=args.seq_len,
    )
    if args.no_balance:
        config.output_router_logits = True  # transformers' own auxiliary loss (coefficient from the config)
    model = transformers.AutoModelForCausalLM.from_config(config)

    # <-- moebalance: bias on every router; transformers' aux loss off (kept for the baseline)
    balancing = apply_loss_free_balancing(model, args.update_rate, disable_aux_loss=not args.no_balance)
    balancing.update_biases = not args.no_balance  # the baseline is only measured

    targs = transformers.TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.steps // 20),
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds)
    balancing.attach(trainer)  # <-- moebalance: bias update after each optimizer step, metrics in the logs
    train_out = trainer.train()

    eval_metrics = trainer.evaluate()
    batches = (val_ds.windows[i : i + args.batch_size] for i in range(0, len(val_ds), args.batch_size))
    vio_L = max_violation(balancing.validation_loads(batches))  # <-- moebalance: MaxVio_global
    vio_batch = [r["moe/maxvio_batch"] for r in trainer.state.log_history if "moe/maxvio_batch" in r]
    summary = {
        "family": args.family,
        "balancing": "aux_loss (transformers)" if args.no_balance else f"loss_free u={args.update_rate:g}",
        "steps": trainer.state.global_step,
        "val_loss": eval_metrics["eval_loss"],
        "val_ppl": math.exp(eval_metrics["eval_loss"]),
        "maxvio_global": vio_L.mean().item(),
        "maxvio_global_per_layer": vio_L.tolist(),
        "maxvio_batch_first_log": vio_batch[0] if vio_batch else None,
        "maxvio_batch_last_log": vio_batch[-1] if vio_batch else None,
        "bias_range": [balancing.biases().min().item(), balancing.biases().max().item()],
        "train_runtime_s": train_out.metrics["train_runtime"],
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
