"""moebalance: Auxiliary-Loss-Free Load Balancing for Mixture-of-Experts (arXiv 2408.15664).

The public building blocks: :class:`TopKRouter`, :class:`LossFreeBalancer`,
:class:`AuxLossBalancer`, :class:`MoELayer` and :func:`max_violation`. Training, data, reporting
and the CLI live in their own modules and are imported on use; so are these names (the
package itself imports no torch until one is used).
"""

import importlib
from typing import Any

#: Public name -> the library module that defines it. Imported on first use (PEP 562), so that
#: ``import moebalance.cli`` does not import torch (seconds): the command line catches a Ctrl-C
#: during that import and exits 130 with one line instead of a traceback.
_HOMES = {
    "STRATEGIES": "balancing",
    "AuxLossBalancer": "balancing",
    "Balancing": "balancing",
    "LossFreeBalancer": "balancing",
    "batch_aux_loss": "losses",
    "global_batch_aux_loss": "losses",
    "importance_loss": "losses",
    "router_z_loss": "losses",
    "sequence_aux_loss": "losses",
    "max_violation": "metrics",
    "MoELayer": "moe",
    "MoEOutput": "moe",
    "ExpertChoiceRouter": "routing",
    "RouterOutput": "routing",
    "TopKRouter": "routing",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f"moebalance.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "AuxLossBalancer",
    "Balancing",
    "ExpertChoiceRouter",
    "LossFreeBalancer",
    "MoELayer",
    "MoEOutput",
    "RouterOutput",
    "TopKRouter",
    "batch_aux_loss",
    "global_batch_aux_loss",
    "importance_loss",
    "max_violation",
    "router_z_loss",
    "sequence_aux_loss",
]
