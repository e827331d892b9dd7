"""``moebalance verify MODEL_DIR``: does plain ``transformers`` route a ``save_pretrained`` folder
as moebalance does, and what would a bfloat16 bias change?

Shape legend: B sequences, S tokens per sequence, T = B * S tokens, K experts per token, E routed
experts, L MoE layers.

The folder is loaded twice, both in float32 and eval mode: here, with
:func:`~moebalance.integrations.transformers.apply_loss_free_balancing` (which reads the saved
biases back), and in a fresh Python process that never imports moebalance
(:mod:`.plain_probe`, plain ``transformers`` as a user or an export script would load it). Both
route one probe batch of random token ids of the model's vocabulary (fixed seed); the report gives,
per MoE layer and overall, the share of tokens whose set of K experts differs
(:func:`moebalance.metrics.layer_routing_changes`). Later layers see the hidden states the earlier
layers' routing produced, so a difference compounds with depth, as it would in use.

Both processes hold the whole model in float32 on the CPU: a check for checkpoints that fit twice
in memory (a small model of the same family saved the same way stands in for a large one).

It also reports what a bfloat16 copy of the bias would do: how many distinct float32 values merge
and how many experts' biases collide with another's, and the routing change when the bias is
rounded to bfloat16, as saved and after mean-centring (which leaves the routing itself unchanged,
see :func:`~moebalance.integrations.transformers.checkpoint.center_biases`).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from moebalance.integrations.transformers import plain_probe
from moebalance.integrations.transformers.checkpoint import CONFIG_KEY, bias_state_keys, centred
from moebalance.metrics import layer_routing_changes

#: Default probe batch: sequences, tokens per sequence (capped by the model's positions), seed.
PROBE_BATCH, PROBE_SEQ_LEN, PROBE_SEED = 4, 64, 0


class VerifyArgumentError(ValueError):
    """An argument of :func:`verify_model_folder` cannot serve (the command line's status 2)."""


class ModelFolderError(VerifyArgumentError):
    """``MODEL_DIR`` cannot serve: not a ``save_pretrained`` folder of a model whose routers
    moebalance supports."""


def check_model_folder(path: str | Path) -> Path:
    """``path`` as a folder that holds a transformers ``config.json`` (with a ``model_type``) and
    ``*.safetensors`` weights; nothing is loaded.

    Raises:
        ModelFolderError: missing, a file, no such config or no weights (the message says which).
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"MODEL_DIR {str(path)!r}: no such folder")
    if not folder.is_dir():
        raise ModelFolderError(f"MODEL_DIR {str(path)!r} is a file, not a save_pretrained folder")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelFolderError(f"MODEL_DIR {str(path)!r} holds no config.json: not a save_pretrained model folder")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{config}: not a readable JSON config ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelFolderError(f"{config} has no model_type: not a transformers model config")
    if not any(folder.glob("*.safetensors")):
        raise ModelFolderError(f"MODEL_DIR {str(path)!r} holds no *.safetensors weights")
    return folder


def probe_ids(config, batch_size: int, seq_len: int | None, seed: int) -> torch.Tensor:
    """``[B, S]`` int64 token ids drawn uniformly from the model's vocabulary (``torch.Generator``
    seeded with ``seed``); ``seq_len=None``: :data:`PROBE_SEQ_LEN` or the model's position limit.

    Raises:
        VerifyArgumentError: ``batch_size`` or ``seq_len`` below 1, or ``seq_len`` beyond the
            model's ``max_position_embeddings``.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or PROBE_SEQ_LEN
    seq_len = min(PROBE_SEQ_LEN, limit) if seq_len is None else seq_len
    if batch_size < 1:
        raise VerifyArgumentError(f"--batch-size must be >= 1, got {batch_size}")
    if not 1 <= seq_len <= limit:
        raise VerifyArgumentError(f"--seq-len must be in [1, {limit}] (the model's max_position_embeddings), got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, text.vocab_size, (batch_size, seq_len), generator=gen)


def bias_cast_collisions(bias_E: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> dict:
    """What casting one layer's ``[E]`` bias to ``dtype`` merges.

    Returns:
        ``distinct_float32`` and ``distinct_cast``: distinct values before and after the cast;
        ``colliding_experts``: experts whose cast value equals another expert's although their
        float32 values differ; ``max_abs_error``: largest rounding error (bias units).
    """
    values = bias_E.detach().float().cpu()
    cast = values.to(dtype).float()
    collide_EE = (cast[:, None] == cast[None, :]) & (values[:, None] != values[None, :])
    return {
        "distinct_float32": values.unique().numel(),
        "distinct_cast": cast.unique().numel(),
        "colliding_experts": int(collide_EE.any(-1).sum()),
        "max_abs_error": (cast - values).abs().max().item() if values.numel() else 0.0,
    }


def _load_with_moebalance(folder: Path):
    """The model of ``folder`` under moebalance (float32, eval) and its handle.

    Raises:
        ModelFolderError: transformers cannot load it, or it has no router moebalance supports.
    """
    import transformers

    from moebalance.integrations.transformers.apply import apply_loss_free_balancing

    level, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its load report lists expert_bias as UNEXPECTED: the report says so
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = plain_probe.load_model(folder)
    except Exception as exc:  # whatever from_pretrained raises on this folder (safetensors has its own error class)
        raise ModelFolderError(f"MODEL_DIR {str(folder)!r}: transformers cannot load it: {type(exc).__name__}: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    try:
        handle = apply_loss_free_balancing(model)
    except ValueError as exc:
        raise ModelFolderError(f"MODEL_DIR {str(folder)!r}: {exc}") from exc
    return model, handle, info


def _run_plain(folder: Path, ids_BS: torch.Tensor, routers: list[str], bias_keys: list[str]) -> tuple[dict, dict]:
    """Route ``ids_BS`` in a fresh process with plain transformers (:mod:`.plain_probe`).

    Returns:
        ``(tensors, report)``: ``tensors["routing"]`` ``{router: [T, K]}``, ``tensors["biases"]``
        ``{bias key the plain model has: [E]}``; ``report``: its load report.

    Raises:
        ValueError: the plain process failed (its one-line reason).
    """
    with tempfile.TemporaryDirectory(prefix="moebalance-verify-") as work:
        torch.save({"ids": ids_BS, "routers": routers, "bias_keys": bias_keys}, Path(work) / "probe.pt")
        source = Path(plain_probe.__file__).read_text(encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-c", source, str(folder.resolve()), work, str(torch.get_num_threads())],
            cwd=work, capture_output=True, text=True,
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise ValueError(f"plain transformers could not route {str(folder)!r}: {lines[-1] if lines else f'exit {done.returncode}'}")
        tensors = torch.load(Path(work) / "plain.pt", weights_only=True)
        report = json.loads((Path(work) / "plain.json").read_text(encoding="utf-8"))
    return tensors, report


@contextlib.contextmanager
def _biases_replaced(handle, values: list[torch.Tensor]) -> Iterator[None]:
    """Route with ``values`` as the biases for the duration of the block, then restore them."""
    saved = [b.detach().clone() for b in handle.bias_tensors()]
    try:
        with torch.no_grad():
            for bias, value in zip(handle.bias_tensors(), values):
                bias.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for bias, value in zip(handle.bias_tensors(), saved):
                bias.copy_(value)


def _changes(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """:func:`moebalance.metrics.layer_routing_changes` of two ``{router: [T, K]}`` routings."""
    return layer_routing_changes(list(reference.values()), [other[name] for name in reference])


def _cast_effects(handle, model, ids_BS, ours: dict[str, torch.Tensor]) -> dict:
    """Routing changes with the biases rounded to bfloat16, as they are and mean-centred."""
    biases = [b.detach().float().clone() for b in handle.bias_tensors()]  # not the live buffers, replaced below
    out = {"per_layer": [bias_cast_collisions(b) for b in biases]}
    for label, values in (("as_saved", biases), ("centred", [centred(b) for b in biases])):
        with _biases_replaced(handle, [v.to(torch.bfloat16).float() for v in values]):
            out[label] = _changes(ours, plain_probe.probe_routing(model, handle.router_names, ids_BS))
    out["centred_collisions"] = [bias_cast_collisions(centred(b))["colliding_experts"] for b in biases]
    return out


def saved_bias_dtypes(folder: Path, bias_names: set[str]) -> dict[str, str]:
    """``{saved key: safetensors dtype}`` of the tensors in ``folder/*.safetensors`` whose last
    name component is one of ``bias_names`` (read from the headers, no tensor loaded)."""
    from safetensors import safe_open

    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.rsplit(".", 1)[-1] in bias_names:
                    found[key] = str(st.get_slice(key).get_dtype())
    return found


def _layer_rows(handle, keys: list[str], plain: dict, cast: dict) -> list[dict]:
    """One report row per router (see :func:`verify_model_folder`)."""
    biases = handle.biases()
    saved, centre = cast["as_saved"], cast["centred"]
    rows = []
    for i, name in enumerate(handle.router_names):
        rows.append({
            "router": name, "bias_key": keys[i],
            "tokens_changed": plain["tokens_per_layer"][i], "choices_changed": plain["choices_per_layer"][i],
            "bias_min": biases[i].min().item(), "bias_max": biases[i].max().item(),
            "bf16": cast["per_layer"][i] | {
                "tokens_changed": saved["tokens_per_layer"][i], "choices_changed": saved["choices_per_layer"][i],
                "centred_colliding_experts": cast["centred_collisions"][i],
                "centred_tokens_changed": centre["tokens_per_layer"][i],
                "centred_choices_changed": centre["choices_per_layer"][i],
            },
        })
    return rows


def _overall(rows: list[dict], any_layer: float) -> dict:
    """Means over layers of the per-layer shares, and the bfloat16 collisions summed."""

    def mean(key: str, sub: str | None = None) -> float:
        return sum((r[sub] if sub else r)[key] for r in rows) / len(rows)

    return {
        "tokens_changed": mean("tokens_changed"), "choices_changed": mean("choices_changed"),
        "tokens_changed_any_layer": any_layer,
        "bf16_colliding_experts": sum(r["bf16"]["colliding_experts"] for r in rows),
        "bf16_tokens_changed": mean("tokens_changed", "bf16"), "bf16_choices_changed": mean("choices_changed", "bf16"),
        "bf16_centred_colliding_experts": sum(r["bf16"]["centred_colliding_experts"] for r in rows),
        "bf16_centred_tokens_changed": mean("centred_tokens_changed", "bf16"),
        "bf16_centred_choices_changed": mean("centred_choices_changed", "bf16"),
    }


def verify_model_folder(
    path: str | Path, batch_size: int = PROBE_BATCH, seq_len: int | None = None, seed: int = PROBE_SEED
) -> dict:
    """Compare plain transformers' routing of a ``save_pretrained`` folder with moebalance's.

    Args:
        path: the folder (``config.json`` + ``*.safetensors``).
        batch_size, seq_len, seed: the probe batch (:func:`probe_ids`).

    Returns:
        The report (JSON-serialisable); :func:`render_report` prints it. ``layers[i]`` holds, for
        router i, ``tokens_changed`` / ``choices_changed`` in plain transformers (shares in [0, 1],
        :func:`moebalance.metrics.expert_set_changes`), the bias range, and the bfloat16 figures
        (:func:`bias_cast_collisions`, routing changes as saved and mean-centred); ``overall``
        their means over layers and ``tokens_changed_any_layer``; ``plain`` what plain
        transformers did with the saved biases (``has_bias_slot``, ``dropped_bias_keys``: the
        saved bias keys its load report lists as unexpected).

    Raises:
        ModelFolderError: the folder cannot serve (:func:`check_model_folder`, not loadable, no
            supported router).
        VerifyArgumentError: a bad probe size (:func:`probe_ids`).
        ValueError: the plain process failed (its one-line reason).
    """
    folder = check_model_folder(path)
    model, handle, _ = _load_with_moebalance(folder)
    ids_BS = probe_ids(model.config, batch_size, seq_len, seed)
    keys = bias_state_keys(handle)
    ours = plain_probe.probe_routing(model, handle.router_names, ids_BS)
    tensors, plain_report = _run_plain(folder, ids_BS, handle.router_names, keys)
    plain_changes = _changes(ours, tensors["routing"])
    rows = _layer_rows(handle, keys, plain_changes, _cast_effects(handle, model, ids_BS, ours))
    names = {k.rsplit(".", 1)[-1] for k in keys}
    biases = handle.biases()
    slot_diffs = [(tensors["biases"][k] - b).abs().max().item() for k, b in zip(keys, biases) if k in tensors["biases"]]
    return {
        "model_dir": str(folder), "model_class": type(model).__name__, "model_type": model.config.model_type,
        "probe": {"batch_size": ids_BS.shape[0], "seq_len": ids_BS.shape[1], "seed": seed, "tokens": ids_BS.numel(),
                  "source": "uniform random token ids of the model's vocabulary"},
        "trained_record": getattr(model.config, CONFIG_KEY, None) is not None,
        "biases_nonzero": bool(biases.abs().max() > 0),
        "saved_bias_dtypes": saved_bias_dtypes(folder, names),
        "plain": {
            "model_class": plain_report["model_class"], "moebalance_imported": plain_report["moebalance_imported"],
            "has_bias_slot": len(slot_diffs) == len(keys),
            "dropped_bias_keys": [k for k in plain_report["unexpected_keys"] if k.rsplit(".", 1)[-1] in names],
            "bias_max_abs_difference": max(slot_diffs) if slot_diffs else None,
        },
        "layers": rows,
        "overall": _overall(rows, plain_changes["tokens_any_layer"]),
    }


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"


def render_report(report: dict) -> str:
    """The report of :func:`verify_model_folder` as text: a verdict, the plain-transformers note,
    and one table row per MoE layer."""
    probe, plain, overall = report["probe"], report["plain"], report["overall"]
    lines = [
        f"{report['model_dir']}: {report['model_class']} ({report['model_type']}), {len(report['layers'])} MoE layers; "
        f"probe: {probe['batch_size']} x {probe['seq_len']} random token ids, seed {probe['seed']}",
    ]
    dtypes = sorted(set(report["saved_bias_dtypes"].values()))
    lines.append(
        "biases: " + ("trained (non-zero)" if report["biases_nonzero"] else "all zero (nothing to lose)")
        + f"; saved as {', '.join(dtypes) if dtypes else 'nothing (no bias key in the folder)'}"
    )
    if plain["has_bias_slot"]:
        lines.append(
            f"plain transformers: loads the saved biases into the model's own slot (largest difference "
            f"{plain['bias_max_abs_difference']:.3g}) and routes with them"
        )
    else:
        lines.append(
            f"plain transformers: {report['model_type']} has no bias slot: its load report drops "
            f"{len(plain['dropped_bias_keys'])} saved bias keys as UNEXPECTED and it routes without them. "
            "Load with moebalance (apply_loss_free_balancing reads them back) or serve with an engine that "
            "adds the bias to the router scores before the top-K"
        )
    verdict = "SAME routing" if overall["tokens_changed_any_layer"] == 0 else "ROUTING DIFFERS"
    lines.append(
        f"{verdict} in plain transformers: {_pct(overall['tokens_changed'])} of tokens per layer (mean) choose another "
        f"expert set, {_pct(overall['tokens_changed_any_layer'])} in at least one layer; "
        f"{_pct(overall['choices_changed'])} of top-K choices differ"
    )
    lines.append(
        f"bias in bfloat16: {overall['bf16_colliding_experts']} experts collide, {_pct(overall['bf16_tokens_changed'])} "
        f"of tokens change expert set; mean-centred first: {overall['bf16_centred_colliding_experts']} collide, "
        f"{_pct(overall['bf16_centred_tokens_changed'])} change"
        + ("; keep the bias float32" if overall["bf16_tokens_changed"] > 0 else "")
    )
    lines += ["", "| router | bias range | plain: tokens changed | plain: choices changed | bf16: distinct values "
              "| bf16: colliding experts | bf16: tokens changed | bf16 centred: tokens changed |", "|---" * 8 + "|"]
    for r in report["layers"]:
        b = r["bf16"]
        lines.append(
            f"| {r['router']} | [{r['bias_min']:.4g}, {r['bias_max']:.4g}] | {_pct(r['tokens_changed'])} | "
            f"{_pct(r['choices_changed'])} | {b['distinct_float32']} -> {b['distinct_cast']} | {b['colliding_experts']} | "
            f"{_pct(b['tokens_changed'])} | {_pct(b['centred_tokens_changed'])} |"
        )
    return "\n".join(lines)
