"""Turn the data owner's texts into fixed-shape token id tensors.

Every batch is padded to exactly ``max_length``: under MPC the sequence length is public and
fixes the cost of every layer, so it must not vary with the (private) texts. Truncation is opt-in:
a silently cut review may lose the words that carry its label, so by default an over-long text is
an error that names its row and says how to fix it.

Checkpoints shipped without a tokenizer (e.g. benchmark weights) get :func:`random_token_ids`,
which keeps shapes and special-token positions realistic for cost measurements.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from secfwt.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Files any Hugging Face tokenizer is loaded from; a checkpoint with none of them has no tokenizer.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# Keys of `special` in random_token_ids that pin a token to the first / last position.
_FIRST_KEYS = ("cls", "bos")
_LAST_KEYS = ("sep", "eos")


@dataclass(frozen=True)
class TokenizedBatch:
    """Token ids of ``N`` texts padded to ``T`` positions, right-padded.

    ``attention_mask`` is 1 on real tokens and 0 on padding; ``token_type_ids`` are all zero
    (single-segment classification). All three are int64 tensors of shape ``(N, T)``.
    """

    input_ids: torch.Tensor  # (N, T) int64
    attention_mask: torch.Tensor  # (N, T) int64, 1 = token, 0 = padding
    token_type_ids: torch.Tensor  # (N, T) int64, zeros

    def __post_init__(self) -> None:
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            tensor = getattr(self, name)
            if tensor.dim() != 2 or tensor.dtype != torch.long:
                raise DataError(
                    f"TokenizedBatch.{name} must be a 2-D int64 tensor, got "
                    f"{tuple(tensor.shape)} {tensor.dtype}"
                )
            if tensor.shape != self.input_ids.shape:
                raise DataError(
                    f"TokenizedBatch.{name} has shape {tuple(tensor.shape)} but input_ids has "
                    f"{tuple(self.input_ids.shape)}; all three must match"
                )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def lengths(self) -> torch.Tensor:
        """Number of real (non-padding) tokens of each row, shape ``(N,)``."""
        return self.attention_mask.sum(dim=1)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a checkpoint, or ``None`` when the checkpoint has none.

    Loaded with ``local_files_only=True``: no hub access, ever. Callers fall back to
    :func:`random_token_ids` on ``None``.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(
            f"model directory {model_dir} does not exist; point the model path at a checkpoint "
            "folder (config.json, weights, tokenizer files)"
        )
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not present:
        log.info("no tokenizer files in %s; callers will use random token ids", model_dir)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
        raise ModelError(
            f"the tokenizer in {model_dir} (files {', '.join(present)}) cannot be loaded: "
            f"{type(exc).__name__}: {exc}; reinstall the checkpoint, or remove its tokenizer "
            "files to run with random token ids"
        ) from exc
    log.info("loaded tokenizer %s from %s", type(tokenizer).__name__, model_dir)
    return tokenizer


def tokenize(
    texts: Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncate: bool,
    model_max_positions: int,
) -> TokenizedBatch:
    """Tokenize ``texts`` (with the tokenizer's special tokens) and right-pad to ``max_length``.

    ``model_max_positions`` is the number of positions the model can embed; any offset (RoBERTa
    reserves ``padding_idx + 1`` positions) is the caller's to subtract before passing it.
    With ``truncate`` false, a text longer than ``max_length`` tokens raises :class:`DataError`.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(
            f"max_length = {max_length!r} must be an integer >= 2 (room for the special tokens)"
        )
    if max_length > model_max_positions:
        raise ConfigError(
            f"max_length = {max_length} exceeds the model's limit of {model_max_positions} "
            f"positions; set max_length <= {model_max_positions}"
        )
    texts = list(texts)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"text at row {row} is a {type(text).__name__}, not a string")

    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # decoder-only tokenizers; padded positions are masked out anyway
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    ids: list[list[int]] = []
    if texts:  # the fast tokenizers fail on an empty batch
        if truncate:
            encoded = tokenizer(
                texts, add_special_tokens=True, truncation=True, max_length=max_length
            )
        else:
            encoded = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        ids = encoded["input_ids"]

    too_long = [row for row, seq in enumerate(ids) if len(seq) > max_length]
    if too_long:
        row = too_long[0]
        longest = max(len(ids[r]) for r in too_long)
        if longest <= model_max_positions:
            fix = (
                f"raise max_length to {longest} (the model allows up to {model_max_positions}) "
                "or set data.truncate = 'end'"
            )
        else:
            fix = (
                f"the longest exceeds the model limit of {model_max_positions} positions, so set "
                "data.truncate = 'end' (or shorten those texts)"
            )
        raise DataError(
            f"text at row {row} has {len(ids[row])} tokens, more than max_length = {max_length} "
            f"({len(too_long)} of {len(texts)} texts are too long, the longest has {longest}); "
            f"{fix}"
        )

    n = len(ids)
    input_ids = torch.full((n, max_length), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)  # (N, T)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    if truncate and n:
        cut = sum(1 for seq in ids if len(seq) == max_length)
        log.debug("tokenize: %d of %d texts reach max_length = %d", cut, n, max_length)
    return TokenizedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=torch.zeros((n, max_length), dtype=torch.long),
    )


