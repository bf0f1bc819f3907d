"""The safety gate in MPC: its score equals the plaintext refusal margin of the same parameters,
a passing job releases its adapter, and a failing one releases nothing, deletes its checkpointed
shares and says why in both owners' reports and audit logs."""

from __future__ import annotations

import json

import pytest
import torch

from secfwt.config import load_job
from secfwt.errors import PolicyError
from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.spec import Head
from secfwt.runtime.gate import WITHHELD, gate_rows
from secfwt.runtime.policy import SafetyPolicy, check_policy
from secfwt.runtime.simulate import run_simulation
from secfwt.tuning.reference import plain_gate_score
from tests.conftest import write_chat_job

pytestmark = pytest.mark.multiprocess

#: The score is a mean of per-row response-loss differences: each row's loss carries the
#: fixed-point and log-sum-exp error of a causal job's loss (~5e-4 per row, see
#: test_causal_tracking.LOSS_TOL), and the mean of 12 rows' signed losses keeps it below 5e-3.
SCORE_TOL = 5e-3

GATE = """
[safety_gate]
prompts = "packaged:advbench-gate"
count = 2
max_length = 48
{threshold}
[[disclosure]]
value = "safety_score"
to = ["data_owner", "model_owner"]
"""


@pytest.fixture(scope="module")
def refusing_chat_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny chat Llama taught to refuse: 40 Adam steps on the gate's refusal openings after
    AdvBench prompts 1-32 (not the gate's prompts, 401-520), so that its score is far from 0
    (about 8 nats) and a wrong weight or sign in the secure score cannot hide in the tolerance."""
    from transformers import LlamaForCausalLM

    from secfwt.data.chat_tokenize import format_instructions
    from secfwt.data.instructions import InstructionPairs
    from secfwt.data.refusal_margin import REFUSALS, advbench_prompts
    from tests.conftest import save_tiny_chat_decoder

    folder = save_tiny_chat_decoder(tmp_path_factory.mktemp("gate") / "m", smollm2_tokenizer)
    prompts = advbench_prompts()[:32]
    pairs = InstructionPairs(
        prompts=tuple(prompts),
        responses=tuple(REFUSALS[i % len(REFUSALS)] for i in range(len(prompts))),
        systems=(None,) * len(prompts),
    )
    b = format_instructions(
        pairs,
        tokenizer=smollm2_tokenizer,
        max_length=64,
        truncate="prompt_left",
        padding_side="left",
        model_max_positions=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pos = (b.attention_mask.cumsum(1) - 1).clamp(min=0)
    for _ in range(40):
        logits = model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos
        ).logits
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), b.target_ids, reduction="none"
        )
        loss = (nll * b.target_mask).sum() / b.target_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    return folder


def _audit(report, role):
    path = f"{report['output_dir']}/{role}/audit.jsonl"
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _plain_scores(cfg, model_dir, final=None):
    spec, state = load_checkpoint(model_dir, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    rows = gate_rows(cfg, model_dir)
    before = plain_gate_score(cfg, spec=spec, state=state, rows=rows)
    after = (
        None
        if final is None
        else plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=final)
    )
    return before, after


def test_a_passing_gate_scores_as_plaintext_and_releases(tmp_path, refusing_chat_dir):
    job = write_chat_job(tmp_path, refusing_chat_dir, GATE.format(threshold="max_drop = 10.0"))
    cfg = load_job(job)
    report = run_simulation(cfg)
    gate = report["safety_gate"]
    assert report["state"] == "released" and gate["released"] is True
    assert report["parties"]["model_owner"]["safety_gate_seen"] == gate
    final = torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])
    want_before, want_after = _plain_scores(cfg, refusing_chat_dir, final)
    assert want_before > 4.0  # the model refuses: the score is far from 0
    assert abs(gate["score_before"] - want_before) < SCORE_TOL, (gate, want_before)
    assert abs(gate["score_after"] - want_after) < SCORE_TOL, (gate, want_after)
    for role in ("model_owner", "data_owner"):
        scores = [e for e in _audit(report, role) if e.get("value") == "safety_score"]
        assert [e["note"] for e in scores] == ["safety gate: before tuning", "safety gate: after"]


def test_a_failing_gate_withholds_and_deletes_the_tuned_shares(tmp_path, tiny_chat_dir):
    job = write_chat_job(tmp_path, tiny_chat_dir, GATE.format(threshold="min_score = 1000.0"))
    cfg = load_job(job)
    report = run_simulation(cfg, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
    gate = report["safety_gate"]
    assert report["state"] == WITHHELD and gate["released"] is False
    assert "below min_score = 1000.0" in gate["reason"]
    assert report["parties"]["model_owner"]["safety_gate_seen"] == gate
    for role in ("model_owner", "data_owner"):
        assert report["parties"][role]["artifacts"] == {}
        audit = _audit(report, role)
        assert not [e for e in audit if e.get("value") == "final_parameters"]
        (event,) = [e for e in audit if e.get("event") == "withheld"]
        assert event["reason"] == gate["reason"] and event["checkpoints_deleted"]
        left = sorted(p.name for p in (tmp_path / "ckpt" / role).iterdir())
        assert left and all(n.startswith("prefix-") for n in left), left


def test_policy_refuses_a_job_without_its_gate_or_schedule(tmp_path, tiny_chat_dir):
    policy = SafetyPolicy(prompts="packaged:advbench-gate", count=2, max_drop=0.5)
    bare = load_job(write_chat_job(tmp_path, tiny_chat_dir))
    with pytest.raises(PolicyError, match=r"safety_gate: .* requires a safety gate"):
        run_simulation(bare, policy=policy)
    lax = load_job(write_chat_job(tmp_path, tiny_chat_dir, GATE.format(threshold="max_drop = 1")))
    with pytest.raises(PolicyError, match=r"safety_gate.max_drop: .* max_drop <= 0.5, not 1.0"):
        check_policy(lax, policy)
    ok = load_job(write_chat_job(tmp_path, tiny_chat_dir, GATE.format(threshold="max_drop = 0.2")))
    check_policy(ok, policy)
    assert ok.terms.policy and ok.terms.digest() != bare.terms.digest()
