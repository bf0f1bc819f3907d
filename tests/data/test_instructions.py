"""Instruction pairs: the packaged ChatterBot corpus, CSV and JSONL files, prompt-disjoint splits.

Every error path must raise the documented exception with a message that names the file, the row
or line and the config field, and says how to fix it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from secfwt.data import instructions
from secfwt.data.instructions import (
    InstructionPairs,
    load_instructions,
    overlapping_rows,
    prompt_key,
    require_disjoint,
    split_by_prompt,
)
from secfwt.errors import ConfigError, DataError


def write_jsonl(tmp_path: Path, rows: list, name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(tmp_path: Path, content: str, name: str = "pairs.csv") -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def pairs(prompts: list[str], responses: list[str] | None = None) -> InstructionPairs:
    responses = responses or [f"reply {i}" for i in range(len(prompts))]
    return InstructionPairs(
        prompts=tuple(prompts), responses=tuple(responses), systems=(None,) * len(prompts)
    )


# --- ChatterBot ----------------------------------------------------------------------------------


def test_chatterbot_is_every_consecutive_turn_pair_once(chatterbot: InstructionPairs) -> None:
    """Read the YAML files independently: the corpus is the set of consecutive turn pairs of the
    well-formed conversations, stripped, each pair once, in file order."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    expected: list[tuple[str, str]] = []
    raw = malformed = 0
    for file in sorted(folder.glob("*.yml")):
        for conv in yaml.safe_load(file.read_text(encoding="utf-8"))["conversations"]:
            if not isinstance(conv, list):
                malformed += 1
                continue
            for a, b in zip(conv, conv[1:], strict=False):
                raw += 1
                if (a.strip(), b.strip()) not in expected:
                    expected.append((a.strip(), b.strip()))
    got = list(zip(chatterbot.prompts, chatterbot.responses, strict=True))
    assert got == expected
    assert (raw, malformed, len(got)) == (2306, 1, 1176)  # chatterbot-corpus 1.3.3
    assert chatterbot.systems == (None,) * len(got)
    assert all(p and r and p == p.strip() and r == r.strip() for p, r in got)
    assert chatterbot.origins[0] == "chatterbot ai.yml, conversation 1, turn 1"


def test_chatterbot_takes_no_path_and_needs_the_package(monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"path = .*not used with source = 'chatterbot'"):
        load_instructions(source="chatterbot", path=str(tmp_path))
    monkeypatch.setattr(instructions.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"chatterbot-corpus==1\.3\.3.*make setup"):
        load_instructions(source="chatterbot")


def test_chatterbot_split_sizes_and_disjointness(chatterbot: InstructionPairs) -> None:
    train, held = split_by_prompt(chatterbot, eval_rows=100, seed=0)
    assert (len(train), len(held)) == (1076, 100)  # every pair whose prompt is not held out
    assert not {prompt_key(p) for p in train.prompts} & {prompt_key(p) for p in held.prompts}


# --- CSV and JSONL -------------------------------------------------------------------------------


def test_jsonl_with_named_columns_and_system(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        [
            {"q": "  What is 2+2? ", "a": "4.\n", "sys": "Be terse."},
            "",
            {"q": "Name a colour.", "a": "Blue.", "sys": None},
            {"q": "Hi", "a": "Hello!", "sys": "  "},
        ],
    )
    data = load_instructions(
        source="jsonl", path=path, prompt_column="q", response_column="a", system_column="sys"
    )
    assert data.prompts == ("What is 2+2?", "Name a colour.", "Hi")
    assert data.responses == ("4.", "Blue.", "Hello!")
    assert data.systems == ("Be terse.", None, None)  # null or blank: the template's default
    assert data.origins == tuple(f"data file {path}, line {n}" for n in (1, 3, 4))


def test_csv_with_default_columns_keeps_text_as_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'prompt,response,extra\nSay NA,NA,x\n"a, b",null,y\n')
    data = load_instructions(source="csv", path=path)
    assert data.prompts == ("Say NA", "a, b") and data.responses == ("NA", "null")
    assert data.systems == (None, None)
    assert data.origins[1] == f"data file {path}, row 2"


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_missing_column_names_the_field_and_the_fix(tmp_path: Path, source: str) -> None:
    if source == "csv":
        path = write_csv(tmp_path, "question,response\nHi,Hello\n")
        pattern = r"no column 'prompt' \(prompt_column\).*'question'.*set prompt_column"
    else:
        path = write_jsonl(tmp_path, [{"prompt": "Hi", "response": "Hello"}, {"prompt": "x"}])
        pattern = r"line 2: no field 'response' \(response_column\).*set response_column"
    with pytest.raises(DataError, match=pattern):
        load_instructions(source=source, path=path)


def test_missing_system_column_is_an_error_when_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "prompt,response\nHi,Hello\n")
    with pytest.raises(DataError, match=r"no column 'system' \(system_column\)"):
        load_instructions(source="csv", path=path, system_column="system")


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (
            [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Hi", "response": "  "}],
            r"line 2: 'response' \(response_column\) is empty; fill it in or remove the row",
        ),
        ([{"prompt": "Hi", "response": None}], r"line 1: 'response' \(response_column\) is empty"),
        ([{"prompt": "", "response": "x"}], r"line 1: 'prompt' \(prompt_column\) is empty"),
        ([{"prompt": 42, "response": "x"}], r"line 1: 'prompt' \(prompt_column\) is a int"),
        (['{"prompt": "Hi", "response": '], r"line 1: malformed JSON"),
        ([["Hi", "Hello"]], r"line 1: expected a JSON object"),
    ],
)
def test_bad_jsonl_rows(tmp_path: Path, rows: list, pattern: str) -> None:
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=pattern) as info:
        load_instructions(source="jsonl", path=path)
    assert str(path) in str(info.value)


