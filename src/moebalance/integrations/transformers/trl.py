"""TRL trainers (``trl`` >= 1.0) beside Loss-Free Balancing: their router auxiliary loss and
routing replay, said once per handle and trainer.

TRL 1.16's ``SFTTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer`` and ``KTOTrainer``
take ``router_aux_loss_coef`` from their config; left at ``None`` they use the model config's own
coefficient (Mixtral, Qwen2/3-MoE, OLMoE declare 1e-3 or 1e-2), and the loss is on whenever the
model config has ``output_router_logits`` and the coefficient is non-zero. They then add
``coef * outputs.aux_loss`` to the training loss, where ``aux_loss`` is transformers'
``load_balancing_loss_func``: it recounts every token's top-K from the router logits *without*
the bias. ``apply_loss_free_balancing(disable_aux_loss=True)`` zeroes the model config's
coefficient, which turns TRL's loss off when the trainer is built afterwards and its own
``router_aux_loss_coef`` is unset; an explicit coefficient, or a trainer built before the apply,
keeps it on. TRL 1.16 has no routing replay option (checked: no ``*routing_replay*`` /
``*router_replay*`` field in its configs); should a trainer's arguments carry one that is on, the
choices come from the rollouts and the bias cannot steer them, which is said too.

Nothing here imports ``trl``: the trainer and its arguments are read by attribute.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("moebalance.integrations.transformers")

_REPLAY = re.compile(r"rout\w*replay|replay\w*rout|expert\w*replay")


def aux_loss_coef(trainer=None, args=None, model=None) -> float:
    """The router auxiliary-loss coefficient a TRL trainer adds to its loss (0.0: off or not TRL).

    From the trainer's own ``aux_loss_enabled`` / ``router_aux_loss_coef`` when given (what the
    loss uses); else from ``args.router_aux_loss_coef`` and ``model.config`` by TRL 1.16's rule
    (``None`` -> the model config's coefficient; on only if the config has ``output_router_logits``).
    """
    if trainer is not None and hasattr(trainer, "aux_loss_enabled"):
        return float(trainer.router_aux_loss_coef or 0.0) if trainer.aux_loss_enabled else 0.0
    if args is None or not hasattr(args, "router_aux_loss_coef") or getattr(model, "config", None) is None:
        return 0.0
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    coef = args.router_aux_loss_coef
    coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return float(coef or 0.0) if hasattr(text_config, "output_router_logits") else 0.0


def replay_options(args) -> list[str]:
    """``name=value`` of every routing-replay field of a trainer's arguments that is on."""
    fields = vars(args) if hasattr(args, "__dict__") else {}
    return [f"{k}={v!r}" for k, v in fields.items() if _REPLAY.search(k) and v not in (None, False, "", "none", 0)]


def say_once(handle, trainer=None, args=None, model=None) -> list[str]:
    """Warn, once per handle and trainer arguments, that TRL's router auxiliary loss is on beside
    the bias and how the two combine, and that a routing replay option is on. Returns the messages
    logged (empty once said, or when there is nothing to say)."""
    args = getattr(trainer, "args", None) if args is None else args
    said_for = handle.__dict__.setdefault("_trl_said_for", set())
    if id(args) in said_for:
        return []
    model = getattr(trainer, "model", None) if model is None else model
    name = type(trainer).__name__ if trainer is not None else type(args).__name__
    said = []
    if coef := aux_loss_coef(trainer, args, model):
        said.append(
            f"{name}: TRL's router auxiliary loss is on (router_aux_loss_coef={coef:g}) beside Loss-Free "
            f"Balancing. The two add up: the loss gains {coef:g} * aux_loss, whose gradient pushes the router "
            "weights to balance the top-K recounted from the logits WITHOUT the bias (a routing the model does "
            "not use), while the bias keeps balancing the routing it does use, updated as before. That "
            "gradient is the interference Loss-Free Balancing exists to remove; set router_aux_loss_coef=0.0 "
            "in the TRL config to balance with the bias alone"
        )
        log.warning(said[-1])
    if args is not None and (replay := replay_options(args)):
        said.append(
            f"{name}: routing replay is on ({', '.join(replay)}): the forwards reuse the expert choices recorded "
            "in the rollouts, so the Loss-Free bias cannot steer them; the bias only acts where the router "
            "chooses (turn replay off, or freeze the bias with balancing.update_biases = False)"
        )
        log.warning(said[-1])
    if args is not None:
        said_for.add(id(args))
    return said


def check_trainer(handle, trainer) -> list[str]:
    """:func:`say_once` for a trainer given to ``LossFreeBalancing.attach``."""
    return say_once(handle, trainer=trainer)
