"""The data owner's local preparation: load, split, tokenize. Runs in its own process, or in
the launcher before any party starts (an instruction job's data is checked there).

Labelled texts (``data.task = "classification"``) are split few-shot per class and tokenized;
instruction pairs (``"instructions"``) are split by prompt and formatted with the model's chat
template (:func:`prepare_instruction_batches`), and for a causal-LM job cut to its response
window (:func:`prepare_instruction_inputs`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from secfwt.config import DataSection, JobConfig
from secfwt.data.chat_tokenize import InstructionBatch, drop_too_long, format_instructions
from secfwt.data.datasets import LabelledTexts, load_dataset
from secfwt.data.inputs import DataOwnerInputs, InstructionInputs
from secfwt.data.instructions import InstructionPairs, load_instructions, split_by_prompt
from secfwt.data.sampling import few_shot_split
from secfwt.data.task import DataTask, Truncation
from secfwt.data.tokenize import load_tokenizer, tokenize
from secfwt.errors import ConfigError, DataError
from secfwt.models.checkpoint import load_config, max_input_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _data_for(cfg: JobConfig, task: DataTask) -> DataSection:
    """The job's [data] section, which must be for ``task`` (each preparation serves one)."""
    if cfg.data.task is not task:
        raise ConfigError(
            f"{cfg.source}: data.task = {cfg.data.task.value!r}, but this preparation needs "
            f"data.task = {task.value!r}"
        )
    return cfg.data


def _split(cfg: JobConfig) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """(whole dataset, few-shot training rows, held-out rows)."""
    d = _data_for(cfg, DataTask.CLASSIFICATION)
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
    A causal-LM job's ``truncate = "drop"`` also leaves out the pairs whose reply does not fit
    its response window.
    """
    batches, _ = _instruction_batches(
        cfg,
        tokenizer=tokenizer,
        model_max_positions=model_max_positions,
        max_length=cfg.model.max_length,
    )
    return batches


def prepare_instruction_inputs(cfg: JobConfig, *, tokenizer_dir: Path) -> InstructionInputs:
    """A causal-LM job's rows: training pairs then held-out pairs, left-padded to
    ``model.max_length``, with the targets of the last ``model.response_window`` positions.

    A reply (with its end-of-turn token) longer than the window is a :class:`DataError` naming
    the row and the fix (``truncate = "drop"`` leaves such pairs out instead). With a soft prompt
    of P vectors (``zo.soft_prompt_length``) the text gets ``max_length - P`` positions and
    every row is laid out ``pads, P prompt slots, text`` (:attr:`InstructionInputs.prompt_slots`).
    """
    tok = load_tokenizer(tokenizer_dir)
    if tok is None:
        raise DataError(
            f"model.path: {tokenizer_dir} has no tokenizer files; an instruction job needs the "
            "chat model's tokenizer and its chat template"
        )
    max_positions = max_input_tokens(load_config(tokenizer_dir))
    p = cfg.zo.soft_prompt_length
    try:
        (train, held_out), (train_pairs, held_pairs) = _instruction_batches(
            cfg,
            tokenizer=tok,
            model_max_positions=max_positions,
            max_length=cfg.model.max_length - p,
        )
    except DataError as exc:
        if not p:
            raise
        raise DataError(
            f"{exc} (the text's max_length is model.max_length = {cfg.model.max_length} less the "
            f"soft prompt's zo.soft_prompt_length = {p} positions)"
        ) from None
    r = cfg.model.response_window
    parts = [_window(b, p, window=r) for b, p in ((train, train_pairs), (held_out, held_pairs))]
    if not len(train_pairs):
        raise DataError(
            "data: no training pairs are left after the held-out split; lower data.eval_rows"
        )
    if not len(held_pairs):
        raise DataError(
            "data.eval_rows = 0: a causal_lm job evaluates the held-out response loss before and "
            "after tuning; set data.eval_rows >= 1"
        )
    ids = torch.cat([train.input_ids, held_out.input_ids])
    mask = torch.cat([train.attention_mask, held_out.attention_mask])
    slots = None
    if p:
        ids, mask, slots = _with_prompt_slots(ids, mask, slots=p, pad_id=train.pad_id)
    return InstructionInputs(
        input_ids=ids,
        attention_mask=mask,
        target_ids=torch.cat([ids for ids, _ in parts]),
        target_weights=torch.cat([w for _, w in parts]),
        n_train=len(train_pairs),
        prompt_slots=slots,
    )


def _with_prompt_slots(
    ids: torch.Tensor, mask: torch.Tensor, *, slots: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded rows (N, T - P) -> (N, T) laid out ``pads, P slots, text``: the slots hold the
    pad id and count as tokens in the key mask; returns ids, key mask and the slot mask."""
    n, t = ids.shape
    pads = (mask == 0).sum(1)  # (N,) left padding of each row
    pos = torch.arange(t + slots).expand(n, -1)
    at_slot = (pos >= pads[:, None]) & (pos < pads[:, None] + slots)  # (N, T)
    before = pos < pads[:, None]
    src = torch.where(before, pos, pos - slots).clamp(min=0, max=t - 1)  # text index per position
    out_ids = torch.where(at_slot, torch.full_like(pos, pad_id), ids.gather(1, src))
    out_mask = torch.where(at_slot, torch.ones_like(pos), mask.gather(1, src))
    return out_ids, out_mask, at_slot.to(torch.long)


