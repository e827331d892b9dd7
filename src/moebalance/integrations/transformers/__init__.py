"""Loss-Free Balancing for Hugging Face ``transformers`` MoE models (arXiv 2408.15664).

Shape legend: T tokens, D hidden size, E routed experts, K experts per token, L MoE layers.

:func:`apply_loss_free_balancing` finds every MoE router of a supported model and makes an
expert-wise float32 bias steer its top-K choice (eq. 3 of the paper) while the gate weights stay
those of the model's own scoring. It returns a :class:`LossFreeBalancing` handle that updates the
biases once per optimizer step (Algorithm 1, through :meth:`moebalance.LossFreeBalancer.bias_delta`)
and reports the loads; :class:`LossFreeBalancingCallback` does that inside a ``Trainer``.

Supported routers, checked against transformers **5.24.0** (the version in the dev environment).
In 5.x each MoE block holds a router module ``gate`` whose ``forward(hidden_states)`` returns
``(router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])``:

=================  =======================  =========================================================
family             router class             how it scores (5.24.0)
=================  =======================  =========================================================
Mixtral            ``MixtralTopKRouter``    softmax over float32 logits, top-K, always renormalised,
                                            weights stay float32
Qwen2-MoE          ``Qwen2MoeTopKRouter``   softmax (float32), top-K, renormalised if
                                            ``norm_topk_prob``, weights cast to the logits' dtype
Qwen3-MoE          ``Qwen3MoeTopKRouter``   as Qwen2-MoE
OLMoE              ``OlmoeTopKRouter``      as Qwen2-MoE
DeepSeek-V3        ``DeepseekV3TopkRouter`` sigmoid, ``e_score_correction_bias`` added for the
                                            (group-limited) top-K choice only; the bias is loaded
                                            but nothing in transformers updates it
=================  =======================  =========================================================

For the softmax families the router's ``forward`` is replaced, on the instance only, by one that
selects the top-K on ``softmax + expert_bias`` (via :func:`moebalance.routing.route_topk`) and takes
the gate weights from the unbiased softmax, in the same order of operations as the model's own
code. Because that must match transformers bit for bit, :func:`apply_loss_free_balancing` runs the
original and the patched router on a probe input and refuses (``RuntimeError``) if they differ,
so a transformers release that changes its routing is caught instead of silently altered.
transformers 4.x computed the routing inline in the MoE block (``gate`` was an ``nn.Linear``); that
layout is refused with a clear error. DeepSeek-V3 needs no patch: its own bias is adopted and
only the load counting is added (a forward hook).

The bias is a persistent float32 buffer, so ``save_pretrained`` writes it: ``<router>.expert_bias``
for the softmax families (an unpatched ``transformers`` ignores that key and names it UNEXPECTED in
its load report; re-applying the patch to a model loaded from the folder reads it back), and
DeepSeek-V3's own ``e_score_correction_bias`` (loaded by unpatched ``transformers`` as is).
``config.json`` records the training under ``moebalance_loss_free``.

Loads count the tokens the router sees in training mode, padding excluded when the model is called
with a ``[B, S]`` ``attention_mask``. The load counters are plain tensor attributes, not buffers,
so DDP's buffer broadcast cannot overwrite one rank's counts with another's.

Modules: :mod:`.families` (supported classes, the softmax patch and the DeepSeek-V3 adapter),
:mod:`.routers` (counters, padding mask, float32 state), :mod:`.handle` (:class:`LossFreeBalancing`),
:mod:`.callback` (the Trainer callback), :mod:`.checkpoint` (bias files, config record, export),
:mod:`.apply` (the entry point), :mod:`.tiny` (tiny configs), :mod:`.verify` (``moebalance verify``:
plain transformers' routing of a saved folder against moebalance's) and :mod:`.plain_probe` (its
fresh-process half, which imports no moebalance). May import the library and
:mod:`moebalance.parallel` only.
"""

from moebalance.integrations.transformers.apply import apply_loss_free_balancing
from moebalance.integrations.transformers.callback import LossFreeBalancingCallback
from moebalance.integrations.transformers.checkpoint import CONFIG_KEY, export_biases
from moebalance.integrations.transformers.families import SUPPORTED_ROUTERS, TESTED_TRANSFORMERS_VERSIONS
from moebalance.integrations.transformers.handle import LossFreeBalancing
from moebalance.integrations.transformers.tiny import TINY_FAMILIES, tiny_moe_config

__all__ = [
    "CONFIG_KEY",
    "SUPPORTED_ROUTERS",
    "TESTED_TRANSFORMERS_VERSIONS",
    "TINY_FAMILIES",
    "LossFreeBalancing",
    "LossFreeBalancingCallback",
    "apply_loss_free_balancing",
    "export_biases",
    "tiny_moe_config",
]
