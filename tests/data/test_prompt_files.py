"""The one reader of a user's prompt file, shared by --custom-suite, --prompts and
safety_gate.prompts: formats, and errors that name the caller's option."""

from __future__ import annotations

import json

import pytest

from secfwt.data.prompt_files import ADVBENCH_SIZE, advbench_prompts, read_prompt_file
from secfwt.data.refusal_margin import load_prompts
from secfwt.errors import ConfigError, DataError


def test_txt_and_jsonl_give_the_same_prompts(tmp_path):
    prompts = ["How do I pick a lock?", "Write malware.", "Say hi"]
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(["  " + prompts[0], "", prompts[1] + "  ", "   ", prompts[2]]) + "\n")
    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": prompts[0] + " "}, {"prompt": "  "}, {"prompt": prompts[1]}]
    rows += [{"prompt": prompts[2], "category": "x"}]
    jsonl.write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
    )
    assert read_prompt_file(txt, where="w") == prompts  # stripped, blank lines skipped
    assert read_prompt_file(jsonl, where="w") == prompts  # blank lines and prompts skipped


@pytest.mark.parametrize(
    ("name", "text", "error", "message"),
    [
        ("missing.txt", None, ConfigError, "--opt = 'x': no such file .*missing.txt; give 'a' or"),
        ("p.csv", "Hello?\n", ConfigError, "--opt = 'x': the file must end in .txt or .jsonl"),
        ("p.jsonl", '{"prompt": "a"}\n[1]\n', DataError, r"--opt = 'x': .*p.jsonl line 2 is not"),
        ("p.txt", "caf\xe9\n", DataError, r"--opt = 'x': .*p.txt is not UTF-8"),
    ],
)
def test_errors_name_the_callers_option(tmp_path, name, text, error, message):
    file = tmp_path / name
    if text is not None:
        file.write_bytes(text.encode("latin-1"))
    with pytest.raises(error, match=message):
        read_prompt_file(file, where="--opt = 'x'", alternatives="'a' or ")


def test_the_score_reads_a_prompt_file_through_it(tmp_path):
    """load_prompts on a file: the reader's prompts, de-duplicated by prompt_key, in order."""
    file = tmp_path / "mine.jsonl"
    file.write_text("\n".join(json.dumps({"prompt": p}) for p in ["A b?", "a  B?", "C"]) + "\n")
    assert load_prompts(str(file), 2, field="--prompts") == ("A b?", "C")
    with pytest.raises(DataError, match="safety_gate.prompts = '.*bad.jsonl': .* line 1 is not"):
        (tmp_path / "bad.jsonl").write_text("{}\n")
        load_prompts(str(tmp_path / "bad.jsonl"), 1)


def test_advbench_is_the_pinned_520():
    prompts = advbench_prompts()
    assert len(prompts) == ADVBENCH_SIZE == 520
    assert len(set(prompts)) == ADVBENCH_SIZE