def _window(
    batch: InstructionBatch, pairs: InstructionPairs, *, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights (N, R) of the last ``window`` target positions of left-padded rows;
    a reply that starts before the window is an error naming its row."""
    t = batch.input_ids.shape[1]
    lo, hi = t - 1 - window, t - 1  # target positions of the window
    outside = batch.target_mask[:, :lo].sum(1)  # (N,) reply tokens the window would miss
    if bool((outside > 0).any()):
        bad = [int(i) for i in torch.nonzero(outside > 0).flatten()]
        longest = int(batch.response_mask.sum(1).max())
        where = pairs.origins[bad[0]] if pairs.origins else f"pair {bad[0]}"
        raise DataError(
            f"{where}: its reply and end-of-turn token take "
            f"{int(batch.response_mask[bad[0]].sum())} tokens, more than model.response_window "
            f"= {window} ({len(bad)} of {len(pairs)} pairs, the longest {longest}); raise "
            "model.response_window or set data.truncate = 'drop' to leave those pairs out"
        )
    return batch.target_ids[:, lo:hi].clone(), batch.target_mask[:, lo:hi].clone()


def _instruction_batches(
    cfg: JobConfig,
    *,
    tokenizer: PreTrainedTokenizerBase,
    model_max_positions: int,
    max_length: int,
) -> tuple[tuple[InstructionBatch, InstructionBatch], tuple[InstructionPairs, InstructionPairs]]:
    """``((train, held_out) batches, (train, held_out) pairs)`` of ``max_length`` tokens: see
    :func:`prepare_instruction_batches`."""
    d = _data_for(cfg, DataTask.INSTRUCTIONS)
    pairs = load_instructions(
        source=d.source,
        path=d.path or None,
        prompt_column=d.prompt_column,
        response_column=d.response_column,
        system_column=d.system_column,
    )
    truncate = d.truncation
    if truncate is Truncation.DROP:
        pairs = drop_too_long(
            pairs,
            tokenizer=tokenizer,
            max_length=max_length,
            max_reply=cfg.model.response_window or None,
        )
        truncate = Truncation.NONE
    train, held_out = split_by_prompt(
        pairs, eval_rows=d.eval_rows, train_rows=d.train_rows, seed=cfg.job.seed
    )
    batches = tuple(
        format_instructions(
            part,
            tokenizer=tokenizer,
            max_length=max_length,
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
        max_length,
    )
    return (batches[0], batches[1]), (train, held_out)
