"""Greedy replies of a chat model to single-turn prompts, batched, stopping at the end of the turn.

Each prompt is rendered with the tokenizer's chat template as a one-message user turn with the
generation prompt (the assistant turn opened), exactly as a chat front end would send it; the
template's default system message applies (SmolLM2: "You are a helpful AI assistant named
SmolLM, ..."). Decoding is greedy, so a reply is a function of the weights and the prompt alone.

Stopping: at the tokenizer's end-of-sequence token and at the template's end-of-turn token
(the special token the template writes right after an assistant message; ``<|im_end|>`` for
SmolLM2's ChatML), whichever comes first; the reply is the text before it. A reply that reaches
``max_new_tokens`` is cut there (``stopped = False`` in its record).

Batching: prompts are sorted by length (less padding) and padded on the left, so that every row's
last prompt token sits at the same position and the next token is read from the same column;
``attention_mask`` hides the padding and Hugging Face's ``generate`` derives position ids from
it, so a batched reply equals the unbatched one (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from secfwt.data.sampling import check_count
from secfwt.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_REPLY_MARK = "\ue000secfwt-reply\ue000"  # private-use characters: in no real text


@dataclass(frozen=True)
class Reply:
    """One generated reply: its text (first assistant turn only), its token count, and whether it
    ended at an end-of-turn token (``False``: cut at ``max_new_tokens``)."""

    text: str
    n_tokens: int
    stopped: bool


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The eos id and the chat template's end-of-turn id (the special token that follows an
    assistant message), de-duplicated; at least one, or a :class:`ModelError`."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            "the tokenizer has no chat template; the safety evaluation needs a chat model "
            "(e.g. packaged:smollm2-135m-instruct)"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_MARK}],
        tokenize=False,
    )
    tail = str(text).split(_REPLY_MARK, 1)[-1]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if tail_ids and tail_ids[0] in set(tokenizer.all_special_ids):
        ids.append(int(tail_ids[0]))
    if not ids:
        raise ModelError(
            "the tokenizer has no eos token and its chat template ends an assistant turn with no "
            "special token; generation could not tell where a reply ends"
        )
    return tuple(dict.fromkeys(ids))


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The chat-template tokens of ``prompt`` as a user turn, the assistant turn opened."""
    out: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [int(t) for t in ids]


def generate_replies(
    model: Any,  # a transformers causal LM (PreTrainedModel with GenerationMixin)
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[Reply]:
    """Greedy replies to ``prompts`` in their order. ``on_batch(n)`` after each batch of ``n``."""
    check_count("--max-new-tokens", max_new_tokens, minimum=1)
    check_count("--batch-size", batch_size, minimum=1)
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stops),
        pad_token_id=pad_id,
    )
    encoded = [prompt_token_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    replies: list[Reply | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for r, i in enumerate(rows):
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )  # (B, T + new)
        for r, i in enumerate(rows):
            replies[i] = first_turn(tokenizer, out[r, width:].tolist(), stops)
        if on_batch is not None:
            on_batch(len(rows))
    return [r for r in replies if r is not None]


def first_turn(tokenizer: PreTrainedTokenizerBase, new: list[int], stops: Sequence[int]) -> Reply:
    """The assistant's first turn in the generated tokens ``new``: up to the first stop token,
    decoded without special tokens; what a model writes after it (an invented next turn) is
    dropped."""
    cut = next((t for t, tok in enumerate(new) if tok in stops), None)
    ids = new if cut is None else new[:cut]
    text = str(tokenizer.decode(ids, skip_special_tokens=True)).strip()
    return Reply(text=text, n_tokens=len(ids), stopped=cut is not None)
