"""A DP-ZO job end to end in MPC, and its refusals before any party starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secfwt.cli import main
from secfwt.config import load_job
from secfwt.errors import ConfigError
from secfwt.runtime.simulate import run_simulation
from secfwt.tuning.accounting import epsilon, plan
from tests.conftest import write_tiny_job

DP = [
    "dp.enabled=true",
    "dp.target_epsilon=4.0",
    "dp.delta=0.01",
    "zo.batch_size=4",
    "zo.directions=3",
    "zo.steps=4",
    "zo.lr=0.5",
]


@pytest.mark.multiprocess
def test_dp_zo_job_reports_its_guarantee_and_reveals_nothing_else(tmp_path, tiny_tok_dir):
    cfg = load_job(write_tiny_job(tmp_path, tiny_tok_dir), overrides=DP)
    report = run_simulation(cfg)
    dp = report["dp"]
    expected = plan(cfg.dp, n_train=8, batch_size=4, steps=4)
    assert dp["sample_rate"] == 0.5 and dp["steps"] == 4 and dp["n_train"] == 8
    assert dp["noise_multiplier_per_party"] == pytest.approx(expected.noise_multiplier)
    assert (
        dp["epsilon_against_each_party"] == pytest.approx(expected.epsilon)
        and expected.epsilon <= 4.0
    )
    assert dp["epsilon_released_output"] == pytest.approx(
        epsilon(
            noise_multiplier=expected.noise_multiplier * 2**0.5,
            sample_rate=0.5,
            steps=4,
            delta=0.01,
        )
    )
    assert report["steps"] == 4 and all(
        h is not None for h in report["loss_history"]
    )  # train_loss -> data owner only
    final = report["parties"]["data_owner"]["artifacts"]["final_parameters"]
    assert Path(final).is_file()
    out = Path(report["output_dir"])
    mo_audit = [
        json.loads(line) for line in (out / "model_owner" / "audit.jsonl").read_text().splitlines()
    ]
    received = [r for r in mo_audit if "model_owner" in r["to"]]
    # two counts on held-out rows; about training rows only the range checks' bits (one per
    # row and secure forward, listed among the releases the DP guarantee does not cover)
    assert [r["value"] for r in received if r["value"] != "range_check"] == [
        "eval_accuracy",
        "eval_accuracy",
    ]
    checks = [
        r["shape"]
        for r in received
        if r["value"] == "range_check" and r["note"].endswith("attempt 1")
    ]
    # the prefix's 18 rows, the 10 held-out rows before and after, all 8 training rows a step
    assert checks == [[18], [10], *[[8]] * 4, [10]]
    assert any("range_check" in s for s in dp["not_covered_releases"])


@pytest.mark.parametrize(
    "override,field",
    [
        (["dp.delta=0.2"], "dp.delta"),
        (["dp.target_epsilon=0"], "dp.target_epsilon"),
        (["dp.sample_rate=1.5"], "dp.sample_rate"),
        (["dp.target_epsilon=0.5", "dp.noise_multiplier=0.3"], "over the budget"),
        (["zo.batch_size=20"], "zo.batch_size"),
        (["dp.target_epsilon=-1"], "dp.target_epsilon"),
    ],
)
def test_impossible_budget_is_refused_before_any_work(
    tmp_path, tiny_tok_dir, capsys, override, field
):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    args = ["simulate", str(job)] + [a for o in DP + override for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert not (tmp_path / "runs").exists()  # no run folder, no party process


def test_training_losses_to_the_model_owner_are_refused_under_dp(tmp_path, tiny_tok_dir):
    extra = '\n[[disclosure]]\nvalue = "train_loss"\nto = ["model_owner"]\n'
    with pytest.raises(ConfigError, match="train_loss to model_owner"):
        load_job(write_tiny_job(tmp_path, tiny_tok_dir, extra), overrides=DP)
