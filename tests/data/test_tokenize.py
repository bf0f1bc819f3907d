"""Tokenization to fixed-shape batches with the packaged MiniLM (BERT WordPiece) tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secfwt.data.tokenize import TokenizedBatch, load_tokenizer, random_token_ids, tokenize
from secfwt.errors import ConfigError, DataError, ModelError

CLS, SEP, PAD = 101, 102, 0  # bert-base-uncased vocabulary, as in the packaged MiniLM

TEXTS = ["A slick, engrossing melodrama.", "Bad.", "An utterly forgettable sequel " * 8]


def run(tokenizer, texts, *, max_length: int, truncate: bool = False) -> TokenizedBatch:
    return tokenize(
        texts,
        tokenizer=tokenizer,
        max_length=max_length,
        truncate=truncate,
        model_max_positions=512,
    )


# --- load_tokenizer ---------------------------------------------------------------------------


def test_load_packaged_tokenizer(minilm_tokenizer) -> None:
    assert minilm_tokenizer.cls_token_id == CLS and minilm_tokenizer.pad_token_id == PAD


def test_directory_without_tokenizer_files_gives_none(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


def test_missing_directory_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope"):
        load_tokenizer(tmp_path / "nope")


def test_broken_tokenizer_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    with pytest.raises(ModelError, match=r"tokenizer.*cannot be loaded") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


# --- tokenize --------------------------------------------------------------------------------


def test_pads_to_exactly_max_length(minilm_tokenizer) -> None:
    batch = run(minilm_tokenizer, TEXTS, max_length=64)
    reference = minilm_tokenizer(TEXTS, add_special_tokens=True)["input_ids"]
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.token_type_ids.shape
    assert batch.input_ids.shape == (3, 64) and batch.seq_len == 64 and len(batch) == 3
    assert batch.input_ids.dtype == torch.long
    assert batch.lengths().tolist() == [len(r) for r in reference]
    for row, ref in enumerate(reference):
        n = len(ref)
        assert batch.input_ids[row, :n].tolist() == ref  # starts with CLS, ends with SEP
        assert batch.input_ids[row, 0] == CLS and batch.input_ids[row, n - 1] == SEP
        assert (batch.input_ids[row, n:] == PAD).all()
        assert batch.attention_mask[row, :n].eq(1).all()
        assert batch.attention_mask[row, n:].eq(0).all()
    assert not batch.token_type_ids.any()


def test_text_of_exactly_max_length_fits(minilm_tokenizer) -> None:
    n = len(minilm_tokenizer(TEXTS[0])["input_ids"])
    batch = run(minilm_tokenizer, TEXTS[:1], max_length=n)
    assert batch.attention_mask.all() and batch.input_ids[0, -1] == SEP


def test_truncates_exactly(minilm_tokenizer) -> None:
    full = minilm_tokenizer(TEXTS[2])["input_ids"]
    batch = run(minilm_tokenizer, TEXTS, max_length=16, truncate=True)
    assert batch.input_ids.shape == (3, 16)
    assert batch.input_ids[2].tolist() == [*full[:15], SEP]  # content cut, special tokens kept
    assert batch.attention_mask[2].all()
    assert batch.lengths()[1] == 4  # [CLS] bad . [SEP] is untouched


def test_too_long_without_truncation_names_row_count_and_fix(minilm_tokenizer) -> None:
    n = len(minilm_tokenizer(TEXTS[2])["input_ids"])
    with pytest.raises(DataError) as info:
        run(minilm_tokenizer, TEXTS, max_length=16)
    message = str(info.value)
    for expected in (
        "row 2",
        f"{n} tokens",
        "max_length = 16",
        f"max_length to {n}",
        "data.truncate = 'end'",
    ):
        assert expected in message


def test_max_length_beyond_model_limit_is_a_config_error(minilm_tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"max_length = 600.*512"):
        run(minilm_tokenizer, TEXTS, max_length=600)
    with pytest.raises(ConfigError, match=r"max_length = 1"):
        run(minilm_tokenizer, TEXTS, max_length=1)


def test_non_string_text_is_a_data_error(minilm_tokenizer) -> None:
    with pytest.raises(DataError, match="row 1"):
        run(minilm_tokenizer, ["fine", None], max_length=8)


def test_empty_input_gives_empty_batch(minilm_tokenizer) -> None:
    batch = run(minilm_tokenizer, [], max_length=8)
    assert batch.input_ids.shape == (0, 8)


def test_rotten_tomatoes_fits_in_96_tokens(minilm_tokenizer, rotten_tomatoes) -> None:
    # The longest review is 78 MiniLM tokens including [CLS]/[SEP]; measured, see the report.
    texts = rotten_tomatoes.texts[:2000]
    batch = run(minilm_tokenizer, texts, max_length=96)
    assert batch.input_ids.shape == (2000, 96)


# --- random_token_ids -------------------------------------------------------------------------


def test_random_token_ids_shape_specials_and_determinism() -> None:
    special = {"cls": CLS, "sep": SEP, "pad": PAD, "mask": 103}
    batch = random_token_ids(n=4, length=12, vocab_size=200, seed=5, special=special)
    assert batch.input_ids.shape == (4, 12) and batch.attention_mask.all()
    assert not batch.token_type_ids.any()
    assert batch.input_ids[:, 0].eq(CLS).all() and batch.input_ids[:, -1].eq(SEP).all()
    body = batch.input_ids[:, 1:-1]
    assert ((body >= 0) & (body < 200)).all()
    assert not torch.isin(body, torch.tensor(list(special.values()))).any()
    again = random_token_ids(n=4, length=12, vocab_size=200, seed=5, special=special)
    other = random_token_ids(n=4, length=12, vocab_size=200, seed=6, special=special)
    assert torch.equal(batch.input_ids, again.input_ids)
    assert not torch.equal(batch.input_ids, other.input_ids)
    plain = random_token_ids(n=2, length=3, vocab_size=5, seed=0, special=None)
    assert plain.input_ids.shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": -1}, "n = -1"),
        ({"length": 0}, "length"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"special": {"cls": 500}}, r"special\['cls'\]"),
        ({"special": {"cls": 1, "bos": 2}}, "'cls'.*'bos'"),
        ({"length": 2, "special": {"cls": 1, "sep": 2}}, "length = 2"),
        ({"vocab_size": 2, "special": {"cls": 0, "sep": 1}}, "vocab_size = 2"),
    ],
)
def test_random_token_ids_bad_settings(kwargs: dict, field: str) -> None:
    settings = {"n": 2, "length": 8, "vocab_size": 100, "seed": 0, "special": None} | kwargs
    with pytest.raises(ConfigError, match=field):
        random_token_ids(**settings)


def test_tokenized_batch_rejects_mismatched_shapes() -> None:
    ids = torch.zeros((2, 4), dtype=torch.long)
    with pytest.raises(DataError, match="attention_mask"):
        TokenizedBatch(
            input_ids=ids, attention_mask=torch.zeros((2, 5), dtype=torch.long), token_type_ids=ids
        )
    with pytest.raises(DataError, match="input_ids"):
        TokenizedBatch(input_ids=ids.float(), attention_mask=ids, token_type_ids=ids)
