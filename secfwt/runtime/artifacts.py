"""What a party keeps at the end of a job: tuned parameters revealed per terms, local values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from secfwt.models.adapters import save_full_rank_adapter, save_peft_adapter
from secfwt.models.spec import ModelSpec
from secfwt.models.transformer import LORA_A, LORA_B, WEIGHT_DELTA
from secfwt.mpc.disclosure import Revealable
from secfwt.runtime.session import PartySession

#: Folder (under the party's output folder) of the tuned LoRA as a PEFT adapter.
ADAPTER_DIR = "adapter"


@dataclasses.dataclass(frozen=True)
class AdapterExport:
    """How a causal-LM job's LoRA factors leave as a PEFT adapter folder."""

    base_model: str  # recorded as base_model_name_or_path (the checkpoint folder)
    scale: float  # the forward's LoRA scale (PEFT's lora_alpha / r)
    spec: ModelSpec  # the base model's parameter shapes, checked against every factor


def deliver(
    sess: PartySession,
    theta: dict[str, Any],
    local: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    adapter: AdapterExport | None = None,
) -> dict[str, str]:
    """Reveal the tuned parameters to the owners the terms name and save them there.

    ``local`` holds values this party already owns in the clear (the data owner's prompt in
    SecFwT mode); they are saved without any reveal. With ``adapter``, the LoRA factors among
    the revealed values are also written as a PEFT adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, folder)`` loads,
    with the tuned tensors of the base model (norm weights, biases) as PEFT's
    ``modules_to_save``; a soft prompt stays in ``final_parameters.pt`` only. Safe Delta's
    corrected deltas (``"<module>.weight_delta"``, full rank) are written instead as the
    full-rank PEFT form of :func:`~secfwt.models.adapters.save_full_rank_adapter`.
    """
    to = sess.discloser.terms.recipients(Revealable.FINAL_PARAMETERS)
    saved: dict[str, str] = {}
    if local:
        path = out_dir / "prompt.pt"
        torch.save(local, path)
        saved["prompt"] = str(path)
    if not to:
        return saved
    values = {}
    for name, x in theta.items():
        v = sess.discloser.reveal(x, value=Revealable.FINAL_PARAMETERS, to=to, note=name)
        if v is not None:
            values[name] = v
    if values:
        path = out_dir / "final_parameters.pt"
        torch.save(values, path)
        saved["final_parameters"] = str(path)
    lora = {n: v for n, v in values.items() if n.rsplit(".", 1)[-1] in (LORA_A, LORA_B)}
    deltas = {
        n.rsplit(".", 1)[0]: v for n, v in values.items() if n.rsplit(".", 1)[-1] == WEIGHT_DELTA
    }
    if adapter is not None and deltas:  # Safe Delta's corrected deltas: full rank
        shapes = dict(adapter.spec.param_shapes)
        folder = save_full_rank_adapter(
            out_dir / ADAPTER_DIR,
            deltas,
            base_model=adapter.base_model,
            whole={n: v for n, v in values.items() if n in shapes},  # tuned norms, biases
        )
        saved["adapter"] = str(folder)
    elif adapter is not None and lora:
        shapes = dict(adapter.spec.param_shapes)
        folder = save_peft_adapter(
            out_dir / ADAPTER_DIR,
            lora,
            base_model=adapter.base_model,
            scale=adapter.scale,
            base_shapes=shapes,
            whole={n: v for n, v in values.items() if n in shapes},  # tuned norms, biases
        )
        saved["adapter"] = str(folder)
    return saved
