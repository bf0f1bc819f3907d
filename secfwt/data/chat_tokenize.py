"""Instruction pairs to fixed-shape token tensors through the tokenizer's chat template.

The data owner formats every pair exactly as the model will see a conversation at inference:
``apply_chat_template`` over ``[system?, user: prompt, assistant: reply]`` (no system message:
the template's default applies, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM"),
tokenized as one string. The loss counts only the reply: its tokens and the end-of-turn token
that follows it (so the tuned model learns to stop). Anything the template writes after that
token (SmolLM2: a newline) is dropped, so each row ends with the end-of-turn token.

Next-token convention (causal LM; shapes ``N`` rows x ``T = max_length`` positions)::

    input_ids      (N, T)  template tokens, padded with the tokenizer's pad id
    attention_mask (N, T)  1 on tokens, 0 on padding
    response_mask  (N, T)  1 on the reply's tokens and its end-of-turn token
    target_ids     (N, T)  target_ids[:, t] = input_ids[:, t + 1];  target_ids[:, T - 1] = pad
    target_mask    (N, T)  target_mask[:, t] = response_mask[:, t + 1]; target_mask[:, T - 1] = 0

The logits at position ``t`` predict ``target_ids[:, t]``; the loss is the mean cross-entropy
over the batch's target positions (:func:`masked_next_token_loss`)::

    loss = sum_{n,t} target_mask[n,t] * CE(logits[n,t], target_ids[n,t]) / sum target_mask

which is what Hugging Face's causal-LM loss computes with ``labels = input_ids`` where
``response_mask`` is 1 and -100 elsewhere (it shifts internally). With left padding a row's
tokens end at position ``T - 1``; position ids must then come from ``attention_mask``.

Every row is padded to exactly ``T``: under MPC the sequence length is public and fixes the cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from secfwt.data.instructions import InstructionPairs
from secfwt.data.task import PaddingSide, Truncation
from secfwt.data.tokenize import PaddedRows
from secfwt.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Stand-ins for the prompt and the reply when the template is rendered once per system message
# to find where the messages go (Unicode private-use characters: no real text contains them).
_PROMPT_MARK = "\ue000secfwt-prompt\ue000"
_REPLY_MARK = "\ue000secfwt-reply\ue000"


@dataclass(frozen=True)
class InstructionBatch(PaddedRows):
    """Instruction pairs as fixed-length token rows (the module doc gives the convention).

    All five tensors are int64 of shape ``(N, T)``.
    """

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T) 1 = token, 0 = padding
    response_mask: torch.Tensor  # (N, T) 1 = reply token or its end-of-turn token
    target_ids: torch.Tensor  # (N, T) input_ids shifted left by one, pad at T - 1
    target_mask: torch.Tensor  # (N, T) response_mask shifted left by one, 0 at T - 1
    pad_id: int
    padding_side: PaddingSide

    def __post_init__(self) -> None:
        for name in ("attention_mask", "response_mask", "target_ids", "target_mask"):
            tensor = getattr(self, name)
            if tensor.dtype != torch.long or tensor.shape != self.input_ids.shape:
                raise DataError(
                    f"InstructionBatch.{name} is {tuple(tensor.shape)} {tensor.dtype}; it must "
                    f"be int64 of the shape of input_ids {tuple(self.input_ids.shape)}"
                )


@dataclass(frozen=True)
class _Layout:
    """The template around one system message: text = head + prompt + mid + reply + tail."""

    head: str
    mid: str
    tail: str


def format_instructions(
    data: InstructionPairs,
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncate: Truncation,
    padding_side: PaddingSide,
    model_max_positions: int,
) -> InstructionBatch:
    """Format, tokenize, mask, shift and pad ``data`` to ``max_length`` positions.

    ``truncate`` is ``none`` (an over-long pair is a :class:`DataError` naming it and the fix) or
    ``prompt_left`` (the prompt's first tokens are dropped until the pair fits; the template and
    the reply are never cut). For ``drop``, leave the over-long pairs out with
    :func:`drop_too_long` before splitting, then format with ``none``. A prompt or reply that
    contains a special token of the tokenizer (e.g. ``<|im_end|>``) is refused: it would forge
    a turn of the conversation.
    """
    _check_options(max_length, truncate, padding_side, model_max_positions)
    truncate, padding_side = Truncation(truncate), PaddingSide(padding_side)
    pad_id = _pad_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []  # (token ids, response mask) per pair
    too_long: list[tuple[int, int]] = []  # (row, tokens)
    for i, (ids, mask, prompt_span) in enumerate(_encode(data, tokenizer)):
        if len(ids) > max_length:
            if truncate is Truncation.NONE:
                too_long.append((i, len(ids)))
                continue
            ids, mask = _cut_prompt_left(ids, mask, prompt_span, max_length, data, i)
        rows.append((ids, mask))
    if too_long:
        row, n = too_long[0]
        longest = max(n for _, n in too_long)
        fix = (
            f"raise model.max_length to {longest} (the model allows {model_max_positions})"
            if longest <= model_max_positions
            else f"the longest exceeds the model's {model_max_positions} positions, so"
        )
        raise DataError(
            f"{_where(data, row)} has {n} tokens at the chat template, more than max_length = "
            f"{max_length} ({len(too_long)} of {len(data)} pairs are too long, the longest has "
            f"{longest}); {fix} or set data.truncate = 'prompt_left' or 'drop' (or shorten those "
            "pairs)"
        )
    batch = _pad(rows, max_length=max_length, pad_id=pad_id, padding_side=padding_side)
    if rows:
        lengths = batch.lengths().float()
        log.info(
            "formatted %d instruction pairs: %d to %d tokens (mean %.1f) of max_length %d, "
            "%d reply tokens, %s padding",
            len(rows),
            int(lengths.min()),
            int(lengths.max()),
            float(lengths.mean()),
            max_length,
            int(batch.response_mask.sum()),
            padding_side.value,
        )
    return batch


def template_lengths(data: InstructionPairs, *, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens of each pair at the chat template, up to its end-of-turn token, uncut."""
    return [len(ids) for ids, _, _ in _encode(data, tokenizer)]


