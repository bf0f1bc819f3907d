"""The MPC zeroth-order run tracks its plaintext reference step for step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
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


#: LoRA on layer 1's feed-forward layers only: layer 1's attention half joins the frozen prefix
FFN_TRAINABLE = [
    'zo.trainable=["classifier.*"]',
    'zo.lora_modules=["*.layer.1.intermediate.dense", "*.layer.1.output.dense"]',
    "zo.lora_rank=2",
]


def _run_and_replay(
    tmp_path, model_dir, extra: str = "", trainable: list[str] = TRAINABLE
) -> dict[str, Any]:
    """Run the tiny job (plus ``extra`` TOML) in MPC, replay it in plaintext with the run's
    joint seed, and check the losses and final parameters agree within the tolerances."""
    cfg = load_job(write_tiny_job(tmp_path, model_dir, extra), overrides=trainable)
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
    assert r["report"]["prefix_end"] == "layer"  # LoRA on the query: layer 1 runs whole
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
    # every secure forward was range-checked, one bit per row revealed to both parties: the
    # frozen prefix (18 rows, one chunk of run.eval_batch), the evaluations before and after
    # (10 held-out rows each) and each step's batch (8 rows)
    cfg = r["cfg"]
    n_eval, n_train = 2 * cfg.data.eval_per_class, 2 * cfg.data.shots_per_class
    steps = [min(cfg.zo.batch_size, n_train)] * cfg.zo.steps
    assert _first_range_checks(r["report"]) == {
        "frozen prefix": [n_train + n_eval],
        "classifier outputs": [n_eval, *steps, n_eval],
    }


def _first_range_checks(report: dict[str, Any]) -> dict[str, list[int]]:
    """The rows of each first-attempt range check in the data owner's audit log, by what it
    checked (a recomputed row adds a later attempt)."""
    out: dict[str, list[int]] = {}
    audit = Path(report["output_dir"]) / "data_owner" / "audit.jsonl"
    for entry in map(json.loads, audit.read_text().splitlines()):
        if entry["value"] == "range_check" and entry["note"].endswith("attempt 1"):
            out.setdefault(entry["note"].split(":")[0], []).append(entry["shape"][0])
    return out


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


def test_mpc_zo_from_inside_a_layer_tracks_its_reference(tmp_path, tiny_tok_dir):
    """LoRA on layer 1's FFN only: the prefix ends after layer 1's attention half, in MPC as in
    the replay, and the run tracks it; the adapters moved (the FFN is in every step)."""
    r = _run_and_replay(tmp_path, tiny_tok_dir, trainable=FFN_TRAINABLE)
    assert r["report"]["prefix_end"] == "attention"
    lora = [n for n in r["final"] if "lora_B" in n]
    assert len(lora) == 2
    assert max(float(r["ref"]["theta"][n].abs().max()) for n in lora) > 5 * r["worst"]
