"""``secfwt dp-baseline`` end to end on a tiny checkpoint: report, exact epsilon, resume after a
crash, and refusal of impossible budgets before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secfwt.cli import main
from secfwt.config import AccountantName, load_job
from secfwt.dp.baseline import run_dp_baseline
from secfwt.dp.training_state import CHECKPOINT_NAME, checkpoint_path
from secfwt.tuning.accounting import epsilon as accounting_epsilon
from tests.conftest import write_tiny_job

REPORT_KEYS = {
    "epsilon",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "accuracy_before",
    "accuracy_after",
    "wall_s",
    "accountant",
    "max_grad_norm",
    "n_train",
    "n_eval",
    "trainable",
    "loss_history",
    "machine",
    "planned_epsilon",
}
#: Enough encoder parameters train that the full forward (not the cached head path) runs; the
#: position table is among them (per-example position_ids).
ENCODER_TRAINABLE = (
    'zo.trainable=["classifier.*", "bert.encoder.layer.1.output.*", '
    '"bert.embeddings.position_embeddings.weight"]'
)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_cli_writes_report_with_the_planned_epsilon(tmp_path, tiny_tok_dir, capsys, accountant):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    report = tmp_path / "report.json"
    rc = main(
        [
            "dp-baseline",
            str(job),
            "--report",
            str(report),
            "--set",
            "dp.target_epsilon=5",
            "--set",
            "dp.delta=1e-3",
            "--set",
            f"dp.accountant={accountant}",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert REPORT_KEYS <= set(r)
    assert (r["n_train"], r["n_eval"], r["steps"], r["sample_rate"], r["accountant"]) == (
        8,
        10,
        3,
        1.0,
        accountant,
    )
    expected = accounting_epsilon(
        noise_multiplier=r["noise_multiplier"],
        sample_rate=r["sample_rate"],
        steps=3,
        delta=1e-3,
        accountant=AccountantName(accountant),
    )
    assert r["epsilon"] == pytest.approx(expected, abs=1e-9)
    assert r["epsilon"] == pytest.approx(r["planned_epsilon"], abs=1e-9)
    assert 4.5 < r["epsilon"] <= 5.0
    assert 0.0 <= r["accuracy_before"] <= 1.0 and 0.0 <= r["accuracy_after"] <= 1.0
    assert r["trainable"] == {
        "names": ["classifier.weight", "classifier.bias"],
        "numel": 2 * 64 + 2,
    }
    assert len(r["loss_history"]) == 3 and all(v > 0 for v in r["loss_history"])
    assert r["completed"] and r["machine"]["python"]
    out = capsys.readouterr()
    assert "epsilon" in out.out and "held-out accuracy" in out.out


def test_empty_poisson_batches_still_count(tmp_path, tiny_tok_dir):
    """At a low sample rate most batches are empty; each step still adds noise and is accounted."""
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    cfg = load_job(
        job, overrides=["dp.sample_rate=0.05", "dp.noise_multiplier=1.0", "dp.baseline_steps=8"]
    )
    r = run_dp_baseline(cfg)
    assert 0 in r["batch_sizes"] and len(r["batch_sizes"]) == 8
    assert None in r["loss_history"]
    assert r["epsilon"] == pytest.approx(
        accounting_epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=8, delta=cfg.dp.delta),
        abs=1e-9,
    )


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def on_progress(msg):
        if msg.get("kind") == "step" and msg["step"] == step:
            raise _Crash(f"simulated crash after step {step}")

    return on_progress


def _final_parameters(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(directory), weights_only=True)["trainable"]


def test_resume_after_crash_reaches_same_epsilon_and_parameters(tmp_path, tiny_tok_dir):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    overrides = [
        ENCODER_TRAINABLE,
        "dp.sample_rate=0.5",
        "dp.noise_multiplier=1.5",
        "dp.baseline_steps=7",
        "dp.checkpoint_every=2",
    ]
    cfg = load_job(job, overrides=overrides)

    whole = run_dp_baseline(cfg, checkpoint_dir=tmp_path / "whole", noise_seed=11)
    assert not whole["head_only_cache"] and whole["steps"] == 7

    crashed = tmp_path / "crashed"
    with pytest.raises(_Crash):
        run_dp_baseline(
            cfg, checkpoint_dir=crashed, on_progress=_crash_at(5), noise_seed=11
        )  # last checkpoint: step 4
    assert torch.load(checkpoint_path(crashed), weights_only=True)["step"] == 4
    resumed = run_dp_baseline(cfg, checkpoint_dir=crashed, resume=True)

    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 7
    assert resumed["epsilon"] == pytest.approx(whole["epsilon"], abs=1e-9)
    assert resumed["epsilon"] == pytest.approx(whole["planned_epsilon"], abs=1e-9)
    assert (
        resumed["loss_history"] == whole["loss_history"]
        and resumed["batch_sizes"] == whole["batch_sizes"]
    )
    assert resumed["accuracy_after"] == whole["accuracy_after"]
    a, b = _final_parameters(tmp_path / "whole"), _final_parameters(crashed)
    assert a.keys() == b.keys() and len(a) == 7
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert sorted(p.name for p in crashed.iterdir()) == [CHECKPOINT_NAME]  # no temporary files left


def test_stop_at_step_then_resume_with_cli(tmp_path, tiny_tok_dir, capsys):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    ck, report = tmp_path / "ck", tmp_path / "r.json"
    common = [
        "dp-baseline",
        str(job),
        "--checkpoint-dir",
        str(ck),
        "--report",
        str(report),
        "--set",
        "dp.target_epsilon=5",
    ]
    assert main([*common, "--stop-at-step", "2"]) == 0
    first = json.loads(report.read_text())
    assert not first["completed"] and first["steps"] == 2 and first["accuracy_after"] is None
    assert main([*common, "--resume"]) == 0
    second = json.loads(report.read_text())
    assert second["completed"] and second["steps"] == 3 and second["resumed_from_step"] == 2
    assert second["epsilon"] == pytest.approx(second["planned_epsilon"], abs=1e-9)
    capsys.readouterr()


def test_resume_refuses_checkpoint_of_another_job(tmp_path, tiny_tok_dir, capsys):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    ck = tmp_path / "ck"
    base = ["dp-baseline", str(job), "--checkpoint-dir", str(ck), "--set", "dp.target_epsilon=5"]
    assert main([*base, "--stop-at-step", "1"]) == 0
    before = checkpoint_path(ck).read_bytes()
    capsys.readouterr()
    assert main([*base, "--resume", "--set", "dp.max_grad_norm=0.5"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "different job" in err and "tuning steps" not in err
    assert main(base) == 2  # starting afresh must not overwrite the run's checkpoint
    assert "--resume" in capsys.readouterr().err
    assert checkpoint_path(ck).read_bytes() == before


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["dp.target_epsilon=0"], "dp.target_epsilon"),
        (["dp.target_epsilon=-2"], "dp.target_epsilon"),
        (["dp.target_epsilon=5", "dp.delta=0.2"], "dp.delta"),
        (["dp.target_epsilon=5", "zo.batch_size=20"], "zo.batch_size"),
        (["dp.target_epsilon=5", "dp.sample_rate=1.5"], "dp.sample_rate"),
        (["dp.target_epsilon=1", "dp.noise_multiplier=0.5"], "dp.target_epsilon"),
        (
            ["dp.target_epsilon=3", "dp.noise_multiplier=3", "dp.baseline_steps=50"],
            "lower dp.baseline_steps to at most 4",
        ),
        (["dp.target_epsilon=5", 'zo.lora_modules=["*.query"]'], "zo.lora_modules"),
        (["dp.target_epsilon=5", "zo.soft_prompt_length=2"], "zo.soft_prompt_length"),
    ],
)
def test_impossible_settings_are_refused_before_any_work(
    tmp_path, tiny_tok_dir, capsys, overrides, field
):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    ck = tmp_path / "ck"
    argv = [
        "dp-baseline",
        str(job),
        "--checkpoint-dir",
        str(ck),
        "--report",
        str(tmp_path / "r.json"),
    ]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert "loading model" not in err and "tuning steps" not in err
    assert not ck.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_packaged_default_job_learns_at_epsilon_8(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "dp-baseline",
                "secfwt/jobs/default.toml",
                "--set",
                "dp.target_epsilon=8",
                "--set",
                "dp.delta=1e-3",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["epsilon"] <= 8.0 and r["accuracy_after"] > r["accuracy_before"]
