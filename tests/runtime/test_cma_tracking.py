"""The MPC SecFwT (CMA-ES prompt search) run tracks its plaintext replay iteration by iteration."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch

from secfwt.config import load_job
from secfwt.models.checkpoint import load_checkpoint
from secfwt.runtime.data_owner import prepare_inputs
from secfwt.runtime.simulate import run_simulation
from secfwt.tuning.reference import plain_cma_run
from tests.conftest import save_tiny_with_tokenizer, write_tiny_job

pytestmark = pytest.mark.multiprocess

#: Best candidate loss of an iteration. The data owner computes the cross-entropy in float64
#: from the revealed logits, so the only error is the logits': fixed-point encoding (2^-16 ~
#: 1.5e-5 per value) compounded through the secure LayerNorm, softmax and GELU approximations
#: of the 2-layer model. With p the softmax and y the one-hot label,
#: |d CE| <= ||p - y||_1 * max |d logit| <= 2 * max |d logit|, and a minimum over candidates
#: moves by at most the largest candidate's error. Measured: at most 1.6e-4 (init range 0.2);
#: the tolerance leaves ~6x.
LOSS_TOL = 1e-3

#: CMA-ES ranks the candidates and updates from the ranking alone. Two runs whose losses each
#: lie within LOSS_TOL of the replay's rank them alike when every gap between the replay's
#: sorted losses exceeds twice that; only then are the next iteration's candidates certainly
#: the same in both runs.
RANK_GAP = 2 * LOSS_TOL

CMA = (
    "\n[cma]\npopulation = 4\niterations = 3\nbatch_size = 4\nprompt_length = 2\n"
    'intrinsic_dim = 8\n[[disclosure]]\nvalue = "train_outputs"\nto = ["data_owner"]\n'
)


@pytest.fixture(scope="module")
def prompt_sensitive_dir(tmp_path_factory) -> Path:
    # The default init (std 0.02) gives logits so small that every candidate scores ln 2 within
    # ~1e-4: rankings would be decided by fixed-point noise. At std 0.2 the candidates of an
    # iteration spread over ~0.1 in loss, typically 1e-2 apart: ties within RANK_GAP are rare
    # (replayed in plaintext over 40 random joint seeds, 38 had all three rankings certain).
    return save_tiny_with_tokenizer(
        tmp_path_factory.mktemp("cma") / "tiny-bert-tok", initializer_range=0.2
    )


def test_mpc_cma_tracks_plaintext_reference(tmp_path, prompt_sensitive_dir):
    # batch_size 4 of 8 training rows: which rows an iteration scores follows the joint seed
    job = write_tiny_job(tmp_path, prompt_sensitive_dir, extra=CMA)
    cfg = load_job(job, overrides=["job.mode=cma"])
    report = run_simulation(cfg)
    assert report["mode"] == "cma" and report["steps"] == 3
    spec, state = load_checkpoint(
        prompt_sensitive_dir, head=cfg.model.head, num_labels=2, seed=cfg.job.seed
    )
    data = prepare_inputs(cfg, tokenizer_dir=prompt_sensitive_dir)
    ref = plain_cma_run(cfg, spec=spec, state=state, data=data, seed=report["joint_seed"])
    assert len(ref["losses"]) == len(ref["candidate_losses"]) == 3

    mpc = report["loss_history"]
    compared = 0
    for it, (m, r, cands) in enumerate(
        zip(mpc, ref["losses"], ref["candidate_losses"], strict=True)
    ):
        # this iteration's candidates are the replay's: the first always, later ones while
        # every earlier ranking was certain
        assert m is not None and abs(m - r) < LOSS_TOL, (it, mpc, ref["losses"])
        compared += 1
        ranked = sorted(cands)
        if min(b - a for a, b in pairwise(ranked)) <= RANK_GAP:
            break  # a near-tie: the MPC run may rank differently and propose other candidates
    if compared == 3:
        # every ranking certainly matched: CMA-ES made the same updates, so the data owner's
        # final mean prompt is the replay's (the same float64 arithmetic on the same draws)
        prompt = torch.load(report["parties"]["data_owner"]["artifacts"]["prompt"])["prompt"]
        torch.testing.assert_close(prompt, ref["prompt"], rtol=1e-5, atol=1e-6)
    assert report["accuracy_before"] == pytest.approx(ref["accuracy_before"], abs=0.11)
