"""Shared test helpers: the packaged checkpoint and tiny random checkpoints saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from secfwt.models.checkpoint import resolve_model_path

    return resolve_model_path("packaged:all-minilm-l6-v2")


def save_random_checkpoint(path: Path, *, family: str, head: str, seed: int = 0, **overrides) -> Path:
    """A tiny BERT/RoBERTa checkpoint with random weights, written with save_pretrained."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=400, max_position_embeddings=80)
    base.update(overrides)
    cfg_cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
    config = cfg_cls(**base)
    name = {"base": "Model", "masked_lm": "ForMaskedLM", "sequence_classification": "ForSequenceClassification"}[head]
    model_cls = getattr(tf, ("Bert" if family == "bert" else "Roberta") + name)
    model = model_cls(config)
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_bert_cls(tmp_path: Path) -> Path:
    return save_random_checkpoint(tmp_path / "tiny-bert", family="bert", head="sequence_classification")