def test_csv_empty_response_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "prompt,response\nHi,Hello\nBye,\n")
    with pytest.raises(
        DataError, match=r"pairs.csv, row 2: 'response' \(response_column\) is empty"
    ):
        load_instructions(source="csv", path=path)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.csv", b"", "is empty"),
        ("header.csv", b"prompt,response\n", "has no rows"),
        ("blank.jsonl", b"\n\n", "has no rows"),
        ("latin1.csv", "prompt,response\ncaf\u00e9,ok\n".encode("latin-1"), "not UTF-8"),
        ("latin1.jsonl", '{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1"), "UTF-8"),
        ("ragged.csv", b'prompt,response\n"unclosed,x\n', "not valid CSV"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_instructions(source=path.suffix.lstrip("."), path=path)
    assert name in str(info.value)


def test_missing_file_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist; set path"):
        load_instructions(source="jsonl", path=tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="source = 'csv' needs path"):
        load_instructions(source="csv")
    with pytest.raises(ConfigError, match=r"'rotten_tomatoes' is not an instruction data source"):
        load_instructions(source="rotten_tomatoes")
    path = write_csv(tmp_path, "prompt,response\nHi,Hello\n")
    with pytest.raises(ConfigError, match="prompt_column and response_column are both 'prompt'"):
        load_instructions(source="csv", path=path, response_column="prompt")
    with pytest.raises(ConfigError, match="prompt_column = '' must be a non-empty column name"):
        load_instructions(source="csv", path=path, prompt_column="")


def test_pairs_refuse_mismatched_or_empty_rows() -> None:
    with pytest.raises(DataError, match="every prompt needs one response"):
        InstructionPairs(prompts=("a", "b"), responses=("x",), systems=(None, None))
    with pytest.raises(DataError, match="pair 1 has an empty response"):
        InstructionPairs(prompts=("a", "b"), responses=("x", " "), systems=(None, None))


# --- split and disjointness ----------------------------------------------------------------------


def test_split_is_exact_deterministic_shuffled_and_prompt_disjoint() -> None:
    # 40 prompts, each asked 1 to 4 times (case and spacing vary), 100 pairs in all
    prompts = [
        f"{'  Q' if j % 2 else 'q'}uestion  {i}" for i in range(40) for j in range(i % 4 + 1)
    ]
    data = pairs(prompts)
    train, held = split_by_prompt(data, eval_rows=20, seed=5)
    assert len(held) == 20
    held_keys = {prompt_key(p) for p in held.prompts}
    assert not held_keys & {prompt_key(p) for p in train.prompts}
    rows = list(train.responses + held.responses)  # responses are unique: they identify rows
    assert len(set(rows)) == len(rows) and set(rows) <= set(data.responses)
    left_out = set(data.responses) - set(rows)  # only extra pairs of the last held-out prompt
    assert len(left_out) < 4 and len(train) == 100 - 20 - len(left_out)
    assert all(prompt_key(data.prompts[int(r.split()[1])]) in held_keys for r in left_out)
    again = split_by_prompt(data, eval_rows=20, seed=5)
    assert again == (train, held)
    other = split_by_prompt(data, eval_rows=20, seed=6)
    assert other[1].prompts != held.prompts
    assert list(train.responses) != sorted(train.responses, key=lambda r: int(r.split()[1]))


def test_split_caps_and_refuses_impossible_sizes() -> None:
    data = pairs([f"p{i}" for i in range(10)])
    train, held = split_by_prompt(data, eval_rows=3, train_rows=4, seed=0)
    assert (len(train), len(held)) == (4, 3)
    with pytest.raises(DataError, match=r"eval_rows = 11 .* only 10 pairs; lower eval_rows"):
        split_by_prompt(data, eval_rows=11, seed=0)
    with pytest.raises(DataError, match=r"train_rows = 8 .* only 7 pairs"):
        split_by_prompt(data, eval_rows=3, train_rows=8, seed=0)
    with pytest.raises(DataError, match="no training pairs are left"):
        split_by_prompt(data, eval_rows=10, seed=0)
    with pytest.raises(ConfigError, match="train_rows = 0 must be an integer >= 1"):
        split_by_prompt(data, eval_rows=3, train_rows=0, seed=0)
    with pytest.raises(ConfigError, match="seed = -1"):
        split_by_prompt(data, eval_rows=3, seed=-1)


def test_disjointness_check_names_rows_not_text() -> None:
    training = ["What is AI?", "Tell me a joke"]
    assert overlapping_rows(
        ["what  is ai?", "Who are you?", "TELL me a joke "], training_prompts=training
    ) == (0, 2)
    require_disjoint(["Who are you?"], training_prompts=training, what="safety set")
    with pytest.raises(
        DataError, match=r"safety set: 1 of 2 prompts are also training prompts \(rows 1,"
    ) as info:
        require_disjoint(
            ["Who are you?", "WHAT IS AI?"], training_prompts=training, what="safety set"
        )
    assert "AI" not in str(info.value)  # private prompts never appear in errors


def test_split_raises_when_its_groups_would_straddle(monkeypatch) -> None:
    """The split checks its own result: group rows one by one (ignoring the prompt) and the
    repeated prompts land on both sides, which must be refused."""
    data = pairs(["same prompt"] * 6 + [f"p{i}" for i in range(6)])
    monkeypatch.setattr(instructions, "_group_rows", lambda keys: [[i] for i in range(len(keys))])
    with pytest.raises(DataError, match="held-out split: .* also training prompts"):
        split_by_prompt(data, eval_rows=6, seed=1)