def drop_too_long(
    data: InstructionPairs,
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_reply: int | None = None,
) -> InstructionPairs:
    """The pairs that fit in ``max_length`` tokens at the chat template (``truncate = "drop"``)
    and, with ``max_reply``, whose reply (with its end-of-turn token) has at most that many
    tokens (a causal-LM job's response window).

    Run before the split, so that a job's ``train_rows`` and ``eval_rows`` are exact.
    """
    encoded = _encode(data, tokenizer)
    lengths = [len(ids) for ids, _, _ in encoded]
    keep = [
        i
        for i, (ids, mask, _) in enumerate(encoded)
        if len(ids) <= max_length and (max_reply is None or sum(mask) <= max_reply)
    ]
    if not keep:
        window = "" if max_reply is None else f" with a reply of at most {max_reply} tokens"
        raise DataError(
            f"no pair fits in max_length = {max_length} tokens at the chat template{window} (the "
            f"shortest has {min(lengths, default=0)}); raise model.max_length"
            + ("" if max_reply is None else " or model.response_window")
        )
    log.info(
        "truncate = 'drop': left out %d of %d pairs longer than max_length = %d%s",
        len(data) - len(keep),
        len(data),
        max_length,
        "" if max_reply is None else f" or with replies longer than {max_reply} tokens",
    )
    return data.subset(keep)


