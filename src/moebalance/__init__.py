"""moebalance: Auxiliary-Loss-Free Load Balancing for Mixture-of-Experts (arXiv 2408.15664).

The public building blocks: :class:`TopKRouter`, :class:`LossFreeBalancer`,
:class:`AuxLossBalancer`, :class:`MoELayer` and :func:`max_violation`. Training, data, reporting
and the CLI live in their own modules and are imported on use.
"""

from moebalance.balancing import STRATEGIES, AuxLossBalancer, Balancing, LossFreeBalancer
from moebalance.losses import (
    batch_aux_loss,
    global_batch_aux_loss,
    importance_loss,
    router_z_loss,
    sequence_aux_loss,
)
from moebalance.metrics import max_violation
from moebalance.moe import MoELayer, MoEOutput
from moebalance.routing import ExpertChoiceRouter, RouterOutput, TopKRouter

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
