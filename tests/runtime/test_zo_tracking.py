"""The MPC zeroth-order run tracks its plaintext reference step for step."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from secfwt.config import JobConfig, SafetySection, load_job
from secfwt.models.checkpoint import load_checkpoint
from secfwt.runtime.data_owner import prepare_inputs
from secfwt.runtime.simulate import run_simulation
from secfwt.tuning.reference import plain_zo_run
from tests.conftest import write_tiny_job

pytestmark = pytest.mark.multiprocess

#: Per-step mean loss: fixed-point encoding (2^-16) and the range-safe exp/log of the
#: cross-entropy, through a 1-layer secure upper part. Measured max about LOSS_MEASURED.
LOSS_TOL = 5e-3
#: Parameters after all steps: each step adds lr * g * u where g = dL / (2 eps) carries the
#: loss error divided by 2 eps = 0.1 (so ~10x the loss error) times |u| ~ 3.
PARAM_TOL = 5e-2


#: LoRA on layer 1's query and the biases of its output make layer 1 part of every step
TRAINABLE = [
    'zo.trainable=["classifier.*", "*.layer.1.output.dense.bias"]',
    'zo.lora_modules=["*.layer.1.attention.self.query"]',
    "zo.lora_rank=2",
]


def _run_and_replay(tmp_path, model_dir, extra: str = "") -> dict[str, Any]:
    """Run the tiny job (plus ``extra`` TOML) in MPC, replay it in plaintext with the run's
    joint seed, and check the losses and final parameters agree within the tolerances."""
    cfg = load_job(write_tiny_job(tmp_path, model_dir, extra), overrides=TRAINABLE)
    report = run_simulation(cfg)
    assert report["cut_layer"] == 1 and report["steps"] == 3
    spec, state = load_checkpoint(model_dir, head=cfg.model.head, num_labels=2, seed=cfg.job.seed)
    data = prepare_inputs(cfg, tokenizer_dir=model_dir)

    def replay(cfg: JobConfig) -> dict[str, Any]:
        return plain_zo_run(cfg, spec=spec, state=state, data=data, seed=report["joint_seed"])

    ref = replay(cfg)
    mpc_losses = torch.tensor(report["loss_history"], dtype=torch.float64)
    ref_losses = torch.tensor(ref["losses"], dtype=torch.float64)
    assert (mpc_losses - ref_losses).abs().max() < LOSS_TOL, (mpc_losses, ref_losses)
    final = torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])
    assert set(final) == set(ref["theta"])
    worst = max(float((final[n].double() - ref["theta"][n]).abs().max()) for n in final)
    assert worst < PARAM_TOL, worst
    return {
        "cfg": cfg,
        "report": report,
        "ref": ref,
        "final": final,
        "state": state,
        "worst": worst,
        "replay": replay,
    }


def test_mpc_zo_tracks_plaintext_reference(tmp_path, tiny_tok_dir):
    r = _run_and_replay(tmp_path, tiny_tok_dir)
    ref, state, worst = r["ref"], r["state"], r["worst"]
    moved = max(
        float((ref["theta"][n] - (state[n].double() if n in state else 0)).abs().max())
        for n in r["final"]
        if "lora_B" not in n
    )
    assert moved > 5 * worst  # the parameters really moved, and MPC followed them
    assert r["report"]["accuracy_before"] == pytest.approx(
        ref["accuracy_before"], abs=0.11
    )  # at most one of 10 flips


SAFETY = """
[safety]
warmup_steps = 1
warmup_modules = ["classifier.*"]
lr_multipliers = {"*.query" = 0.5, "*.dense" = 0.25}
"""


def test_mpc_zo_with_a_safety_section_tracks_its_reference(tmp_path, tiny_tok_dir):
    """SWAT's warm-up and multipliers are public factors on the MPC update: the run still
    tracks its reference, and that reference is not the one without [safety]."""
    r = _run_and_replay(tmp_path, tiny_tok_dir, SAFETY)
    without = r["replay"](dataclasses.replace(r["cfg"], safety=SafetySection()))
    apart = max(
        float((r["final"][n].double() - without["theta"][n]).abs().max()) for n in r["final"]
    )
    assert apart > 5 * r["worst"], (apart, r["worst"])


RANGE_CHECK_TERM = """
[[disclosure]]
value = "range_check"
to = ["data_owner", "model_owner"]
"""


def test_classification_prefix_range_checked_with_the_term(tmp_path, tiny_tok_dir):
    """With the range_check term a classification job checks each frozen-prefix row (one bit
    per chunk of rows revealed to both) and still tracks its reference; without it, no check."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "checked").mkdir()
    plain = _run_and_replay(tmp_path / "plain", tiny_tok_dir)["report"]
    checked = _run_and_replay(tmp_path / "checked", tiny_tok_dir, RANGE_CHECK_TERM)["report"]
    assert checked["rows_recomputed"] == plain["rows_recomputed"] == 0
    # 18 rows, run.eval_batch 32: one chunk, one range-check reveal more at each party
    for role in ("data_owner", "model_owner"):
        extra = checked["parties"][role]["reveals"] - plain["parties"][role]["reveals"]
        assert extra == 1, (role, extra)
