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
for the softmax families (an unpatched ``transformers`` ignores that key; re-applying the patch to
a model loaded from the folder reads it back), and DeepSeek-V3's own ``e_score_correction_bias``
(loaded by unpatched ``transformers`` as is).

Loads count every token the router sees in training mode, padding included (the routers are not
given the attention mask).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from moebalance.balancing import LossFreeBalancer, UpdateMode
from moebalance.metrics import max_violation
from moebalance.routing import _in_backward_recompute, count_tokens_per_expert, route_topk

log = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ROUTERS",
    "LossFreeBalancing",
    "LossFreeBalancingCallback",
    "apply_loss_free_balancing",
    "tiny_moe_config",
]

TESTED_TRANSFORMERS_VERSIONS = ("5.24.0",)


@dataclass(frozen=True)
class _Family:
    """How one router class scores, as read from its transformers source."""

    family: str
    native_bias: str | None = None  # name of the model's own selection-bias buffer, if any
    renormalize: Literal["always", "norm_topk_prob"] = "norm_topk_prob"
    cast_weights_to_logits_dtype: bool = True


SUPPORTED_ROUTERS: dict[str, _Family] = {
    "MixtralTopKRouter": _Family("Mixtral", renormalize="always", cast_weights_to_logits_dtype=False),
    "Qwen2MoeTopKRouter": _Family("Qwen2-MoE"),
    "Qwen3MoeTopKRouter": _Family("Qwen3-MoE"),
    "OlmoeTopKRouter": _Family("OLMoE"),
    "DeepseekV3TopkRouter": _Family("DeepSeek-V3", native_bias="e_score_correction_bias"),
}

_SUPPORTED_TEXT = ", ".join(f"{f.family} ({name})" for name, f in SUPPORTED_ROUTERS.items())


def _family_of(module: nn.Module) -> _Family | None:
    for cls in type(module).__mro__:
        if cls.__name__ in SUPPORTED_ROUTERS:
            return SUPPORTED_ROUTERS[cls.__name__]
    return None


# ---------------------------------------------------------------------------------------------
# The patched router
# ---------------------------------------------------------------------------------------------


def _softmax_router_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Replacement ``forward`` of a softmax top-K router (Mixtral, Qwen2/3-MoE, OLMoE in 5.x).

    Same operations as the model's own router, except that the top-K is chosen on
    ``probs + expert_bias`` (arXiv 2408.15664 eq. 3); the gate weights are gathered from the
    unbiased ``probs``. With a zero bias the result is bit-identical to the original.

    Returns:
        ``(router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])`` as transformers does.
    """
    spec: _Family = self._moebalance_family
    hidden_TD = hidden_states.reshape(-1, self.hidden_dim)
    logits_TE = F.linear(hidden_TD, self.weight)
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    index_TK = route_topk(probs_TE.detach(), self.top_k, self.expert_bias)
    weights_TK = probs_TE.gather(1, index_TK)  # unbiased: the bias only selects
    if spec.renormalize == "always" or self.norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if spec.cast_weights_to_logits_dtype:
        weights_TK = weights_TK.to(logits_TE.dtype)
    _count(self, index_TK)
    return logits_TE, weights_TK, index_TK


def _count(router: nn.Module, index_TK: torch.Tensor) -> None:
    """Add a training forward's load to ``router.moebalance_load_counts`` (not in eval, not twice
    under activation-checkpoint recomputation)."""
    if router.training and not _in_backward_recompute():
        with torch.no_grad():
            counts = count_tokens_per_expert(index_TK.reshape(-1, index_TK.shape[-1]), router.num_experts)
            router.moebalance_load_counts += counts.to(router.moebalance_load_counts)


def _count_hook(router: nn.Module, args, output) -> None:
    _count(router, output[2])


def _keep_fp32_apply(self: nn.Module, fn, recurse: bool = True):
    """``_apply`` that keeps the balancing buffers float32 through dtype casts (an update of 1e-3
    vanishes in bfloat16 once the bias nears 1) and moves them with the router's weight."""
    names = [self._moebalance_bias_name, "moebalance_load_counts"]
    state = {name: self._buffers.pop(name) for name in names}
    try:
        type(self)._apply(self, fn, recurse)
    finally:
        for name, buf in state.items():
            self._buffers[name] = buf.to(device=self.weight.device, dtype=torch.float32)
    return self