def masked_next_token_loss(
    logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (N, T, V) at the target positions: the plaintext loss of
    an instruction batch (module doc). A batch without a target position is an error."""
    n_targets = target_mask.sum()
    if int(n_targets) == 0:
        raise DataError("the batch has no reply tokens (target_mask is all zero)")
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), target_ids.flatten(), reduction="none"
    )  # (N * T,)
    return (ce * target_mask.flatten().to(ce.dtype)).sum() / n_targets


# --- helpers -------------------------------------------------------------------------------


def _check_options(
    max_length: int, truncate: Any, padding_side: Any, model_max_positions: int
) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length = {max_length!r} must be an integer >= 2")
    if max_length > model_max_positions:
        raise ConfigError(
            f"max_length = {max_length} exceeds the model's limit of {model_max_positions} "
            f"positions; set max_length <= {model_max_positions}"
        )
    if truncate == Truncation.DROP:
        raise ConfigError(
            "truncate = 'drop' leaves pairs out before the split: call drop_too_long first, "
            "then format with truncate = 'none'"
        )
    allowed = (Truncation.NONE.value, Truncation.PROMPT_LEFT.value)
    if truncate not in allowed:
        raise ConfigError(
            f"truncate = {str(truncate)!r} is not a policy for instruction pairs ('end' would "
            f"cut the reply); use one of {list(allowed)}"
        )
    if padding_side not in {s.value for s in PaddingSide}:
        raise ConfigError(
            f"padding_side = {str(padding_side)!r}; use one of {[s.value for s in PaddingSide]}"
        )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id; its end-of-sequence id when it has none (padding is masked)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        log.info("tokenizer has no pad token; padding with its eos id %d", tokenizer.eos_token_id)
        return int(tokenizer.eos_token_id)
    raise ModelError("the tokenizer has neither a pad nor an eos token; it cannot pad rows")


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return frozenset(ids)


def _render(tokenizer: PreTrainedTokenizerBase, system: str | None, *turns: str, **kw: Any) -> str:
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [
        {"role": role, "content": text}
        for role, text in zip(("user", "assistant"), turns, strict=False)
    ]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            "the tokenizer has no chat template; instruction tuning needs a chat model's "
            "tokenizer (e.g. packaged:smollm2-135m-instruct)"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    if not isinstance(text, str):
        raise ModelError(f"the chat template rendered a {type(text).__name__}, not text")
    return text


def _layout(tokenizer: PreTrainedTokenizerBase, system: str | None) -> _Layout:
    """Where the prompt and reply go in the template, checked against the generation prompt: the
    tokens before the reply must be exactly what the model is given at inference."""
    text = _render(tokenizer, system, _PROMPT_MARK, _REPLY_MARK)
    if text.count(_PROMPT_MARK) != 1 or text.count(_REPLY_MARK) != 1:
        raise ModelError(
            "the chat template does not write the user and assistant messages verbatim once "
            "each; secfwt cannot tell which tokens are the reply"
        )
    head, rest = text.split(_PROMPT_MARK)
    mid, tail = rest.split(_REPLY_MARK)
    prefix = _render(tokenizer, system, _PROMPT_MARK, add_generation_prompt=True)
    if prefix != head + _PROMPT_MARK + mid:
        raise ModelError(
            "the chat template's generation prompt differs from the text before the assistant "
            "reply in a full conversation; training on it would not match inference"
        )
    return _Layout(head=head, mid=mid, tail=tail)


def _encode(
    data: InstructionPairs, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int], tuple[int, int]]]:
    """:func:`_tokenize_pair` of every pair, the template laid out once per system message."""
    special = _special_ids(tokenizer)
    layouts: dict[str | None, _Layout] = {}
    out = []
    for i, system in enumerate(data.systems):
        if system not in layouts:
            layouts[system] = _layout(tokenizer, system)
        out.append(_tokenize_pair(tokenizer, layouts[system], data, i, special=special))
    return out


def _tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    layout: _Layout,
    data: InstructionPairs,
    i: int,
    *,
    special: frozenset[int],
) -> tuple[list[int], list[int], tuple[int, int]]:
    """Token ids up to the reply's end-of-turn token, the response mask, and the token range
    ``[start, stop)`` of the prompt."""
    prompt, reply = data.prompts[i], data.responses[i]
    text = layout.head + prompt + layout.mid + reply + layout.tail
    if text != _render(tokenizer, data.systems[i], prompt, reply):
        raise ModelError(
            f"{_where(data, i)}: the chat template changes the message text (e.g. strips it); "
            "secfwt cannot tell which tokens are the reply"
        )
    p0 = len(layout.head)
    p1 = p0 + len(prompt)
    r0 = p1 + len(layout.mid)
    r1 = r0 + len(reply)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    for start, end in offsets:
        for boundary, what in ((p0, "prompt"), (p1, "prompt"), (r0, "reply"), (r1, "reply")):
            if start < boundary < end:
                raise DataError(
                    f"{_where(data, i)}: a token spans the edge of the {what} and the template "
                    "text, so the reply tokens are not well defined; remove leading or trailing "
                    "special characters from the pair"
                )
    prompt_tokens = [t for t, (s, e) in enumerate(offsets) if s >= p0 and e <= p1 and e > s]
    reply_tokens = [t for t, (s, e) in enumerate(offsets) if s >= r0 and e <= r1 and e > s]
    for field, tokens in (("prompt", prompt_tokens), ("response", reply_tokens)):
        forged = [ids[t] for t in tokens if ids[t] in special]
        if forged:
            raise DataError(
                f"{_where(data, i)}: the {field} contains the tokenizer's special token "
                f"{tokenizer.convert_ids_to_tokens(forged[0])!r}, which would forge a turn of "
                "the conversation; remove it from the data"
            )
    eot = next((t for t, (s, _) in enumerate(offsets) if s == r1 and t > reply_tokens[-1]), None)
    if eot is None or ids[eot] not in special:
        raise ModelError(
            "the chat template does not end the assistant's reply with a special end-of-turn "
            "token; the tuned model would not learn to stop"
        )
    ids = ids[: eot + 1]
    mask = [0] * len(ids)
    for t in [*reply_tokens, eot]:
        mask[t] = 1
    return ids, mask, (prompt_tokens[0], prompt_tokens[-1] + 1)


def _cut_prompt_left(
    ids: list[int],
    mask: list[int],
    prompt_span: tuple[int, int],
    max_length: int,
    data: InstructionPairs,
    i: int,
) -> tuple[list[int], list[int]]:
    """Drop the prompt's first ``len(ids) - max_length`` tokens; at least one prompt token stays."""
    excess = len(ids) - max_length
    start, stop = prompt_span
    if excess >= stop - start:
        fixed = len(ids) - (stop - start)
        raise DataError(
            f"{_where(data, i)}: the template and the reply alone take {fixed} tokens, so no "
            f"prompt token fits in max_length = {max_length}; raise model.max_length to at "
            f"least {fixed + 1} or remove the pair"
        )
    return ids[:start] + ids[start + excess :], mask[:start] + mask[start + excess :]


def _pad(
    rows: list[tuple[list[int], list[int]]],
    *,
    max_length: int,
    pad_id: int,
    padding_side: PaddingSide,
) -> InstructionBatch:
    n = len(rows)
    input_ids = torch.full((n, max_length), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)  # (N, T)
    response_mask = torch.zeros((n, max_length), dtype=torch.long)  # (N, T)
    for row, (ids, mask) in enumerate(rows):
        span = (
            slice(0, len(ids))
            if padding_side is PaddingSide.RIGHT
            else slice(max_length - len(ids), max_length)
        )
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
        response_mask[row, span] = torch.tensor(mask, dtype=torch.long)
    target_ids = torch.full_like(input_ids, pad_id)  # (N, T)
    target_ids[:, :-1] = input_ids[:, 1:]
    target_mask = torch.zeros_like(response_mask)  # (N, T)
    target_mask[:, :-1] = response_mask[:, 1:]
    return InstructionBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        target_ids=target_ids,
        target_mask=target_mask,
        pad_id=pad_id,
        padding_side=padding_side,
    )


def _where(data: InstructionPairs, i: int) -> str:
    return data.origins[i] if data.origins else f"pair {i}"
