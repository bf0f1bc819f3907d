"""The data owner's local preparation: load, split, tokenize. Runs in its own process.

Labelled texts (``data.task = "classification"``) are split few-shot per class and tokenized;
instruction pairs (``"instructions"``) are split by prompt and formatted with the model's chat
template (:func:`prepare_instruction_batches`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from secfwt.config import JobConfig
from secfwt.data.chat_tokenize import InstructionBatch, drop_too_long, format_instructions
from secfwt.data.datasets import LabelledTexts, load_dataset
from secfwt.data.inputs import DataOwnerInputs
from secfwt.data.instructions import load_instructions, split_by_prompt
from secfwt.data.sampling import few_shot_split
from secfwt.data.task import DataTask, Truncation
from secfwt.data.tokenize import load_tokenizer, tokenize
from secfwt.errors import ConfigError, DataError
from secfwt.models.checkpoint import load_config, max_input_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _split(cfg: JobConfig) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """(whole dataset, few-shot training rows, held-out rows)."""
    d = cfg.data
    if d.task is not DataTask.CLASSIFICATION:
        raise ConfigError(
            f"{cfg.source}: data.task = {d.task.value!r}: labelled-text preparation needs "
            "data.task = 'classification' (instruction pairs: prepare_instruction_batches)"
        )
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


def prepare_instruction_batches(
    cfg: JobConfig, *, tokenizer: PreTrainedTokenizerBase, model_max_positions: int
) -> tuple[InstructionBatch, InstructionBatch]:
    """``(train, held_out)`` instruction batches of ``model.max_length`` positions: the pairs of
    ``[data]``, split by prompt with ``job.seed``, formatted with ``tokenizer``'s chat template.

    Every defect of the data (a missing column, an empty reply, a pair too long for the job's
    truncation policy) raises here, so a runner that calls this before starting parties refuses
    the job before any party starts. The tokenizer is the model's (a vocabulary: public).
    """
    d = cfg.data
    if d.task is not DataTask.INSTRUCTIONS:
        raise ConfigError(
            f"{cfg.source}: data.task = {d.task.value!r}; instruction batches need "
            "data.task = 'instructions'"
        )
    pairs = load_instructions(
        source=d.source,
        path=d.path or None,
        prompt_column=d.prompt_column,
        response_column=d.response_column,
        system_column=d.system_column,
    )
    truncate = d.truncation
    if truncate is Truncation.DROP:
        pairs = drop_too_long(pairs, tokenizer=tokenizer, max_length=cfg.model.max_length)
        truncate = Truncation.NONE
    train, held_out = split_by_prompt(
        pairs, eval_rows=d.eval_rows, train_rows=d.train_rows, seed=cfg.job.seed
    )
    batches = tuple(
        format_instructions(
            part,
            tokenizer=tokenizer,
            max_length=cfg.model.max_length,
            truncate=truncate,
            padding_side=d.padding_side,
            model_max_positions=model_max_positions,
        )
        for part in (train, held_out)
    )
    log.info(
        "data owner: %d train + %d held-out instruction pairs, length %d",
        len(train),
        len(held_out),
        cfg.model.max_length,
    )
    return batches[0], batches[1]
