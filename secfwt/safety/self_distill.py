"""Benign answers written by the base model itself (self-distillation) for the alignment mix.

Training a model to refuse harmful requests also pushes it to refuse benign ones; pairing the
refusals with benign prompts answered *as the base model already answers them* anchors its
behaviour there without teaching it a new style (the loss on those rows starts low and mostly
penalises drifting towards refusal). Answers are greedy (:mod:`.generation`), so they are a
function of the weights and the prompt.

A reply cut at ``max_new_tokens`` is shortened to its last complete sentence (it would otherwise
teach the model to end mid-sentence); a cut reply with no complete sentence, or a reply the
keyword judge counts as a refusal, is left out (a refusal of a benign prompt is exactly what the
benign side must not teach).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from secfwt.safety.generation import Reply, generate_replies
from secfwt.safety.keyword_judge import keyword_refusal

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def complete_sentences(reply: Reply) -> str | None:
    """The reply if it ended at its end-of-turn token; else its text up to the last sentence
    end (``.``, ``!`` or ``?`` before a space or the end); ``None`` when there is none."""
    if reply.stopped:
        return reply.text or None
    ends = [m.end() for m in _SENTENCE_END.finditer(reply.text)]
    return reply.text[: ends[-1]].strip() if ends else None


def distil_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``[(prompt, answer)]`` for the prompts the base model answers usably, in order, and how
    many were left out per reason."""
    replies = generate_replies(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        on_batch=on_batch,
    )
    kept: list[tuple[str, str]] = []
    dropped = {"no complete sentence": 0, "base model refused": 0}
    for prompt, reply in zip(prompts, replies, strict=True):
        answer = complete_sentences(reply)
        if answer is None:
            dropped["no complete sentence"] += 1
        elif keyword_refusal(answer):
            dropped["base model refused"] += 1
        else:
            kept.append((prompt, answer))
    log.info(
        "self-distilled %d benign answers of %d prompts (%s)", len(kept), len(prompts), dropped
    )
    return kept, dropped
