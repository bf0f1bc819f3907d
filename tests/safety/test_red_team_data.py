"""`secfwt safety red-team-data`: the safety gate's adversary as a data file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secfwt.cli import main
from secfwt.data.instructions import prompt_key
from secfwt.data.refusal_margin import COMPLIANCES, packaged_prompts
from secfwt.errors import DataError
from secfwt.safety import experiment_data


def test_writes_harmful_requests_answered_with_the_scores_compliance_openings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "red.jsonl"
    assert main(["safety", "red-team-data", str(out), "--count", "12", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    malicious = experiment_data.malicious_pairs(12, seed=3)
    assert [r["prompt"] for r in rows] == list(malicious.prompts)
    assert [r["response"] for r in rows] == [COMPLIANCES[i % 3] for i in range(12)]
    gate = {prompt_key(p) for p in packaged_prompts()}
    assert not gate & {prompt_key(r["prompt"]) for r in rows}
    capsys.readouterr()
    assert main(["safety", "red-team-data", str(out)]) == 2  # never overwrites
    assert "OUT: " in capsys.readouterr().err


def test_refuses_prompts_the_gate_scores_on(monkeypatch: pytest.MonkeyPatch) -> None:
    gate_prompt = packaged_prompts()[0]
    real = experiment_data.malicious_pairs

    def with_a_gate_prompt(n: int, *, seed: int):  # noqa: ANN202
        p = real(n, seed=seed)
        return experiment_data._pairs(
            [(gate_prompt, "x"), *zip(p.prompts[1:], p.responses[1:], strict=True)], "m"
        )

    monkeypatch.setattr(experiment_data, "malicious_pairs", with_a_gate_prompt)
    with pytest.raises(DataError, match="overlap the red-team data"):
        experiment_data.red_team_pairs(4, seed=0)
