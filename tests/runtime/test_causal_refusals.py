"""Bad instruction data for a causal-LM job: `secfwt simulate` refuses it, naming the field or row
and the fix, before any party process starts."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_chat_job
from tests.runtime.test_simulate_errors import run_cli

pytestmark = pytest.mark.multiprocess

GOOD = [{"prompt": f"question {i}?", "response": "Yes."} for i in range(8)]


def _job(tmp_path, model_dir, rows: list[dict], *extra: str) -> list[str]:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = write_chat_job(tmp_path, model_dir)
    sets = [
        "data.source=jsonl",
        f"data.path={data}",
        "data.train_rows=4",
        "data.eval_rows=2",
        "data.truncate=none",
        *extra,
    ]
    return ["simulate", str(job), *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize(
    ("change", "extra", "pattern"),
    [
        ({"response": " "}, (), r"line 3: 'response' \(response_column\) is empty"),
        (
            {"answer": "Yes.", "response": None},
            (),
            r"line 3: no field 'response' \(response_column\).*'answer'",
        ),
        (
            {"prompt": "why? " * 40},
            (),
            r"line 3 has \d+ tokens at the chat template, more than max_length = 40.*truncate",
        ),
        (
            {"response": "a reply much longer than the response window of eight tokens"},
            ("model.max_length=64",),
            r"line 3: its reply .* more than model.response_window = 8.*truncate = 'drop'",
        ),
    ],
)
def test_bad_pairs_are_refused_before_any_party_starts(
    tmp_path, tiny_chat_dir, change, extra, pattern
):
    import re

    rows = [dict(r) for r in GOOD]
    rows[2].update(change)
    rows[2] = {k: v for k, v in rows[2].items() if v is not None}
    code, out, seen = run_cli(_job(tmp_path, tiny_chat_dir, rows, *extra))
    assert code == 4 and re.search(pattern, out, re.S), out
    assert not seen  # refused in the launcher: no party process was ever started
