"""SecFwT prompt tuning end to end: candidates from the data owner, outputs only to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secfwt.config import load_job
from secfwt.runtime.simulate import run_simulation
from tests.conftest import write_tiny_job

pytestmark = pytest.mark.multiprocess


def test_cma_prompt_tuning_reveals_only_own_outputs_to_the_data_owner(tmp_path, tiny_tok_dir):
    job = write_tiny_job(
        tmp_path,
        tiny_tok_dir,
        extra=(
            "\n[cma]\npopulation = 4\niterations = 3\nbatch_size = 6\nprompt_length = 2\n"
            "intrinsic_dim = 8\n[[disclosure]]\n"
            'value = "train_outputs"\nto = ["data_owner"]\n'
        ),
    )
    cfg = load_job(job, overrides=["job.mode=cma", "model.attention=rfa"])
    report = run_simulation(cfg)
    assert report["steps"] == 3 and report["mode"] == "cma"
    losses = [x for x in report["loss_history"] if x is not None]
    assert len(losses) == 3 and all(
        0 < x < 5 for x in losses
    )  # the data owner computed losses locally
    out = Path(report["output_dir"])
    prompt = torch.load(report["parties"]["data_owner"]["artifacts"]["prompt"])["prompt"]
    assert prompt.shape == (2, 64)
    assert report["parties"]["model_owner"]["artifacts"] == {}
    for role in ("model_owner", "data_owner"):
        entries = [
            json.loads(line) for line in (out / role / "audit.jsonl").read_text().splitlines()
        ]
        outputs = [e for e in entries if e["value"] == "train_outputs"]
        assert len(outputs) == 3 and all(e["to"] == ["data_owner"] for e in outputs)
        assert outputs[0]["shape"] == [4 * 6, 2]  # population x batch rows of logits
        assert {e["value"] for e in entries} <= {
            "train_outputs",
            "eval_accuracy",
            "embedding_table",
            "range_check",
            "train_loss",
            "final_parameters",
        }
        # each candidate forward's rows are range-checked, one bit per row to both parties
        checks = [e for e in entries if e["value"] == "range_check" and "outputs" in e["note"]]
        assert [e["shape"] for e in checks if e["note"].endswith("attempt 1")].count([4 * 6]) == 3
        assert all(e["to"] == ["data_owner", "model_owner"] for e in checks)


def _disagreeing_terms(ctx, payload):
    from secfwt.mpc.disclosure import DisclosureTerms, Revealable
    from secfwt.roles import Role
    from secfwt.runtime.session import PartySession

    to = [Role.DATA_OWNER] if ctx.role is Role.DATA_OWNER else [Role.DATA_OWNER, Role.MODEL_OWNER]
    terms = DisclosureTerms.of([(Revealable.EVAL_OUTPUTS, to)])
    sess = PartySession(role=ctx.role, terms=terms, audit_path=None)
    sess.agree(terms.digest(), what="the disclosure terms (digest)")


def test_parties_with_different_terms_refuse_to_start():
    from secfwt.errors import ProtocolError
    from secfwt.mpc.launcher import run_parties
    from secfwt.mpc.provider import Provider

    with pytest.raises(ProtocolError, match="disagree on the disclosure terms"):
        run_parties(_disagreeing_terms, payloads={}, provider=Provider.TTP, timeout_s=120)


def _joint_seed(ctx, payload):
    from secfwt.mpc.disclosure import DisclosureTerms
    from secfwt.runtime.session import PartySession

    sess = PartySession(role=ctx.role, terms=DisclosureTerms.of([]), audit_path=None)
    return [sess.joint_seed(), sess.joint_seed()]


def test_joint_seed_is_common_and_fresh():
    from secfwt.mpc.launcher import run_parties
    from secfwt.mpc.provider import Provider
    from secfwt.roles import Role

    res = run_parties(_joint_seed, payloads={}, provider=Provider.TTP, timeout_s=120)
    a, b = res[Role.MODEL_OWNER].value, res[Role.DATA_OWNER].value
    assert a == b and a[0] != a[1]
