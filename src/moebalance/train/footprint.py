"""What a run config needs in memory, estimated from the config alone, before anything is built.

A typo in a size (``model.n_layers=10**30``, ``model.d_expert=2**63-1``, ``train.batch_size=10**30``)
otherwise reaches torch as an allocation that overflows int64 or cannot be satisfied, minutes later
and with torch's words. :func:`estimate` counts in Python integers (no overflow) what the trainer
will hold: the parameters with their gradients and AdamW moments, the rotary tables, and a lower
bound of the activations one micro-batch keeps for backward. :func:`check_fits` refuses a config
whose estimate exceeds this machine's memory (RAM, or the GPU's memory for ``cuda``), naming the
fields of the largest term.

The activation count is a lower bound (the tensors every step must keep: block inputs, attention
projections, the routed rows of the experts, the logits), so a refusal is certain, never a guess;
a config that passes may still fail at work, which the CLI reports as exit 4 with the same
estimate (:func:`describe`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moebalance.train.config import RunConfig

__all__ = ["Footprint", "available_bytes", "check_fits", "describe", "estimate"]

#: Bytes a float32 parameter costs in training: the weight, its gradient and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


@dataclass(frozen=True)
class Footprint:
    """A config's memory estimate on one rank (bytes) and the terms it is made of.

    Attributes:
        parameters: number of parameters (routed experts of this rank only under expert parallelism).
        terms: ``(what, fields, bytes)`` per term, largest first; ``fields`` names the config keys
            that set it.
        total_bytes: the sum of ``terms``.
    """

    parameters: int
    terms: tuple[tuple[str, str, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(t[2] for t in self.terms)


def _size(n: int) -> str:
    """``n`` bytes as ``12.3 GiB`` (``1.2e+21 TiB`` for absurd sizes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def _vocab(cfg: RunConfig) -> int:
    """The vocabulary the model will have: the tokenizer's (``data``), which replaces
    ``model.vocab_size`` when the data is prepared, or the checkpoint's own (then they agree)."""
    return max(cfg.data.bin_vocab_size or cfg.data.vocab_size, min(cfg.model.vocab_size, 65536))


def estimate(cfg: RunConfig, world_size: int = 1) -> Footprint:
    """Estimate what training ``cfg`` holds in memory on one rank (see the module docstring).

    Args:
        cfg: the run config.
        world_size: ranks of the job; under ``train.expert_parallel`` each holds ``1/world_size``
            of the routed experts.

    Returns:
        :class:`Footprint` (exact Python integers: a size of 10**30 is counted, not overflowed).
    """
    m, t = cfg.model, cfg.train
    D, F, E, K, L, V = m.d_model, m.d_expert, m.num_experts, m.top_k, m.n_layers, _vocab(cfg)
    moe_layers, dense_layers, S = L - m.first_dense_layers, m.first_dense_layers, m.num_shared_experts
    local_E = -(-E // world_size) if t.expert_parallel else E
    T = t.batch_size * t.seq_len  # tokens of one micro-batch
    p, a = TRAINING_BYTES_PER_PARAMETER, 2 if t.dtype == "bfloat16" else 4
    kept = 1 if m.activation_checkpointing else L  # recomputed blocks keep only their input
    moe_kept = min(kept, moe_layers)
    tokens, vocab = "train.batch_size x train.seq_len", "data.vocab_size"
    params = {
        "routed experts": ("model.n_layers x model.num_experts x model.d_model x model.d_expert", moe_layers * local_E * 3 * D * F),
        "shared experts": ("model.n_layers x model.num_shared_experts x model.d_model x model.d_expert", moe_layers * S * 3 * D * F),
        "attention and routers": ("model.n_layers x model.d_model (x model.num_experts)", L * (4 * D * D + 2 * D) + moe_layers * E * (D + 1)),
        "dense layers": ("model.first_dense_layers x model.d_model x model.d_ff_dense", dense_layers * 3 * D * m.d_ff_dense),
        "embeddings": (f"{vocab} x model.d_model", V * D * (1 if m.tie_embeddings else 2) + D),
    }
    terms = [(f"parameters of the {k} (weights, gradients, AdamW state)", f, n * p) for k, (f, n) in params.items()]
    terms += [
        ("attention activations", f"{tokens} x model.n_layers x model.d_model", T * a * (kept * 6 * D + (L - kept) * D)),
        ("activations of the routed rows", f"{tokens} x model.n_layers x model.top_k x model.d_expert", T * a * moe_kept * K * (2 * D + 3 * F)),
        ("activations of the shared experts", f"{tokens} x model.n_layers x model.num_shared_experts x model.d_expert", T * a * moe_kept * 3 * S * F),
        ("router scores", f"{tokens} x model.n_layers x model.num_experts", T * a * moe_kept * 2 * E),
        ("activations of the dense layers", f"{tokens} x model.first_dense_layers x model.d_ff_dense", T * a * min(kept, dense_layers) * 3 * m.d_ff_dense),
        ("logits (and their float32 softmax)", f"{tokens} x {vocab}", T * V * 2 * 4),
        ("rotary tables", "model.max_seq_len x model.d_model / model.n_heads", m.max_seq_len * (D // m.n_heads) * 4),
    ]
    terms.sort(key=lambda term: -term[2])
    return Footprint(parameters=sum(n for _, n in params.values()), terms=tuple(terms))


def describe(fp: Footprint) -> str:
    """One line: the total, the parameter count and the largest term with its fields."""
    what, fields, n = fp.terms[0]
    return (
        f"this config needs at least {_size(fp.total_bytes)} ({fp.parameters:.3g} parameters; largest: "
        f"{what}, {_size(n)}, set by {fields})"
    )


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit():
            return int(text)
    return None


def available_bytes(device: str) -> int | None:
    """Memory a run on ``device`` can use at most: the GPU's total memory for ``cuda``, else the
    machine's physical memory (or its cgroup limit, when lower). ``None`` where unknown."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return _cgroup_limit()
    limit = _cgroup_limit()
    return min(ram, limit) if limit else ram


def check_fits(cfg: RunConfig, world_size: int = 1, local_ranks: int | None = None) -> Footprint:
    """Refuse a config that cannot fit this machine's memory.

    Args:
        cfg: the run config.
        world_size: ranks of the job (expert parallelism divides the routed experts over them).
        local_ranks: the ranks on this machine (default ``world_size``). On the CPU they share
            its memory; on CUDA each rank has its own GPU.

    Returns:
        the :class:`Footprint` of one rank.

    Raises:
        ValueError: the estimate (times ``world_size`` on the CPU) exceeds :func:`available_bytes`,
            naming the fields of the largest term and the estimate.
    """
    fp = estimate(cfg, world_size)
    ranks_here = 1 if cfg.train.device.startswith("cuda") else (local_ranks or world_size)
    have = available_bytes(cfg.train.device)
    if have is not None and fp.total_bytes * ranks_here > have:
        where = "this GPU" if ranks_here == 1 and cfg.train.device.startswith("cuda") else "this machine"
        per = f" per rank, x{ranks_here} ranks" if ranks_here > 1 else ""
        raise ValueError(f"{describe(fp)}{per}; {where} has {_size(have)}: lower the fields named")
    return fp
