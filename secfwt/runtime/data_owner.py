"""The data owner's local preparation: load, split few-shot, tokenize. Runs in its own process."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from secfwt.config import JobConfig
from secfwt.data.datasets import LabelledTexts, load_dataset
from secfwt.data.inputs import DataOwnerInputs
from secfwt.data.sampling import few_shot_split
from secfwt.data.task import Truncation
from secfwt.data.tokenize import load_tokenizer, tokenize
from secfwt.errors import DataError
from secfwt.models.checkpoint import load_config, max_input_tokens

log = logging.getLogger(__name__)


def _split(cfg: JobConfig) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """(whole dataset, few-shot training rows, held-out rows)."""
    d = cfg.data
    data = load_dataset(
        source=d.source,
        path=d.path or None,
        text_column=d.text_column,
        label_column=d.label_column,
        labels=list(d.labels) or None,
    )
    train, held_out = few_shot_split(
        data, shots_per_class=d.shots_per_class, eval_per_class=d.eval_per_class, seed=cfg.job.seed
    )
    return data, train, held_out


def count_train_rows(cfg: JobConfig) -> int:
    """How many training rows the job's data split has (a public fact of the job)."""
    return len(_split(cfg)[1])


def prepare_inputs(cfg: JobConfig, *, tokenizer_dir: Path) -> DataOwnerInputs:
    """Few-shot train rows followed by held-out eval rows, tokenized to ``model.max_length``.

    The tokenizer is the checkpoint's (vocabularies are public); the data never leaves this
    process except as secret shares.
    """
    d = cfg.data
    data, train, held_out = _split(cfg)
    tok = load_tokenizer(tokenizer_dir)
    if tok is None:
        raise DataError(
            f"model.path: {tokenizer_dir} has no tokenizer files; "
            "a tuning job needs the checkpoint's tokenizer to encode data.path"
        )
    config = load_config(tokenizer_dir)
    texts = list(train.texts) + list(held_out.texts)
    batch = tokenize(
        texts,
        tokenizer=tok,
        max_length=cfg.model.max_length,
        truncate=d.truncation is Truncation.END,
        model_max_positions=max_input_tokens(config),
    )
    labels = torch.tensor(list(train.labels) + list(held_out.labels), dtype=torch.long)
    log.info(
        "data owner: %d train + %d eval rows, %d labels, length %d",
        len(train),
        len(held_out),
        len(data.label_names),
        cfg.model.max_length,
    )
    return DataOwnerInputs(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=labels,
        n_train=len(train),
        num_labels=len(data.label_names),
    )
