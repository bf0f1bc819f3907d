"""Load a Hugging Face checkpoint with ``from_pretrained`` (the model owner's side) and check that
secfwt supports its architecture: BERT/RoBERTa encoders, Llama/Qwen2/Mistral decoders."""

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

_SUPPORTED_ACTS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"}
_SUPPORTED = "BERT and RoBERTa encoders, Llama (SmolLM2), Qwen2 and Mistral decoders"


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
        (Family.LLAMA, Head.BASE): tf.LlamaModel,
        (Family.LLAMA, Head.CAUSAL_LM): tf.LlamaForCausalLM,
        (Family.QWEN2, Head.BASE): tf.Qwen2Model,
        (Family.QWEN2, Head.CAUSAL_LM): tf.Qwen2ForCausalLM,
        (Family.MISTRAL, Head.BASE): tf.MistralModel,
        (Family.MISTRAL, Head.CAUSAL_LM): tf.MistralForCausalLM,
        (Family.BERT, Head.BASE): tf.BertModel,
        (Family.BERT, Head.MASKED_LM): tf.BertForMaskedLM,
        (Family.BERT, Head.SEQUENCE_CLASSIFICATION): tf.BertForSequenceClassification,
        (Family.ROBERTA, Head.BASE): tf.RobertaModel,
        (Family.ROBERTA, Head.MASKED_LM): tf.RobertaForMaskedLM,
        (Family.ROBERTA, Head.SEQUENCE_CLASSIFICATION): tf.RobertaForSequenceClassification,
    }
    if (family, head) not in table:
        heads = [h.value for f, h in table if f is family]
        raise ModelError(
            f"model.head: {head.value!r} is not available for a {family.value} checkpoint; "
            f"supported heads: {heads}"
        )
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
        f"model.path: model_type {mt!r} is not supported yet; secfwt supports {_SUPPORTED} "
        f"(model_type {', '.join(repr(f.value) for f in Family)})"
    )


def check_architecture(config) -> Family:
    """The checkpoint's family, after checking every config field secfwt's forward depends on;
    a :class:`ModelError` naming the field and what is supported otherwise. Cheap (config only):
    run it before any party starts."""
    family = family_of(config)
    if config.hidden_act not in _SUPPORTED_ACTS:
        raise ModelError(
            f"model.path: hidden_act {config.hidden_act!r} is not supported; "
            f"supported: {sorted(_SUPPORTED_ACTS)}"
        )
    if family.is_decoder:
        _check_decoder_config(config)
    return family


def _check_decoder_config(config) -> None:
    if config.hidden_act != "silu":
        raise ModelError(
            f"model.path: hidden_act {config.hidden_act!r} in a {config.model_type} decoder is not "
            "supported; supported: 'silu' (the gated SiLU MLP)"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(
            f"model.path: rope_parameters.rope_type (rope_scaling) {rope_type!r} is not "
            "supported; supported: 'default' (unscaled rotary embeddings, any rope_theta)"
        )
    factor = rope.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ModelError(
            f"model.path: rope_parameters.partial_rotary_factor {factor} is not supported; "
            "supported: 1.0 (every head dimension rotated)"
        )
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if heads % kv:
        raise ModelError(
            f"model.path: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
    for i, kind in enumerate(getattr(config, "layer_types", None) or ()):
        if kind not in ("full_attention", "sliding_attention"):
            raise ModelError(
                f"model.path: layer_types[{i}] = {kind!r} is not supported; supported: "
                "'full_attention', 'sliding_attention'"
            )


def layer_windows(config) -> tuple[int, ...]:
    """Per-layer sliding window (0: full causal attention). Qwen2 names sliding layers in
    ``layer_types``; Mistral slides every layer by ``sliding_window``; Llama never slides."""
    window = int(getattr(config, "sliding_window", None) or 0)
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(window if kind == "sliding_attention" else 0 for kind in types)
    return (window,) * config.num_hidden_layers


def max_input_tokens(config) -> int:
    """Longest input the position table allows (RoBERTa reserves padding_idx + 1 positions;
    decoders: the rotary range they were trained on); the config-side twin of
    :attr:`ModelSpec.max_tokens`."""
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
    family = check_architecture(config)
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


def spec_of_config(model_dir: Path, *, head: Head) -> ModelSpec:
    """The :class:`ModelSpec` of a checkpoint from its config alone (the model built on the
    meta device: names and shapes, no weights), for checks before any party starts."""
    config = load_config(model_dir)
    family = check_architecture(config)
    with torch.device("meta"):
        model = _model_class(family, head)._from_config(config)
    return spec_from_model(model, family=family, head=head)


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable-shaped parameters only (buffers such as position_ids are not weights)."""
    return {n: p.detach().clone().to(torch.float32) for n, p in model.named_parameters()}


def spec_from_model(model: torch.nn.Module, *, family: Family, head: Head) -> ModelSpec:
    c: Any = (
        model.config
    )  # a PretrainedConfig; nn.Module's __getattr__ would type it Tensor | Module
    common: dict[str, Any] = {
        "family": family,
        "head": head,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "max_positions": c.max_position_embeddings,
        "pad_token_id": int(c.pad_token_id if c.pad_token_id is not None else 0),
        "hidden_act": c.hidden_act,
        "param_shapes": tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
    }
    if family.is_decoder:
        return ModelSpec(
            **common,
            type_vocab_size=0,
            layer_norm_eps=float(c.rms_norm_eps),
            num_labels=0,
            num_kv_heads=int(c.num_key_value_heads or c.num_attention_heads),
            attention_head_dim=int(getattr(c, "head_dim", None) or 0),
            rope_theta=float(c.rope_parameters["rope_theta"]),
            tie_word_embeddings=bool(c.tie_word_embeddings),
            layer_windows=layer_windows(c),
        )
    return ModelSpec(
        **common,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=float(c.layer_norm_eps),
        num_labels=int(getattr(c, "num_labels", 2)) if head is Head.SEQUENCE_CLASSIFICATION else 0,
    )


def build_hf_model(
    spec_dir: Path, *, head: Head, num_labels: int, seed: int, attn: str = "eager"
) -> torch.nn.Module:
    """The plaintext transformers model (reference forward for verification); ``attn`` is its
    ``attn_implementation``."""
    config = load_config(spec_dir)
    cls = _model_class(check_architecture(config), head)
    kwargs = {"num_labels": num_labels} if head is Head.SEQUENCE_CLASSIFICATION else {}
    torch.manual_seed(seed)
    model = cls.from_pretrained(spec_dir, local_files_only=True, attn_implementation=attn, **kwargs)
    return model.eval()
