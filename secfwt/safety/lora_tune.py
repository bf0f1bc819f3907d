"""Plaintext LoRA tuning by backpropagation: the non-MPC baseline of the safety experiment, what a
data owner holding the weights would run (PEFT LoRA on every decoder Linear, AdamW,
:func:`secfwt.safety.sft.fine_tune`).

A job's ``[safety]`` section (SWAT, :mod:`secfwt.tuning.swat`) applies here as in the ZO jobs:
the same patterns, matched against the same secfwt tensor names
(``model.layers.3.self_attn.q_proj.lora_A``), give each LoRA factor its factor on the learning
rate at each step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secfwt.config import SafetySection
from secfwt.data.chat_tokenize import InstructionBatch
from secfwt.safety.sft import SftSettings, fine_tune
from secfwt.tuning.swat import update_scales

#: Every Linear of a Llama-family decoder layer.
LINEAR_TYPES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# base_model.model.<module>.lora_A.default.weight -> <module>.lora_A
_PEFT_NAME = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<factor>lora_[AB])\.[^.]+\.weight$"
)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = LINEAR_TYPES


def secfwt_name(peft_name: str) -> str:
    """The secfwt name of a PEFT LoRA parameter (what ``[safety]`` patterns match)."""
    m = _PEFT_NAME.match(peft_name)
    if m is None:
        raise ValueError(f"not a PEFT LoRA parameter name: {peft_name!r}")
    return f"{m['module']}.{m['factor']}"


def tune_lora(
    model: Any,  # a transformers causal LM; wrapped, not copied
    batch: InstructionBatch,  # right-padded
    settings: SftSettings,
    lora: LoraSettings,
    *,
    base: str,  # recorded in the adapter as base_model_name_or_path
    safety: SafetySection | None = None,  # None: no [safety] section
    on_step: Callable[[float], None] | None = None,
) -> tuple[Any, list[float]]:
    """LoRA-tune ``model`` on ``batch``; the PEFT model and each step's loss."""
    import peft

    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
    tuned = peft.get_peft_model(model, config)
    names = {n: secfwt_name(n) for n, p in tuned.named_parameters() if p.requires_grad}
    scales = update_scales(safety or SafetySection(), tuple(names.values()))
    factors: Callable[[int], dict[str, float]] | None = None
    if scales is not None:
        by_secfwt = scales.factors

        def factors(step: int) -> dict[str, float]:
            f = by_secfwt(step)
            return {peft_name: f[name] for peft_name, name in names.items()}

    losses = fine_tune(tuned, batch, settings, on_step=on_step, lr_factors=factors)
    return tuned, losses


def save_adapter(tuned: Any, folder: Path) -> Path:
    """The PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)."""
    tuned.save_pretrained(str(folder))
    return folder
