"""secfwt's LoRA parameters as a PEFT adapter folder, and back.

A tuned LoRA leaves a job as ``"<module>.lora_A"`` (r, in) and ``"<module>.lora_B"`` (out, r)
tensors named by the base model's Hugging Face modules, applied as
``y = x W^T + scale * (x A^T) B^T`` (:meth:`secfwt.models.encoder.EncoderModel.linear`). PEFT's
LoRA computes ``x W^T + (lora_alpha / r) * lora_B(lora_A(x))`` with the same factor shapes
(Hu et al., ICLR 2022, eq. 3 with PEFT's ``scaling = lora_alpha / r``), so an adapter folder is
the factors under PEFT's key names plus a :class:`peft.LoraConfig` with
``lora_alpha = scale * r``; ``PeftModel.from_pretrained(base, folder)`` then computes exactly
secfwt's function.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from secfwt.errors import ModelError
from secfwt.models.encoder import LORA_A, LORA_B

#: Prefix of every LoRA key in a saved PEFT adapter: ``PeftModel.save_pretrained`` writes the
#: state-dict keys of ``PeftModel.base_model.model`` (the Hugging Face model) with the adapter
#: name removed, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
#: Written here directly: PEFT's own ``get_peft_model_state_dict`` needs the base model
#: instantiated in memory (seconds and hundreds of MB for a real one) only to produce these keys.
PEFT_KEY_PREFIX = "base_model.model."
_FACTORS = (LORA_A, LORA_B)


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """LoRA factors by secfwt name, their scale, and the base model they adapt."""

    params: dict[str, torch.Tensor]  # "<module>.lora_A" (r, in), "<module>.lora_B" (out, r)
    scale: float
    rank: int
    base_model: str


def save_peft_adapter(
    folder: str | os.PathLike[str],
    params: Mapping[str, torch.Tensor],
    *,
    base_model: str,
    scale: float,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
    task_type: str | None = "CAUSAL_LM",
    whole: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for PEFT into ``folder``.

    ``params`` holds only LoRA factors, every module with both; one rank for all (PEFT's ``r``).
    ``whole`` holds tuned tensors of the base model itself by their Hugging Face names (norm
    weights, biases): their modules go in as PEFT's ``modules_to_save``, stored under the keys
    ``PeftModel.save_pretrained`` writes for them (``base_model.model.<name>``), so the loaded
    model computes with them; a module's other tensors keep the base model's values.
    ``base_model`` is the base checkpoint's path or hub name (recorded as
    ``base_model_name_or_path``); ``base_shapes`` (parameter name -> shape of the base model,
    e.g. ``dict(spec.param_shapes)``), when given, is checked against every factor first.
    ``lora_alpha`` is ``scale * r``; PEFT's float64 ``lora_alpha / r`` then equals ``scale`` or,
    where no float quotient does (0.1 with r = 3; 5 % of random pairs), is one ulp off it.
    """
    import peft
    from safetensors.torch import save_file

    rank = _check_factors(params, base_shapes, field="params")
    whole = dict(whole or {})
    for name, value in whole.items():
        shape = None if base_shapes is None else base_shapes.get(name)
        if base_shapes is not None and tuple(value.shape) != tuple(shape or ()):
            raise ModelError(
                f"whole: {name} is {tuple(value.shape)}, the base model's is {shape}; it must be "
                "a tensor of the base model"
            )
        if name.rsplit(".", 1)[0] in _modules(params):
            raise ModelError(f"whole: {name} belongs to a module that has LoRA factors")
    if not (math.isfinite(scale) and scale > 0):
        raise ModelError(f"scale = {scale}: the LoRA scale must be a positive finite number")
    config = peft.LoraConfig(
        r=rank,
        # annotated int in PEFT, but its scaling lora_alpha / r takes any number (JSON float)
        lora_alpha=scale * rank,  # type: ignore[arg-type]
        target_modules=list(_modules(params)),
        modules_to_save=sorted({n.rsplit(".", 1)[0] for n in whole}) or None,
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {
        f"{PEFT_KEY_PREFIX}{name}.weight": value.detach().to(torch.float32).contiguous()
        for name, value in sorted(params.items())
    }
    tensors |= {
        f"{PEFT_KEY_PREFIX}{name}": value.detach().to(torch.float32).contiguous()
        for name, value in sorted(whole.items())
    }
    save_file(tensors, str(out / peft.utils.constants.SAFETENSORS_WEIGHTS_NAME))
    return out


def save_full_rank_adapter(
    folder: str | os.PathLike[str],
    deltas: Mapping[str, torch.Tensor],
    *,
    base_model: str,
    whole: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Full weight deltas ``D`` (out, in) by module name as a PEFT LoRA adapter folder.

    A corrected Safe Delta delta is no longer low rank, and PEFT cannot load
    ``modules_to_save`` alone (a LoRA config must target some module:
    ``NoMatchingPeftModuleError`` on peft 0.21), so each module is a LoRA of full rank
    ``r = min(out, in)`` (``rank_pattern``, ``alpha_pattern = r`` so PEFT's scaling is 1):
    ``B = D, A = I`` when ``in <= out``, else ``B = I, A = D``; ``B @ A`` is ``D`` exactly. The
    file is about 1.5 times the deltas' size (the identity factors). ``whole``: tuned tensors
    of the base model (norm weights) as PEFT's ``modules_to_save``, as in
    :func:`save_peft_adapter`."""
    import peft
    from safetensors.torch import save_file

    if not deltas:
        raise ModelError("deltas: no module to write")
    tensors, ranks = {}, {}
    for name, delta in sorted(deltas.items()):
        rows, cols = delta.shape
        rank = min(rows, cols)
        delta = delta.detach().to(torch.float32)
        eye = torch.eye(rank, dtype=delta.dtype)
        a, b = (eye, delta) if cols <= rows else (delta, eye)  # A (r, in), B (out, r)
        tensors[f"{PEFT_KEY_PREFIX}{name}.{LORA_A}.weight"] = a.contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{name}.{LORA_B}.weight"] = b.contiguous()
        ranks[re.escape(name)] = rank  # PEFT matches (.*\.)?(KEY)$
    whole = dict(whole or {})
    tensors |= {
        f"{PEFT_KEY_PREFIX}{name}": value.detach().to(torch.float32).contiguous()
        for name, value in sorted(whole.items())
    }
    config = peft.LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        target_modules=sorted(deltas),
        modules_to_save=sorted({n.rsplit(".", 1)[0] for n in whole}) or None,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / peft.utils.constants.SAFETENSORS_WEIGHTS_NAME))
    return out


def load_peft_adapter(
    folder: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder back into secfwt names, checking it fits the base model.

    ``base_model``, when given, must equal the adapter's ``base_model_name_or_path`` (paths are
    compared after resolving them); ``base_shapes`` as in :func:`save_peft_adapter`. Raises
    :class:`ModelError` naming the file and field that do not match.
    """
    import peft

    path = Path(folder)
    config_file = path / peft.utils.constants.CONFIG_NAME
    weights_file = path / peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ModelError(f"{f}: missing; a PEFT adapter folder holds {f.name}")
    config = peft.PeftConfig.from_pretrained(str(path))
    where = config_file.name
    if config.peft_type != peft.PeftType.LORA:
        raise ModelError(f"{where}: peft_type is {config.peft_type}; only LORA adapters load")
    for field, value in (
        ("use_dora", config.use_dora),
        ("lora_bias", config.lora_bias),
        ("fan_in_fan_out", config.fan_in_fan_out),
        ("rank_pattern", bool(config.rank_pattern)),
        ("alpha_pattern", bool(config.alpha_pattern)),
        ("modules_to_save", bool(config.modules_to_save)),
        ("target_parameters", bool(config.target_parameters)),
    ):
        if value:
            raise ModelError(f"{where}: {field} is set; secfwt's LoRA is the plain kind only")
    recorded = config.base_model_name_or_path or ""
    if base_model is not None and not _same_model(recorded, base_model):
        raise ModelError(
            f"{where}: base_model_name_or_path is {recorded!r}, but this adapter is being loaded "
            f"for {base_model!r}; load it with its own base model"
        )
    params = _from_peft_keys(
        peft.utils.load_peft_weights(str(path), device="cpu"), where=str(weights_file)
    )
    rank = _check_factors(params, base_shapes, field=weights_file.name)
    if rank != config.r:
        raise ModelError(
            f"{where}: r = {config.r}, but the factors in {weights_file.name} have rank {rank}"
        )
    scale = config.lora_alpha / (math.sqrt(rank) if config.use_rslora else rank)
    return LoraAdapter(params=params, scale=scale, rank=rank, base_model=recorded)


def _from_peft_keys(state: Mapping[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_KEY_PREFIX).removesuffix(".weight")
        if not key.startswith(PEFT_KEY_PREFIX) or name.rsplit(".", 1)[-1] not in _FACTORS:
            raise ModelError(
                f"{where}: {key!r} is not a LoRA factor key ({PEFT_KEY_PREFIX}"
                f"<module>.lora_A.weight / .lora_B.weight)"
            )
        params[name] = value.to(torch.float32)
    return params


def _modules(params: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    return tuple(sorted({name.rsplit(".", 1)[0] for name in params}))


def _check_factors(
    params: Mapping[str, torch.Tensor],
    base_shapes: Mapping[str, tuple[int, ...]] | None,
    *,
    field: str,
) -> int:
    """The common rank of the factor pairs; ModelError naming ``field`` and the tensor if not."""
    if not params:
        raise ModelError(f"{field}: no LoRA factors")
    ranks: dict[int, str] = {}
    for module in _modules(params):
        a_name, b_name = f"{module}.{LORA_A}", f"{module}.{LORA_B}"
        stray = [n for n in params if n.startswith(module + ".") and n not in (a_name, b_name)]
        if stray or a_name not in params or b_name not in params:
            raise ModelError(
                f"{field}: {module!r} needs exactly {LORA_A} and {LORA_B}; has "
                f"{sorted(n for n in params if n.startswith(module + '.'))}"
            )
        a, b = tuple(params[a_name].shape), tuple(params[b_name].shape)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ModelError(
                f"{field}: {a_name} is {a} and {b_name} is {b}; need (r, in) and (out, r)"
            )
        ranks.setdefault(a[0], module)
        if base_shapes is not None:
            weight = base_shapes.get(f"{module}.weight")
            if weight is None:
                raise ModelError(
                    f"{field}: {module!r} is not a module of the base model (no {module}.weight)"
                )
            if tuple(weight) != (b[0], a[1]):
                raise ModelError(
                    f"{field}: {module}.weight of the base model is {tuple(weight)}, but "
                    f"{a_name} is {a} and {b_name} is {b}: they need (r, {weight[-1]}) and "
                    f"({weight[0]}, r); the adapter is for another model"
                )
    if len(ranks) > 1:
        raise ModelError(f"{field}: ranks differ across modules ({ranks}); PEFT's r is one rank")
    return next(iter(ranks))


def _same_model(recorded: str, wanted: str) -> bool:
    if recorded == wanted:
        return True
    a, b = Path(recorded), Path(wanted)
    return a.exists() and b.exists() and a.resolve() == b.resolve()
