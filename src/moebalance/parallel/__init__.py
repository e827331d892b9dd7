"""Parallel training on ``torch.distributed``: process groups and collectives, data parallelism,
expert parallelism.

Modules (each imports only those above it, and the library):

* :mod:`~moebalance.parallel.process`: the process group, every collective, the ``torchrun`` launcher;
* :mod:`~moebalance.parallel.expert_parallel`: an MoE layer whose experts are sharded over ranks;
* :mod:`~moebalance.parallel.data_parallel`: DDP, the global gradient norm, bias checksums.

This floor may import the library (``moebalance.routing``, ``balancing``, ``experts``, ``moe``, ...)
and nothing of the trainer, the lab or the CLI. The model code stays single-process; these
functions wrap it from outside.
"""

from moebalance.parallel.data_parallel import (
    bias_checksum,
    clip_grad_norm_,
    gather_bias_checksums,
    no_sync,
    wrap_data_parallel,
)
from moebalance.parallel.expert_parallel import (
    ExpertParallelMoELayer,
    apply_expert_parallel,
    expert_parameter_names,
    full_state_dict,
)
from moebalance.parallel.process import (
    DistContext,
    all_reduce_sum_,
    all_to_all_rows,
    any_rank_reason,
    exchange_counts,
    gather_expert_shards,
    gather_objects,
    init_distributed,
    launch,
    main_first,
    mean_over_ranks,
    shard_rows,
    shutdown,
    torchrun_command,
)

__all__ = [
    "DistContext",
    "ExpertParallelMoELayer",
    "all_reduce_sum_",
    "all_to_all_rows",
    "any_rank_reason",
    "apply_expert_parallel",
    "bias_checksum",
    "clip_grad_norm_",
    "exchange_counts",
    "expert_parameter_names",
    "full_state_dict",
    "gather_bias_checksums",
    "gather_expert_shards",
    "gather_objects",
    "init_distributed",
    "launch",
    "main_first",
    "mean_over_ranks",
    "no_sync",
    "shard_rows",
    "shutdown",
    "torchrun_command",
    "wrap_data_parallel",
]