def random_token_ids(
    *,
    n: int,
    length: int,
    vocab_size: int,
    seed: int,
    special: Mapping[str, int] | None = None,
) -> TokenizedBatch:
    """``n`` sequences of ``length`` random token ids, all positions valid (no padding).

    For checkpoints without a tokenizer: the shapes, and so the MPC cost, match real text.
    ``special`` maps special-token names to ids: ``cls``/``bos`` is put at the first position,
    ``sep``/``eos`` at the last, and every listed id (e.g. ``pad``, ``mask``) is excluded from
    the random positions. Deterministic for a seed.
    """
    for field, value, minimum in (
        ("n", n, 0),
        ("length", length, 1),
        ("vocab_size", vocab_size, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{field} = {value!r} must be an integer >= {minimum}")
    special = dict(special or {})
    for name, token in special.items():
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ConfigError(
                f"special[{name!r}] = {token!r} is not a token id in 0..{vocab_size - 1} "
                "(vocab_size); fix the special token ids"
            )
    first = _pick_one(special, _FIRST_KEYS)
    last = _pick_one(special, _LAST_KEYS)
    fixed = (first is not None) + (last is not None)
    if length <= fixed:
        raise ConfigError(
            f"length = {length} leaves no room for random tokens next to the {fixed} special "
            f"tokens; set length >= {fixed + 1}"
        )
    allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), list(special.values()))
    if allowed.size == 0:
        raise ConfigError(
            f"vocab_size = {vocab_size} leaves no ordinary token once the special ids "
            f"{sorted(special.values())} are excluded; fix vocab_size or special"
        )
    rng = np.random.default_rng(seed)
    body = rng.choice(allowed, size=(n, length - fixed))  # (N, T - fixed)
    columns = []
    if first is not None:
        columns.append(np.full((n, 1), first, dtype=np.int64))
    columns.append(body)
    if last is not None:
        columns.append(np.full((n, 1), last, dtype=np.int64))
    input_ids = torch.from_numpy(np.concatenate(columns, axis=1).astype(np.int64))  # (N, T)
    return TokenizedBatch(
        input_ids=input_ids,
        attention_mask=torch.ones((n, length), dtype=torch.long),
        token_type_ids=torch.zeros((n, length), dtype=torch.long),
    )


def _pick_one(special: Mapping[str, int], keys: Sequence[str]) -> int | None:
    given = [k for k in keys if k in special]
    if len(given) > 1:
        raise ConfigError(
            f"special names both {given[0]!r} and {given[1]!r}; give only one of {list(keys)}"
        )
    return special[given[0]] if given else None
