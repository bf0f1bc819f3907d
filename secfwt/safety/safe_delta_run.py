"""``secfwt safety safe-delta``: Safe Delta on a whole chat model, run by whoever holds the aligned
base weights and the tuned LoRA delta.

Inputs are checked before any model is loaded where they can be (budget, calibration count and
its disjointness from the evaluation suites), and the adapter against the base model before any
Hessian is computed (:func:`secfwt.safety.adapter.check_base`,
:func:`secfwt.models.adapters.load_peft_adapter`). Then, as in the official ``run_safedelta.py``,
decoder layer by decoder layer: the calibration samples' hidden states pass through the *aligned*
layer with hooks on the Linears the adapter tunes, which sum each one's input Hessian
(:func:`secfwt.tuning.safe_delta.input_hessian`); the layer's outputs, computed with the
aligned weights, are the next layer's inputs; then each tuned Linear is replaced by
:func:`secfwt.tuning.safe_delta.safe_delta_layer` of (aligned, aligned + delta). Only one
layer's Hessians are held at a time. Only decoder Linear weights change; an adapter that tunes
anything else is refused.

Output ``merged``: the corrected model, ``save_pretrained`` with its tokenizer. Output
``adapter``: the corrected delta ``D = W_out - W0`` is no longer low rank; it is written as a
PEFT LoRA of full rank per module (:func:`secfwt.models.adapters.save_full_rank_adapter`).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secfwt.data.calibration import (
    CALIBRATION_TOKENS,
    DEFAULT_SAMPLES,
    calibration_pairs,
    calibration_texts,
)
from secfwt.errors import ConfigError, ModelError
from secfwt.models.adapters import save_full_rank_adapter
from secfwt.runtime.safe_delta import hessian_hooks
from secfwt.tuning.safe_delta import DEFAULT_BUDGET, check_budget, safe_delta_layer

log = logging.getLogger(__name__)


class OutputFormat(enum.Enum):
    MERGED = "merged"
    ADAPTER = "adapter"


@dataclass(frozen=True)
class SafeDeltaRequest:
    """The ``secfwt safety safe-delta`` flags."""

    base: str  # aligned model: folder or packaged:NAME
    adapter: str  # PEFT LoRA adapter folder tuned on ``base``
    out: str
    calibration: int = DEFAULT_SAMPLES
    budget: float = DEFAULT_BUDGET
    format: OutputFormat = OutputFormat.MERGED


class _Stop(Exception):
    """Raised by the hook that captures the first decoder layer's inputs."""


def run_safe_delta(req: SafeDeltaRequest) -> dict[str, Any]:
    """Correct ``req.adapter``'s delta on ``req.base`` and write ``req.out``; a summary."""
    from secfwt.safety.chat_model import load_chat_model

    check_budget(req.budget)
    pairs = calibration_pairs(req.calibration)
    out = Path(req.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    started = time.perf_counter()
    chat = load_chat_model(req.base, device=torch.device("cpu"))
    model, tokenizer = chat.model, chat.tokenizer
    deltas = _adapter_deltas(model, req, names={req.base, str(chat.folder)})
    texts = calibration_texts(tokenizer, pairs)
    layers = _decoder_layers(model)
    hidden, kwargs = _first_layer_inputs(model, tokenizer, texts)
    stats: dict[str, dict[str, float]] = {}
    corrected: dict[str, torch.Tensor] = {}  # W_out - W0 (out, in), for the adapter format
    with torch.no_grad():
        for prefix, layer in layers:
            mine = {n: m for n, m in model.named_modules() if n in deltas and n.startswith(prefix)}
            hessians, handles = hessian_hooks(mine, samples=len(texts))
            try:
                outputs = [layer(h, **kw) for h, kw in zip(hidden, kwargs, strict=True)]
            finally:
                for handle in handles:
                    handle.remove()
            hidden = [o[0] if isinstance(o, tuple) else o for o in outputs]
            for name, module in mine.items():
                w0 = module.weight
                res = safe_delta_layer(w0, w0 + deltas[name], hessians[name], s=req.budget)
                if req.format is OutputFormat.ADAPTER:
                    corrected[name] = (res.weight.double() - w0.double()).to(torch.float32)
                module.weight.copy_(res.weight)
                stats[name] = {
                    "kept": res.kept / res.entries,
                    "cost": res.cost,
                    "budget": res.budget,
                }
                log.info("%s: kept %.1f%% of the delta", name, 100 * res.kept / res.entries)
    if req.format is OutputFormat.MERGED:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    else:
        save_full_rank_adapter(out, corrected, base_model=req.base)
    kept = sum(s["kept"] for s in stats.values()) / max(len(stats), 1)
    return {
        "out": str(out),
        "format": req.format.value,
        "modules": len(stats),
        "mean_kept_fraction": kept,
        "calibration_samples": len(texts),
        "seconds": time.perf_counter() - started,
        "per_module": stats,
    }


def _adapter_deltas(model, req: SafeDeltaRequest, *, names: set[str]) -> dict[str, torch.Tensor]:
    """``scale * B @ A`` (out, in) per tuned module, after the base and shape checks."""
    import peft

    from secfwt.models.adapters import load_peft_adapter
    from secfwt.safety.adapter import check_base

    folder = Path(req.adapter)
    config_file = folder / peft.utils.constants.CONFIG_NAME
    if not config_file.is_file():
        raise ModelError(f"--adapter: {folder} has no {config_file.name}; pass a PEFT LoRA folder")
    names |= {str(getattr(model.config, "_name_or_path", "") or "")}
    check_base(
        peft.PeftConfig.from_pretrained(str(folder)).base_model_name_or_path, names, config_file
    )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        lora = load_peft_adapter(folder, base_shapes=shapes)
    except ModelError as exc:
        raise ModelError(f"--adapter: {exc}") from exc
    linears = {
        n
        for prefix, layer in _decoder_layers(model)
        for n, m in model.named_modules()
        if n.startswith(prefix) and isinstance(m, torch.nn.Linear)
    }
    modules = sorted({k.rsplit(".", 1)[0] for k in lora.params})
    outside = [m for m in modules if m not in linears]
    if outside:
        raise ModelError(
            f"--adapter: {outside[0]!r} is not a Linear of a decoder layer; Safe Delta corrects "
            "only decoder Linear weights, so tune only those"
        )
    return {
        m: lora.scale
        * (lora.params[f"{m}.lora_B"].double() @ lora.params[f"{m}.lora_A"].double()).to(
            torch.float32
        )
        for m in modules
    }


def _decoder_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """``(name + ".", layer)`` of each decoder layer (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no model.layers; Safe Delta needs a decoder")
    where = next(n for n, m in model.named_modules() if m is layers)
    return [(f"{where}.{i}.", layer) for i, layer in enumerate(layers)]


def _first_layer_inputs(model, tokenizer, texts: list[str]) -> tuple[list, list[dict]]:
    """Hidden states (1, T, hidden) and keyword arguments (rotary embeddings, mask) with which the
    model calls its first decoder layer, per sample (batch 1: no padding)."""
    first = model.model.layers[0]
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def catch(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(dict(kw))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            try:
                with torch.no_grad():
                    model(input_ids=ids[:, :CALIBRATION_TOKENS], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs
