"""The MPC zeroth-order run tracks its plaintext reference step for step."""

from __future__ import annotations

import pytest
import torch

from secfwt.config import load_job
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


def test_mpc_zo_tracks_plaintext_reference(tmp_path, tiny_tok_dir):
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    # LoRA on layer 1's query and the biases of its output make layer 1 part of every step
    cfg = load_job(
        job,
        overrides=[
            'zo.trainable=["classifier.*", "*.layer.1.output.dense.bias"]',
            'zo.lora_modules=["*.layer.1.attention.self.query"]',
            "zo.lora_rank=2",
        ],
    )
    report = run_simulation(cfg)
    assert report["cut_layer"] == 1 and report["steps"] == 3
    spec, state = load_checkpoint(
        tiny_tok_dir, head=cfg.model.head, num_labels=2, seed=cfg.job.seed
    )
    data = prepare_inputs(cfg, tokenizer_dir=tiny_tok_dir)
    ref = plain_zo_run(cfg, spec=spec, state=state, data=data, seed=report["joint_seed"])
    mpc_losses = torch.tensor(report["loss_history"], dtype=torch.float64)
    ref_losses = torch.tensor(ref["losses"], dtype=torch.float64)
    assert (mpc_losses - ref_losses).abs().max() < LOSS_TOL, (mpc_losses, ref_losses)
    final = torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])
    assert set(final) == set(ref["theta"])
    worst = max(float((final[n].double() - ref["theta"][n]).abs().max()) for n in final)
    moved = max(
        float((ref["theta"][n] - (state[n].double() if n in state else 0)).abs().max())
        for n in final
        if "lora_B" not in n
    )
    assert worst < PARAM_TOL, worst
    assert moved > 5 * worst  # the parameters really moved, and MPC followed them
    assert report["accuracy_before"] == pytest.approx(
        ref["accuracy_before"], abs=0.11
    )  # at most one of 10 flips
