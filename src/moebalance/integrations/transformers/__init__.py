"""Loss-Free Balancing for Hugging Face ``transformers`` MoE models (arXiv 2408.15664).

Shape legend: T tokens, D hidden size, E routed experts, K experts per token, L MoE layers.

:func:`apply_loss_free_balancing` finds every MoE router of a model and makes an expert-wise
float32 bias steer its top-K choice (eq. 3 of the paper) while the gate weights stay those of the
model's own scoring. It returns a :class:`LossFreeBalancing` handle that updates the biases once
per optimizer step (Algorithm 1 or another rule of :mod:`moebalance.rules`, through
:meth:`moebalance.LossFreeBalancer.bias_delta`; Quantile Balancing from the routers' recorded
scores through :meth:`~moebalance.LossFreeBalancer.score_delta`, :mod:`.scores`) and reports the
loads; :class:`LossFreeBalancingCallback` does that inside a ``Trainer``.

No router is re-implemented and no class name is listed. A router is what it does: the module
whose forward makes one ``topk`` over the ``E`` expert scores of each token (:mod:`.discovery`
finds it in a probe forward). Its forward then runs inside a selection mode (:mod:`.selection`)
that sees that one call: it records the choice for the load counts and, where the model has no
bias of its own, chooses on ``scores + expert_bias`` while handing the model's code the unbiased
scores. The adapter kinds, one module each:

* :mod:`.own_bias`: the model ships a selection bias (``e_score_correction_bias`` on the router
  or on the MoE block, ``moe_statics.e_score_correction_bias``, ``expert_bias``): that slot is
  trained, so plain transformers, vLLM and SGLang route with the trained bias;
* :mod:`.added_bias`: no slot: a persistent float32 ``expert_bias`` buffer is added to the router.

:mod:`.probe` proves, before the model is handed back, that its output and every router's choices
are bit-identical at the current bias and that a large bias steers every router; a family added to
a later transformers works without a code change when it routes this way. :mod:`.coverage`
generates the table of every MoE family of the installed transformers (docs/transformers.md).

Other modules: :mod:`.patch` (install / uninstall, proven or not at all), :mod:`.routers`
(counters, padding mask, float32 state), :mod:`.handle` (:class:`LossFreeBalancing`),
:mod:`.callback` (the Trainer callback), :mod:`.checkpoint` (bias files, config record, export),
:mod:`.apply` (the entry point), :mod:`.tiny` (tiny configs), :mod:`.peft` (PEFT ``modules_to_save``
copies, biases in adapter folders), :mod:`.resume` (the bias file of Trainer checkpoints, resume),
:mod:`.hub` (the local Hub cache), :mod:`.trl` (TRL's router aux loss and routing replay),
:mod:`.verify` (``moebalance verify``: plain transformers' routing of a saved folder against
moebalance's) and :mod:`.plain_probe` (its fresh-process half, which imports no moebalance). May import the library and
:mod:`moebalance.parallel` only.
"""

from moebalance.integrations.transformers.apply import apply_loss_free_balancing
from moebalance.integrations.transformers.callback import LossFreeBalancingCallback
from moebalance.integrations.transformers.checkpoint import CONFIG_KEY, export_biases
from moebalance.integrations.transformers.handle import LossFreeBalancing
from moebalance.integrations.transformers.patch import TESTED_TRANSFORMERS_VERSIONS
from moebalance.integrations.transformers.tiny import TINY_FAMILIES, tiny_moe_config

__all__ = [
    "CONFIG_KEY",
    "TESTED_TRANSFORMERS_VERSIONS",
    "TINY_FAMILIES",
    "LossFreeBalancing",
    "LossFreeBalancingCallback",
    "apply_loss_free_balancing",
    "export_biases",
    "tiny_moe_config",
]
