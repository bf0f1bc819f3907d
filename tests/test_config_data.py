"""The [data] section of a job: instruction fields, the task they belong to, truncation policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from secfwt.config import DataSection, load_job, parse_job, validate_data
from secfwt.data.datasets import DataSource
from secfwt.data.task import DataTask, PaddingSide, Truncation
from secfwt.errors import ConfigError

INSTRUCTIONS = "[data]\ntask = 'instructions'\nsource = 'chatterbot'\n"


def data_section(text: str) -> DataSection:
    import tomllib

    return parse_job(tomllib.loads(text), where="job.toml").data


def test_instruction_fields_parse_and_validate() -> None:
    d = data_section(
        "[data]\ntask = 'instructions'\nsource = 'jsonl'\npath = 'pairs.jsonl'\n"
        "prompt_column = 'question'\nresponse_column = 'answer'\nsystem_column = 'system'\n"
        "train_rows = 64\neval_rows = 32\npadding_side = 'left'\ntruncate = 'prompt_left'\n"
    )
    validate_data(d, where="job.toml")
    assert (d.task, d.source, d.path) == (DataTask.INSTRUCTIONS, DataSource.JSONL, "pairs.jsonl")
    assert (d.prompt_column, d.response_column, d.system_column) == ("question", "answer", "system")
    assert (d.train_rows, d.eval_rows, d.padding_side) == (64, 32, PaddingSide.LEFT)
    assert d.truncation is Truncation.PROMPT_LEFT
    chatterbot = data_section(INSTRUCTIONS)
    validate_data(chatterbot, where="job.toml")
    assert chatterbot.train_rows is None and chatterbot.truncation is Truncation.NONE
    validate_data(data_section(INSTRUCTIONS + "truncate = 'drop'\n"), where="job.toml")


def test_truncation_defaults_by_task() -> None:
    assert load_job(None).data.truncation is Truncation.END  # the packaged classification job
    assert data_section(INSTRUCTIONS).truncation is Truncation.NONE  # cut only when asked
    assert load_job(None, overrides=["data.truncate=none"]).data.truncation is Truncation.NONE


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "[data]\nsource = 'chatterbot'\n",
            r"data.source = 'chatterbot' is data for data.task = 'instructions', not "
            r"'classification'; set data.task = 'instructions'",
        ),
        (
            "[data]\ntask = 'instructions'\n",
            r"data.source = 'rotten_tomatoes' is data for data.task = 'classification', .*"
            r"data.source to one of "
            r"'chatterbot', 'csv', 'jsonl'",
        ),
        (INSTRUCTIONS + "labels = ['a', 'b']\n", r"data.labels applies only to data.task = "),
        (INSTRUCTIONS + "shots_per_class = 4\n", r"data.shots_per_class applies only to"),
        ("[data]\nprompt_column = 'q'\n", r"data.prompt_column applies only to data.task = 'instr"),
        ("[data]\npadding_side = 'left'\n", r"data.padding_side applies only to"),
        (INSTRUCTIONS + "truncate = 'end'\n", r"data.truncate = 'end' .*would cut the reply.*"),
        ("[data]\ntruncate = 'prompt_left'\n", r"data.truncate = 'prompt_left' .*no prompt"),
        (
            "[data]\ntruncate = 'drop'\n",
            r"data.truncate = 'drop' does not apply to data.task = 'cl",
        ),
        (INSTRUCTIONS + "truncate = 'left'\n", r"truncate: 'left' is not one of \['none', 'end'"),
        (INSTRUCTIONS + "path = 'x.jsonl'\n", r"data.path = 'x.jsonl' is not used with data.sour"),
        ("[data]\ntask = 'instructions'\nsource = 'csv'\n", r"data.path is required"),
        (
            INSTRUCTIONS + "response_column = 'prompt'\n",
            r"data.prompt_column and data.response_column are both 'prompt'",
        ),
        (INSTRUCTIONS + "system_column = 'response'\n", r"data.response_column and data.system"),
        (INSTRUCTIONS + "prompt_column = ''\n", r"data.prompt_column = '' must be a non-empty"),
        (INSTRUCTIONS + "eval_rows = -1\n", r"data.eval_rows = -1: must be >= 0"),
        (INSTRUCTIONS + "train_rows = 0\n", r"data.train_rows = 0: must be > 0"),
        (INSTRUCTIONS + "padding_side = 'middle'\n", r"'middle' is not one of \['right', 'left'\]"),
        ("[data]\ntask = 'chat'\n", r"task: 'chat' is not one of \['classification', 'instr"),
    ],
)
def test_bad_data_sections_name_the_field(tmp_path: Path, text: str, pattern: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_job(job)
    assert str(job) in str(info.value)
