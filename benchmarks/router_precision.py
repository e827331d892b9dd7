"""How many tokens pick other experts when the router logits are computed in bf16 instead of float32.

Our router computes its logits, scores and top-K in float32 even under bf16 autocast or bf16
inputs; transformers' ``MixtralSparseMoeBlock`` computes the logits in the block's dtype. Tokens whose top-K set differs
get a different expert output, which is what the bf16 "max abs diff vs Mixtral" column of
``benchmarks/run.py`` shows.

    python benchmarks/router_precision.py                 # T=8192, D=512, E=16, K=2
    python benchmarks/router_precision.py --experts 64 --topk 6
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moebalance.routing import TopKRouter


def differing_tokens(T: int, D: int, E: int, K: int, seed: int = 0) -> int:
    """Tokens (of ``T``) whose softmax top-K set differs between bf16 and float32 router logits."""
    torch.manual_seed(seed)
    router = TopKRouter(D, E, K, score_func="softmax").eval()
    x = torch.randn(T, D).to(torch.bfloat16)
    with torch.no_grad():
        ours = router(x).indices.sort(-1).values  # float32 logits of the bf16 input
        logits_bf16 = F.linear(x, router.weight.to(torch.bfloat16))
        theirs = torch.topk(logits_bf16.float().softmax(-1), K, -1).indices.sort(-1).values
    return int((ours != theirs).any(-1).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    a = p.parse_args()
    n = differing_tokens(a.tokens, a.d_model, a.experts, a.topk)
    print(f"{n} of {a.tokens} tokens choose a different top-{a.topk} of {a.experts} experts with bf16 router logits")


if __name__ == "__main__":
    main()