# ---------------------------------------------------------------------------------------------
# Handle
# ---------------------------------------------------------------------------------------------


def _default_all_reduce(loads_LE: torch.Tensor) -> None:
    """Sum the loads over data-parallel ranks when a process group is running (DDP, FSDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(loads_LE, op=torch.distributed.ReduceOp.SUM)


class LossFreeBalancing:
    """The patched routers of one model and their bias update (arXiv 2408.15664 Algorithm 1).

    Built by :func:`apply_loss_free_balancing`. In a plain loop call :meth:`step` once after each
    ``optimizer.step()``; with a ``Trainer`` use :meth:`callback` (or :meth:`attach`).

    Attributes:
        routers: the L router modules, in module order.
        router_names: their qualified names in the model.
        balancer: the :class:`~moebalance.LossFreeBalancer` whose ``bias_delta`` is applied.
        last_loads: ``[L, E]`` float32 loads of the last :meth:`step` (``None`` before it).
        update_biases: when False, :meth:`step` still reads, all-reduces and reports the loads but
            leaves the biases alone (to monitor a baseline, e.g. one trained with the auxiliary loss).
    """

    def __init__(
        self,
        model: nn.Module,
        routers: list[tuple[str, nn.Module]],
        balancer: LossFreeBalancer,
        all_reduce: Callable[[torch.Tensor], None] | None,
    ) -> None:
        self.model = model
        self.router_names = [name for name, _ in routers]
        self.routers = [r for _, r in routers]
        self.balancer = balancer
        self.all_reduce = all_reduce
        self.last_loads: torch.Tensor | None = None
        self.update_biases = True

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def bias_tensors(self) -> list[torch.Tensor]:
        """The live ``[E]`` float32 bias buffers, one per router (writing to them steers routing)."""
        return [getattr(r, r._moebalance_bias_name) for r in self.routers]

    def biases(self) -> torch.Tensor:
        """``[L, E]`` float32 copy of the biases (all routers must have the same ``E``)."""
        return torch.stack([b.detach().float().cpu() for b in self.bias_tensors()])

    def pending_loads(self) -> torch.Tensor:
        """``[L, E]`` float32 tokens routed per expert in training mode since the last step."""
        return torch.stack([r.moebalance_load_counts.detach().cpu() for r in self.routers])

    def reset_loads(self) -> None:
        """Forget the loads counted since the last step (e.g. a skipped step)."""
        for r in self.routers:
            r.moebalance_load_counts.zero_()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One bias update from the loads counted since the previous call, then clear them.

        Call once per optimizer step, after all gradient-accumulation micro-batches. The loads are
        all-reduced first (sum over data-parallel ranks), so every rank applies the same update.
        A layer with no load (no training forward since the last step) is left unchanged.

        Returns:
            ``[L, E]`` float32 global loads used for the update.
        """
        loads_LE = torch.stack([r.moebalance_load_counts for r in self.routers]).clone()
        self.reset_loads()
        if self.all_reduce is not None:
            self.all_reduce(loads_LE)
        if self.update_biases:
            delta_LE = self.balancer.bias_delta(loads_LE)
            for bias, delta_E in zip(self.bias_tensors(), delta_LE):
                bias += delta_E.to(bias.device, bias.dtype)
        self.last_loads = loads_LE.cpu()
        return self.last_loads

    def metrics(self, loads_LE: torch.Tensor | None = None) -> dict[str, float]:
        """Scalars for logging: :meth:`maxvio_metrics` of ``loads_LE`` (default: the last step's
        loads) and :meth:`bias_metrics`."""
        loads_LE = self.last_loads if loads_LE is None else loads_LE
        out = {} if loads_LE is None else self.maxvio_metrics(max_violation(loads_LE))
        out.update(self.bias_metrics())
        return out

    @staticmethod
    def maxvio_metrics(vio_L: torch.Tensor) -> dict[str, float]:
        """``moe/maxvio_batch`` (mean over layers) and ``moe/maxvio_batch_layer{i}`` from ``[L]`` MaxVio."""
        out = {"moe/maxvio_batch": vio_L.mean().item()}
        out.update({f"moe/maxvio_batch_layer{i}": v for i, v in enumerate(vio_L.tolist())})
        return out

    def bias_metrics(self) -> dict[str, float]:
        """``moe/bias_min``, ``moe/bias_max`` (over all layers) and ``moe/bias_range_layer{i}``
        (max - min of layer i's biases)."""
        biases_LE = self.biases()
        span_L = biases_LE.max(-1).values - biases_LE.min(-1).values
        out = {"moe/bias_min": biases_LE.min().item(), "moe/bias_max": biases_LE.max().item()}
        out.update({f"moe/bias_range_layer{i}": v for i, v in enumerate(span_L.tolist())})
        return out

    @torch.no_grad()
    def validation_loads(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Tokens per expert over held-out data, for MaxVio_global (arXiv 2408.15664 §4.1).

        Runs the model in eval mode on each ``[B, S]`` batch of input ids (no bias update, the
        training counters untouched) and restores its mode.

        Returns:
            ``[L, E]`` float32 loads; ``max_violation`` of it is MaxVio_global per layer.
        """
        loads = [torch.zeros(r.num_experts) for r in self.routers]

        def hook(i):
            def count(module, args, output):
                index_TK = output[2]
                loads[i] += count_tokens_per_expert(index_TK.reshape(-1, index_TK.shape[-1]), len(loads[i])).cpu()

            return count

        handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(self.routers)]
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            for input_ids in batches:
                self.model(input_ids=input_ids.to(device))
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        return torch.stack(loads)

    def callback(self) -> LossFreeBalancingCallback:
        """A new :class:`LossFreeBalancingCallback` driving this handle."""
        return LossFreeBalancingCallback(self)

    def attach(self, trainer) -> LossFreeBalancingCallback:
        """Add the callback to ``trainer`` *ahead of* its reporting callbacks (TensorBoard, W&B...),
        so the balance metrics it adds to each log reach them. Returns the callback."""
        cb = self.callback()
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def load_biases(self, path: str | Path) -> int:
        """Read the biases of a ``save_pretrained`` folder (``*.safetensors``) into the routers.

        Returns:
            The number of routers whose bias was found (0 when the folder holds none).

        Raises:
            FileNotFoundError: no safetensors file in ``path``.
            ValueError: the folder holds biases for some routers but not all, or of another size.
        """
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {str(path)!r}")
        # save_pretrained may rename modules on the way out (Mixtral's ``mlp`` is written as
        # ``block_sparse_moe``), so a saved bias is matched to its router by the layer numbers in
        # its name, which every renaming keeps.
        wanted = {_layer_key(name): r for name, r in zip(self.router_names, self.routers)}
        if len(wanted) != len(self.routers):
            raise ValueError("router names do not identify their layers; cannot match saved biases")
        suffixes = {"." + r._moebalance_bias_name for r in self.routers}
        found: dict[tuple[int, ...], torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if any(key.endswith(sfx) for sfx in suffixes) and _layer_key(key) in wanted:
                        found[_layer_key(key)] = st.get_tensor(key)
        if not found:
            return 0
        if len(found) != len(wanted):
            raise ValueError(f"{path}: holds the biases of {len(found)} routers, the model has {len(wanted)}")
        with torch.no_grad():
            for key, router in wanted.items():
                bias = getattr(router, router._moebalance_bias_name)
                if found[key].shape != bias.shape:
                    raise ValueError(
                        f"{path}: bias of layer {key} has shape {tuple(found[key].shape)}, expected {tuple(bias.shape)}"
                    )
                bias.copy_(found[key])
        return len(found)


def _layer_key(name: str) -> tuple[int, ...]:
    """The numeric parts of a module path (``model.layers.3.mlp.gate`` -> ``(3,)``)."""
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class LossFreeBalancingCallback(TrainerCallback):
    """``transformers.TrainerCallback`` that runs :meth:`LossFreeBalancing.step` once per optimizer
    step (``on_step_end`` fires after gradient accumulation) and adds the balance metrics to the
    Trainer's logs.

    Logged (averaged over the steps since the previous log where it says so):
    ``moe/maxvio_batch`` and ``moe/maxvio_batch_layer{i}`` (mean over those steps), ``moe/bias_min``,
    ``moe/bias_max``, ``moe/bias_range_layer{i}`` (now). Evaluation does not update the biases:
    routers count no load in eval mode, and only ``on_step_end`` updates.

    For the metrics to reach the Trainer's TensorBoard / W&B callbacks, this callback must run before
    them: add it with :meth:`LossFreeBalancing.attach`. Passed as ``Trainer(callbacks=[...])`` it
    still balances, and the metrics still reach the console and ``trainer.state.log_history``.
    """

    def __init__(self, balancing: LossFreeBalancing) -> None:
        self.balancing = balancing
        self._vio_sum: torch.Tensor | None = None
        self._vio_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # Loads counted by forwards before training (a sanity forward in train mode) are not a step's.
        self.balancing.reset_loads()

    def on_step_end(self, args, state, control, **kwargs):
        loads_LE = self.balancing.step()
        if loads_LE.sum() > 0:
            vio_L = max_violation(loads_LE)
            self._vio_sum = vio_L if self._vio_sum is None else self._vio_sum + vio_L
            self._vio_steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or any(k.startswith("eval_") or k == "train_runtime" for k in logs):
            return  # only the periodic training logs
        extra = self.balancing.bias_metrics()
        if self._vio_steps:
            extra.update(self.balancing.maxvio_metrics(self._vio_sum / self._vio_steps))
            self._vio_sum, self._vio_steps = None, 0
        logs.update(extra)
        # Trainer.log stored a copy of the logs before calling the callbacks; complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _check_patch_matches(router: nn.Module, original_forward: Callable) -> None:
    """Run the original and the patched router on a probe input (zero bias) and require identical
    outputs; the probe leaves the global RNG and the load counts untouched."""
    weight = router.weight
    if weight.device.type == "meta":
        return
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, 8, router.hidden_dim, generator=gen).to(weight.device, weight.dtype)
    was_training = router.training
    router.eval()
    try:
        with torch.no_grad():
            ref = original_forward(probe)
            saved = router.expert_bias.clone()
            router.expert_bias.zero_()
            got = router.forward(probe)
            router.expert_bias.copy_(saved)
    finally:
        router.train(was_training)
    for a, b, what in zip(ref, got, ("router_logits", "top_k_weights", "top_k_index")):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            import transformers

            raise RuntimeError(
                f"{type(router).__name__} of transformers {transformers.__version__} computes {what} "
                f"differently from what moebalance expects (checked: {', '.join(TESTED_TRANSFORMERS_VERSIONS)}); "
                "refusing to patch it"
            )


def _disable_aux_loss(model: nn.Module) -> list[str]:
    """Zero the auxiliary load-balancing loss of a transformers MoE model; returns what changed."""
    changed = []
    for name, module in model.named_modules():
        if hasattr(module, "router_aux_loss_coef") and module.router_aux_loss_coef:
            module.router_aux_loss_coef = 0.0
            changed.append(f"{name or type(module).__name__}.router_aux_loss_coef")
    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, "router_aux_loss_coef", 0):
            config.router_aux_loss_coef = 0.0
            changed.append("config.router_aux_loss_coef")
        if getattr(config, "output_router_logits", False):
            config.output_router_logits = False
            changed.append("config.output_router_logits")
    return changed


def apply_loss_free_balancing(
    model: nn.Module,
    update_rate: float = 1e-3,
    disable_aux_loss: bool = True,
    *,
    update: UpdateMode = "sign",
    all_reduce: Callable[[torch.Tensor], None] | Literal["auto"] | None = "auto",
    load_biases_from: str | Path | Literal["auto"] | None = "auto",
) -> LossFreeBalancing:
    """Give every MoE router of a transformers model a Loss-Free Balancing bias.

    Softmax routers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) get a persistent float32 ``expert_bias``
    ``[E]`` buffer (zeros) that steers their top-K choice only; DeepSeek-V3 routers keep their own
    ``e_score_correction_bias``, which this handle now updates. With all biases zero the model's
    outputs are bit-identical to the unpatched model's. Idempotent: a second call returns a new
    handle on the same buffers without patching twice.

    Args:
        model: a transformers model (``...ForCausalLM``, base model, or any module holding the routers).
        update_rate: ``u > 0`` of Algorithm 1 (paper default 1e-3).
        disable_aux_loss: set the model's auxiliary-loss coefficient (and ``config.router_aux_loss_coef``)
            to 0 and ``config.output_router_logits`` to False. transformers' auxiliary loss recounts
            the top-K from the logits *without* the bias, so it would fight the bias.
        update: ``"sign"`` (Algorithm 1) or ``"error"`` (the paper's ablation), see
            :class:`~moebalance.LossFreeBalancer`.
        all_reduce: in-place sum of the ``[L, E]`` loads over data-parallel ranks; ``"auto"`` uses
            ``torch.distributed`` when a process group with more than one rank is running.
        load_biases_from: a ``save_pretrained`` folder to read the biases from; ``"auto"``: the
            folder the model was loaded from (``model.name_or_path``) when it is a local folder.

    Returns:
        The :class:`LossFreeBalancing` handle.

    Raises:
        ValueError: no supported router in ``model`` (the message names the supported classes), or a
            bad ``update_rate`` / ``update``.
        RuntimeError: the installed transformers routes differently from the checked versions.
    """
    balancer = LossFreeBalancer(update_rate, update)
    found = [(name, m) for name, m in model.named_modules() if _family_of(m) is not None]
    if not found:
        legacy = [n for n, m in model.named_modules() if n.endswith(".gate") and isinstance(m, nn.Linear)]
        hint = (
            " The model computes its routing inside the MoE block (transformers 4.x layout, "
            f"e.g. {legacy[0]!r} is an nn.Linear); moebalance supports the 5.x router modules."
            if legacy
            else ""
        )
        raise ValueError(
            f"no supported MoE router in {type(model).__name__}; supported: {_SUPPORTED_TEXT}.{hint}"
        )
    for _, router in found:
        if getattr(router, "_moebalance_bias_name", None) is not None:
            continue  # already patched
        spec = _family_of(router)
        router._moebalance_family = spec
        weight = router.weight
        router.register_buffer(
            "moebalance_load_counts", torch.zeros(router.num_experts, device=weight.device), persistent=False
        )
        if spec.native_bias is not None:
            bias = getattr(router, spec.native_bias)
            router._buffers[spec.native_bias] = bias.detach().to(torch.float32)
            router._moebalance_bias_name = spec.native_bias
            router.register_forward_hook(_count_hook)
        else:
            router.register_buffer(
                "expert_bias", torch.zeros(router.num_experts, dtype=torch.float32, device=weight.device), persistent=True
            )
            router._moebalance_bias_name = "expert_bias"
            original = router.forward
            router.forward = types.MethodType(_softmax_router_forward, router)
            _check_patch_matches(router, original)
        router._apply = types.MethodType(_keep_fp32_apply, router)
    if disable_aux_loss:
        changed = _disable_aux_loss(model)
        if changed:
            log.info("auxiliary load-balancing loss disabled: %s set to 0/False", ", ".join(changed))
    handle = LossFreeBalancing(model, found, balancer, _default_all_reduce if all_reduce == "auto" else all_reduce)
    if load_biases_from == "auto":
        src = getattr(model, "name_or_path", "") or ""
        load_biases_from = src if src and Path(src).is_dir() else None
    if load_biases_from is not None and not _native_only(handle):
        n = handle.load_biases(load_biases_from)
        if n:
            log.info("loaded the expert biases of %d routers from %s", n, load_biases_from)
    return handle


def _native_only(handle: LossFreeBalancing) -> bool:
    # DeepSeek-V3's bias is a native weight: from_pretrained already loaded it.
    return all(r._moebalance_family.native_bias is not None for r in handle.routers)


# ---------------------------------------------------------------------------------------------
# Tiny configs (tests, examples, smoke runs; nothing downloaded)
# ---------------------------------------------------------------------------------------------

TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def tiny_moe_config(
    family: str,
    vocab_size: int = 256,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    expert_hidden: int = 32,
    max_seq_len: int = 128,
    **overrides: Any,
):
    """A small random-init transformers config of one supported family, built offline.

    Args:
        family: one of ``TINY_FAMILIES``.
        vocab_size, hidden_size, num_layers, num_experts, top_k, expert_hidden, max_seq_len: sizes.
        overrides: further config fields.

    Raises:
        ValueError: unknown ``family``.
    """
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * expert_hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_seq_len,
        num_experts_per_tok=top_k,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=num_experts)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **common, num_experts=num_experts, moe_intermediate_size=expert_hidden,
            shared_expert_intermediate_size=expert_hidden,
        )
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common, num_experts=num_experts, moe_intermediate_size=expert_hidden, head_dim=hidden_size // 4
        )
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, num_experts=num_experts)
    elif family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            n_routed_experts=num_experts, moe_intermediate_size=expert_hidden, n_shared_experts=1,
            n_group=2 if num_experts % 2 == 0 else 1, topk_group=1 if num_experts % 2 == 0 else 1,
            first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )
    else:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
