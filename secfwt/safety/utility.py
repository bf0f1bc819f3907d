"""Utility beside safety: the model's loss on held-out replies of a named conversation dataset.

A safety step that makes a model refuse everything would score perfectly on the harmful suites;
the held-out reply loss shows what it cost. The dataset is the packaged ChatterBot corpus
(chatterbot-corpus 1.3.3, BSD-3-Clause), split by prompt with
:func:`secfwt.data.instructions.split_by_prompt` (the split a tuning job uses, same seed), so a
job tuned on the training side is scored on prompts it never saw. The loss is the token-weighted
mean cross-entropy of the reply tokens and their end-of-turn token (the prompt and the template
are context only), :func:`secfwt.data.chat_tokenize.masked_next_token_loss`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from secfwt.data.chat_tokenize import (
    format_instructions,
    masked_next_token_loss,
    template_lengths,
)
from secfwt.data.instructions import InstructionPairs, load_chatterbot, split_by_prompt
from secfwt.data.task import PaddingSide, Truncation

log = logging.getLogger(__name__)

UTILITY_DATASET = "chatterbot"


@dataclass(frozen=True)
class UtilityResult:
    dataset: str
    rows: int
    seed: int
    reply_tokens: int
    loss: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": f"held-out side of split_by_prompt(eval_rows={self.rows}, seed={self.seed})",
            "rows": self.rows,
            "reply_tokens": self.reply_tokens,
            "loss": self.loss,
        }


def chatterbot_held_out(*, rows: int, seed: int = 0) -> InstructionPairs:
    """The held-out side of the ChatterBot prompt-disjoint split."""
    _, held_out = split_by_prompt(load_chatterbot(), eval_rows=rows, seed=seed)
    return held_out


@torch.no_grad()
def held_out_reply_loss(
    model: Any,
    tokenizer: Any,
    data: InstructionPairs,
    *,
    dataset: str = UTILITY_DATASET,
    seed: int = 0,
    batch_size: int = 16,
) -> UtilityResult:
    """Token-weighted mean reply loss of ``model`` on ``data``, every pair whole. Rows are batched
    in order of length and each batch is cut to its longest row (the mean does not depend on the
    order), which spares most of the padding."""
    longest = max(template_lengths(data, tokenizer=tokenizer))
    batch = format_instructions(
        data,
        tokenizer=tokenizer,
        max_length=max(longest, 2),
        truncate=Truncation.NONE,
        padding_side=PaddingSide.RIGHT,
        model_max_positions=int(getattr(model.config, "max_position_embeddings", longest)),
    )
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    order = torch.argsort(batch.lengths())  # (N,)
    for start in range(0, len(batch), batch_size):
        rows = order[start : start + batch_size]
        width = int(batch.attention_mask[rows].sum(dim=1).max())  # right padding: trim the tail
        logits = model(
            input_ids=batch.input_ids[rows, :width].to(device),
            attention_mask=batch.attention_mask[rows, :width].to(device),
        ).logits  # (B, width, V)
        mask = batch.target_mask[rows, :width].to(device)
        n = int(mask.sum())
        loss = masked_next_token_loss(logits, batch.target_ids[rows, :width].to(device), mask)
        total += float(loss) * n
        tokens += n
    result = UtilityResult(
        dataset=dataset, rows=len(data), seed=seed, reply_tokens=tokens, loss=total / tokens
    )
    log.info("held-out reply loss %.4f over %d tokens", result.loss, tokens)
    return result
