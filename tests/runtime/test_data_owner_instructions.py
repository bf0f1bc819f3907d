"""The data owner's instruction batches for a job: [data] fields -> load -> split -> tensors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from secfwt.config import JobConfig, parse_job, validate_data
from secfwt.data.instructions import prompt_key
from secfwt.errors import ConfigError, DataError
from secfwt.runtime.data_owner import prepare_instruction_batches

POSITIONS = 8192  # SmolLM2's max_position_embeddings


def job(data: str, *, seed: int = 3, max_length: int = 64) -> JobConfig:
    text = f"[job]\nseed = {seed}\n[model]\nmax_length = {max_length}\n[data]\n{data}"
    cfg = parse_job(tomllib.loads(text), where="job.toml")
    validate_data(cfg.data, where=cfg.source)
    return cfg


def prompts_of(batch, tokenizer) -> list[str]:
    """The user message of each row, read back from its tokens."""
    out = []
    for row in range(len(batch)):
        text = tokenizer.decode(batch.input_ids[row][batch.attention_mask[row].bool()].tolist())
        out.append(text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0])
    return out


CHATTERBOT = (
    "task = 'instructions'\nsource = 'chatterbot'\ntrain_rows = 32\neval_rows = 16\n"
    "truncate = 'drop'\npadding_side = 'left'\n"
)


def test_chatterbot_job_gives_disjoint_deterministic_batches(smollm2_tokenizer) -> None:
    train, held = prepare_instruction_batches(
        job(CHATTERBOT), tokenizer=smollm2_tokenizer, model_max_positions=POSITIONS
    )
    assert train.input_ids.shape == (32, 64) and held.input_ids.shape == (16, 64)
    eot = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (train.input_ids[:, -1] == eot).all() and train.attention_mask[:, -1].all()  # left
    train_prompts = {prompt_key(p) for p in prompts_of(train, smollm2_tokenizer)}
    assert not train_prompts & {prompt_key(p) for p in prompts_of(held, smollm2_tokenizer)}
    again, _ = prepare_instruction_batches(
        job(CHATTERBOT), tokenizer=smollm2_tokenizer, model_max_positions=POSITIONS
    )
    other, _ = prepare_instruction_batches(
        job(CHATTERBOT, seed=4), tokenizer=smollm2_tokenizer, model_max_positions=POSITIONS
    )
    assert torch.equal(again.input_ids, train.input_ids)
    assert not torch.equal(other.input_ids, train.input_ids)


def test_file_job_refuses_an_over_long_pair_unless_told_to_cut(
    tmp_path: Path, smollm2_tokenizer
) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}.", "sys": "Be brief."} for i in range(6)]
    rows[4]["q"] = "Explain this at length: " + "and then what happened next " * 10
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    data = (
        f"task = 'instructions'\nsource = 'jsonl'\npath = '{path}'\nprompt_column = 'q'\n"
        "response_column = 'a'\nsystem_column = 'sys'\neval_rows = 2\n"
    )
    with pytest.raises(DataError, match=rf"{path}, line 5 has \d+ tokens.*prompt_left"):
        prepare_instruction_batches(
            job(data), tokenizer=smollm2_tokenizer, model_max_positions=POSITIONS
        )
    train, held = prepare_instruction_batches(
        job(data + "truncate = 'prompt_left'\n"),
        tokenizer=smollm2_tokenizer,
        model_max_positions=POSITIONS,
    )
    assert (len(train), len(held)) == (4, 2)
    for batch in (train, held):
        for row in range(len(batch)):
            text = smollm2_tokenizer.decode(batch.input_ids[row][batch.attention_mask[row].bool()])
            assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_a_classification_job_is_refused() -> None:
    with pytest.raises(ConfigError, match="need data.task = 'instructions'"):
        prepare_instruction_batches(job(""), tokenizer=None, model_max_positions=POSITIONS)
