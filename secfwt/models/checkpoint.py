"""Load a Hugging Face BERT/RoBERTa checkpoint with ``from_pretrained`` (the model owner's side)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ModelError
from secfwt.models.packaged import resolve_packaged
from secfwt.models.spec import Family, Head, ModelSpec

log = logging.getLogger(__name__)

_SUPPORTED_ACTS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu"}


def resolve_model_path(path: str) -> Path:
    """``packaged:NAME`` -> the installed (or converted, cached) folder; anything else is a local
    directory."""
    if path.startswith("packaged:"):
        return resolve_packaged(path.split(":", 1)[1])
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(
            f"model.path: {p} is not a directory; "
            "point it at a Hugging Face checkpoint folder (config.json + weights)"
        )
    return p


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers in party logs or CLI output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _model_class(family: Family, head: Head):
    import transformers as tf

    _quiet_transformers()

    table = {
        (Family.BERT, Head.BASE): tf.BertModel,
        (Family.BERT, Head.MASKED_LM): tf.BertForMaskedLM,
        (Family.BERT, Head.SEQUENCE_CLASSIFICATION): tf.BertForSequenceClassification,
        (Family.ROBERTA, Head.BASE): tf.RobertaModel,
        (Family.ROBERTA, Head.MASKED_LM): tf.RobertaForMaskedLM,
        (Family.ROBERTA, Head.SEQUENCE_CLASSIFICATION): tf.RobertaForSequenceClassification,
    }
    return table[(family, head)]


def load_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"model.path: {model_dir} has no config.json; "
            "it must be a Hugging Face checkpoint folder"
        )
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises several types for a broken config
        raise ModelError(f"model.path: cannot read {model_dir / 'config.json'}: {exc}") from exc


def family_of(config) -> Family:
    mt = getattr(config, "model_type", None)
    for fam in Family:
        if mt == fam.value:
            return fam
    raise ModelError(
        f"model.path: model_type {mt!r} is not supported yet; "
        "secfwt converts BERT and RoBERTa encoders "
        "(model_type 'bert' or 'roberta')"
    )


def max_input_tokens(config) -> int:
    """Longest input the position table allows (RoBERTa reserves padding_idx + 1 positions);
    the config-side twin of :attr:`ModelSpec.max_tokens`."""
    offset = config.pad_token_id + 1 if family_of(config) is Family.ROBERTA else 0
    return config.max_position_embeddings - offset


def load_checkpoint(
    model_dir: Path, *, head: Head, num_labels: int, seed: int
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Load weights with ``from_pretrained`` and describe them. Runs on the model owner only.

    New head parameters (a classifier the checkpoint lacks) are initialised by transformers
    under ``torch.manual_seed(seed)`` so reruns are reproducible.
    """
    config = load_config(model_dir)
    family = family_of(config)
    if config.hidden_act not in _SUPPORTED_ACTS:
        raise ModelError(
            f"model.path: hidden_act {config.hidden_act!r} is not supported; "
            f"supported: {sorted(_SUPPORTED_ACTS)}"
        )
    weights = [f for f in os.listdir(model_dir) if f.endswith((".safetensors", ".bin"))]
    if not weights:
        raise ModelError(
            f"model.path: {model_dir} has config.json but no weights (*.safetensors or *.bin)"
        )
    cls = _model_class(family, head)
    kwargs = {"num_labels": num_labels} if head is Head.SEQUENCE_CLASSIFICATION else {}
    saved_labels = len(getattr(config, "id2label", None) or {}) or None
    archs = getattr(config, "architectures", None) or []
    if (
        head is Head.SEQUENCE_CLASSIFICATION
        and any(a.endswith("ForSequenceClassification") for a in archs)
        and saved_labels not in (None, num_labels)
    ):
        raise ModelError(
            f"model.path: the checkpoint's classification head has {saved_labels} labels "
            f"but the data has {num_labels}; "
            "use data with the same label set (data.labels), "
            "or a checkpoint without a classification head"
        )
    torch.manual_seed(seed)
    try:
        model = cls.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="eager", **kwargs
        )
    except Exception as exc:
        raise ModelError(f"model.path: transformers could not load {model_dir}: {exc}") from exc
    model.eval()
    return spec_from_model(model, family=family, head=head), state_dict_of(model)


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable-shaped parameters only (buffers such as position_ids are not weights)."""
    return {n: p.detach().clone().to(torch.float32) for n, p in model.named_parameters()}


def spec_from_model(model: torch.nn.Module, *, family: Family, head: Head) -> ModelSpec:
    c: Any = (
        model.config
    )  # a PretrainedConfig; nn.Module's __getattr__ would type it Tensor | Module
    return ModelSpec(
        family=family,
        head=head,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_positions=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=float(c.layer_norm_eps),
        pad_token_id=int(c.pad_token_id if c.pad_token_id is not None else 0),
        hidden_act=c.hidden_act,
        num_labels=int(getattr(c, "num_labels", 2)) if head is Head.SEQUENCE_CLASSIFICATION else 0,
        param_shapes=tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
    )


def build_hf_model(spec_dir: Path, *, head: Head, num_labels: int, seed: int) -> torch.nn.Module:
    """The plaintext transformers model (reference forward for verification)."""
    config = load_config(spec_dir)
    cls = _model_class(family_of(config), head)
    kwargs = {"num_labels": num_labels} if head is Head.SEQUENCE_CLASSIFICATION else {}
    torch.manual_seed(seed)
    model = cls.from_pretrained(
        spec_dir, local_files_only=True, attn_implementation="eager", **kwargs
    )
    return model.eval()
