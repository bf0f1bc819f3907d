"""The chat model under evaluation: a causal LM checkpoint, its tokenizer, optionally an adapter,
on the GPU when torch sees one and on the CPU otherwise.

Weights stay in float32 on either device: the model is small, and the same dtype everywhere keeps
greedy replies comparable between a GPU run and a CPU run of the same checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ModelError
from secfwt.safety.adapter import apply_adapter

log = logging.getLogger(__name__)


@dataclass
class ChatModel:
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerBase with a chat template
    name: str  # as given (e.g. packaged:smollm2-135m-instruct)
    folder: Path
    device: torch.device
    adapter: dict[str, Any] | None


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_chat_model(
    name: str, *, adapter: str | Path | None = None, device: torch.device | None = None
) -> ChatModel:
    """Load ``name`` (a folder or ``packaged:NAME``) with ``from_pretrained``; merge ``adapter``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from secfwt.models.checkpoint import load_config, resolve_model_path

    hf_logging.disable_progress_bar()
    folder = resolve_model_path(name)
    config = load_config(folder)
    model: Any
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True
        )
    except ValueError as exc:  # no causal-LM class for this model_type
        raise ModelError(
            f"MODEL: {folder} is a {getattr(config, 'model_type', '?')!r} checkpoint, not a "
            f"causal (decoder) language model: {exc}"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"MODEL: cannot load the tokenizer of {folder}: {exc}") from exc
    adapter_info = None
    if adapter is not None:
        names = {name, str(folder), str(getattr(model.config, "_name_or_path", "") or "")}
        model, adapter_info = apply_adapter(model, adapter, model_names=names)
    device = pick_device() if device is None else device
    model = model.to(device)
    model.eval()
    log.info("loaded %s from %s on %s", name, folder, device)
    return ChatModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        folder=folder,
        device=device,
        adapter=adapter_info,
    )
