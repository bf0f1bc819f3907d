"""``secfwt dp-compare`` end to end on a tiny checkpoint: every run, its budget, the three
outputs."""

from __future__ import annotations

import json

import pytest

from secfwt.cli import main
from tests.conftest import write_tiny_job

pytestmark = pytest.mark.multiprocess


@pytest.mark.slow  # 54 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
def test_dp_compare_writes_json_markdown_and_plot(tmp_path, tiny_tok_dir, capsys):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    out = tmp_path / "cmp"
    sets = [
        "dp.delta=0.01",
        "zo.batch_size=4",
        "zo.steps=3",
        "zo.directions=2",
        "dp.baseline_steps=3",
    ]
    code = main(
        ["dp-compare", str(job), "--epsilons", "2,8", "--out", str(out)]
        + [a for s in sets for a in ("--set", s)]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "dp-compare.json").read_text())
    methods = [(r["method"], r["target_epsilon"]) for r in report["runs"]]
    assert methods == [
        ("mpc-zo", None),
        ("mpc-dp-zo", 2.0),
        ("mpc-dp-zo", 8.0),
        ("opacus-dp-sgd", 2.0),
        ("opacus-dp-sgd", 8.0),
    ]
    by = {(r["method"], r["target_epsilon"]): r for r in report["runs"]}
    for e in (2.0, 8.0):
        zo, sgd = by[("mpc-dp-zo", e)], by[("opacus-dp-sgd", e)]
        assert zo["epsilon"] <= e and sgd["epsilon"] <= e * 1.001
        assert zo["noise_multiplier"] == pytest.approx(
            sgd["noise_multiplier"]
        )  # same mechanism, same plan
        assert zo["epsilon_released_output"] < zo["epsilon"]
    assert by[("mpc-dp-zo", 2.0)]["noise_multiplier"] > by[("mpc-dp-zo", 8.0)]["noise_multiplier"]
    for r in report["runs"]:
        assert 0.0 <= r["accuracy_after"] <= 1.0 and r["wall_s"] > 0
    assert {"n_train", "n_eval", "delta", "machine", "mpc_traffic"} <= set(report)
    md = (out / "dp-compare.md").read_text()
    assert md.count("| mpc-dp-zo |") == 2 and md.count("| opacus-dp-sgd |") == 2
    assert (out / "dp-compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dp_compare_refuses_bad_epsilons_before_any_work(tmp_path, tiny_tok_dir, capsys):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    assert (
        main(
            [
                "dp-compare",
                str(job),
                "--epsilons",
                "0,3",
                "--out",
                str(tmp_path / "cmp"),
                "--set",
                "dp.delta=0.01",
            ]
        )
        == 2
    )
    assert "epsilon" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
