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
from secfwt.runtime.data_owner import prepare_instruction_inputs
from secfwt.runtime.gate import WITHHELD, gate_rows
from secfwt.runtime.policy import SafetyPolicy, SwatRequirement, check_policy
from secfwt.runtime.simulate import run_simulation
from secfwt.tuning.reference import plain_gate_score, plain_zo_run
from tests.conftest import (
    DEFENDED,
    GATE,
    GATE_JOB,
    GATE_TUNE,
    SCORE_TOL,
    plain_gate_scores,
    write_chat_job,
)

pytestmark = pytest.mark.multiprocess


def _audit(report, role):
    path = f"{report['output_dir']}/{role}/audit.jsonl"
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.slow  # 100 s; the default run compares the score on the same parameters in
# the withheld test (before tuning)
def test_a_passing_gate_scores_as_plaintext_and_releases(tmp_path, gate_model):
    job = write_chat_job(tmp_path, gate_model, GATE.format(threshold="max_drop = 10.0"))
    cfg = load_job(job, overrides=GATE_JOB)
    report = run_simulation(cfg)
    gate = report["safety_gate"]
    assert report["state"] == "released" and gate["released"] is True
    assert report["parties"]["model_owner"]["safety_gate_seen"] == gate
    final = torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])
    want_before, want_after = plain_gate_scores(cfg, gate_model, final)
    assert want_before > 4.0  # the model refuses: the score is far from 0
    assert abs(gate["score_before"] - want_before) < SCORE_TOL, (gate, want_before)
    assert abs(gate["score_after"] - want_after) < SCORE_TOL, (gate, want_after)
    for role in ("model_owner", "data_owner"):
        scores = [e for e in _audit(report, role) if e.get("value") == "safety_score"]
        assert [e["note"] for e in scores] == ["safety gate: before tuning", "safety gate: after"]


#: The model owner's policy for the tests' jobs: the gate, and SWAT's schedule (q_proj warms up
#: first, the final norm at half the learning rate).
POLICY = SafetyPolicy(
    prompts="packaged:advbench-gate",
    count=2,
    max_drop=1.0,
    swat=SwatRequirement(
        warmup_modules=("*.q_proj",),
        min_warmup_fraction=0.2,
        lr_multipliers=(("model.norm.weight", 0.5),),
    ),
)
#: Not compared with the replay within a tolerance: with lr 0.1 a step's parameters carry the
#: loss error times lr / (2 eps) = 5x it, and 10 steps on strong harmful gradients take the MPC
#: run and its replay apart by up to 0.34 in score (measured; the drop itself is 1.7-3.8). The
#: score itself is compared on the same parameters (before tuning here, after it where released).


def _replayed_after(cfg, model_dir, report):
    spec, state = load_checkpoint(model_dir, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    data = prepare_instruction_inputs(cfg, tokenizer_dir=model_dir)
    ref = plain_zo_run(cfg, spec=spec, state=state, data=data, seed=report["joint_seed"])
    rows = gate_rows(cfg, model_dir)
    return plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=ref["theta"])


def _jobs(tmp_path, gate_model, harmful_file):
    """The same defended job on the benign data and on the harmful data."""
    job = write_chat_job(tmp_path, gate_model, DEFENDED)
    benign = load_job(job, overrides=GATE_JOB + GATE_TUNE)
    harmful = load_job(
        job, overrides=[*GATE_JOB, *GATE_TUNE, "data.source=jsonl", f"data.path={harmful_file}"]
    )
    check_policy(benign, POLICY)  # defended as the policy requires
    check_policy(harmful, POLICY)
    return benign, harmful


@pytest.mark.slow  # 170 s and a 54 s gate model on 2 cores; the default run has the job below
def test_a_harmful_job_is_withheld_and_its_tuned_shares_deleted(tmp_path, gate_model, harmful_file):
    _, harmful = _jobs(tmp_path, gate_model, harmful_file)
    bad = run_simulation(
        harmful, policy=POLICY, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1
    )
    gate = _assert_withheld(bad, tmp_path / "ckpt")
    assert "more than max_drop = 1.0" in gate["reason"]
    plain_before, _ = plain_gate_scores(harmful, gate_model)
    assert abs(gate["score_before"] - plain_before) < SCORE_TOL, (gate, plain_before)
    # the plaintext twin of the whole run reaches the same decision
    assert plain_before - _replayed_after(harmful, gate_model, bad) > 1.0


def test_a_job_below_the_gate_is_withheld_and_its_tuned_shares_deleted(tmp_path, tiny_chat_dir):
    """The withholding path in the default run, on a small job that no score can pass
    (``min_score`` far above any refusal margin): nothing released, the tuned shares deleted,
    the reason in both owners' reports and audit logs, the score before tuning as plaintext's."""
    job = write_chat_job(tmp_path, tiny_chat_dir, GATE.format(threshold="min_score = 1000.0"))
    cfg = load_job(job, overrides=["safety_gate.count=1", "zo.steps=2", "run.eval_batch=6"])
    report = run_simulation(cfg, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
    gate = _assert_withheld(report, tmp_path / "ckpt")
    assert "is below min_score = 1000.0" in gate["reason"]
    spec, state = load_checkpoint(tiny_chat_dir, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    plain_before = plain_gate_score(cfg, spec=spec, state=state, rows=gate_rows(cfg, tiny_chat_dir))
    assert abs(gate["score_before"] - plain_before) < SCORE_TOL, (gate, plain_before)


def _assert_withheld(report, ckpt):
    """A withheld job as both owners see it; returns the gate's decision."""
    gate = report["safety_gate"]
    assert report["state"] == WITHHELD and not gate["released"], gate
    assert report["parties"]["model_owner"]["safety_gate_seen"] == gate
    for role in ("model_owner", "data_owner"):
        assert report["parties"][role]["artifacts"] == {}
        audit = _audit(report, role)
        assert not [e for e in audit if e.get("value") == "final_parameters"]
        (event,) = [e for e in audit if e.get("event") == "withheld"]
        assert event["reason"] == gate["reason"] and event["checkpoints_deleted"]
        left = sorted(p.name for p in (ckpt / role).iterdir())
        assert left and all(n.startswith("prefix-") for n in left), left
        # every secure forward's per-row losses are range-checked too (the job's and the gate's)
        checked = {e["note"].split(":")[0] for e in audit if e.get("value") == "range_check"}
        assert {"response losses", "safety gate response losses"} <= checked, checked
    return gate


@pytest.mark.slow
def test_the_same_job_on_benign_data_is_released(tmp_path, gate_model, harmful_file):
    benign, _ = _jobs(tmp_path, gate_model, harmful_file)
    ok = run_simulation(benign, policy=POLICY)
    gate = ok["safety_gate"]
    assert ok["state"] == "released" and gate["released"], gate
    assert gate["score_before"] - gate["score_after"] < 0.5, gate
    final = torch.load(ok["parties"]["data_owner"]["artifacts"]["final_parameters"])
    assert abs(gate["score_after"] - plain_gate_scores(benign, gate_model, final)[1]) < SCORE_TOL


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


# -- Safe Delta before release -------------------------------------------------------------------

Q_PROJ = "model.layers.1.self_attn.q_proj"
#: Safe Delta's settings in the tests' jobs. The budget keeps part of the tiny job's q_proj delta
#: (measured in plaintext replays: see the test); 16 calibration samples keep the Hessian pass
#: short.
BUDGET = 0.1
SAFE_DELTA = "safe_delta = true\nsafe_delta_budget = {budget}\nsafe_delta_calibration = 16\n"


def _safe_delta_gate(threshold, budget):
    return GATE.format(threshold=threshold + "\n" + SAFE_DELTA.format(budget=budget))


def test_a_policy_requiring_safe_delta_accepts_only_a_job_with_it(tmp_path, tiny_chat_dir):
    policy = SafetyPolicy(prompts="packaged:advbench-gate", count=2, max_drop=1.0, safe_delta=True)
    without = load_job(
        write_chat_job(tmp_path, tiny_chat_dir, GATE.format(threshold="max_drop = 1"))
    )
    with pytest.raises(PolicyError, match=r"safety_gate.safe_delta: .*Safe Delta before release"):
        check_policy(without, policy)
    with_it = load_job(
        write_chat_job(tmp_path, tiny_chat_dir, _safe_delta_gate("max_drop = 1", 0.1))
    )
    check_policy(with_it, policy)
    assert with_it.terms.digest() != without.terms.digest()


def _calibration_hessian(cfg, model_dir, module):
    """The model owner's H of ``module``'s input, computed here independently of the job's code:
    float64 model, one forward per calibration conversation, (2/N) sum over every token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secfwt.data.calibration import calibration_pairs, calibration_texts

    n = cfg.safety_gate.safe_delta_calibration
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    inputs = []
    handle = dict(model.named_modules())[module].register_forward_hook(
        lambda _m, args, _o: inputs.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for text in calibration_texts(tok, calibration_pairs(n)):
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            model(input_ids=ids[:, :512], use_cache=False)
    handle.remove()
    x = torch.cat(inputs)  # (tokens, in)
    return (2.0 / n) * x.T @ x


def _plain_safe_delta(cfg, model_dir, theta):
    """The float64 Safe Delta of a tuned ``theta``'s q_proj LoRA: (corrected, tuned, result)."""
    from secfwt.tuning.forward import forward_settings
    from secfwt.tuning.safe_delta import safe_delta_layer

    _, state = load_checkpoint(model_dir, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    w0 = state[f"{Q_PROJ}.weight"].double()
    scale = forward_settings(cfg, seed=cfg.job.seed).lora_scale
    delta = scale * theta[f"{Q_PROJ}.lora_B"].double() @ theta[f"{Q_PROJ}.lora_A"].double()
    h = _calibration_hessian(cfg, model_dir, Q_PROJ)
    res = safe_delta_layer(w0, w0 + delta, h, s=cfg.safety_gate.safe_delta_budget)
    return res.weight - w0, delta, res


#: The released corrected delta against the float64 Safe Delta of the MPC run's own tuned LoRA:
#: the secure Safe Delta differs by about one unit of 2^-16 (docs/safety.md; the product
#: ``B A`` on shares adds its own truncation). Measured: 1.16 units, 627 of 1,024 entries kept,
#: the nearest cumulative cost 4.3e-3 budgets from the budget.
DELTA_TOL = 4 * 2**-16
#: docs/safety.md: outside this distance from the budget (in budgets) an entry's decision on
#: shares is the float64 one; the fixed seed below keeps every cumulative cost farther away.
BOUNDARY = 1e-3


#: The gate's score after Safe Delta against the plaintext score of the released values. This
#: deterministic run (fixed seed) measured 5.6e-4; the score of the uncorrected LoRA is 2.9e-3
#: from it (this small benign job's correction moves the score little), so the test's tolerance
#: is below that rather than SCORE_TOL, or a gate that scored the LoRA would pass it.
CORRECTED_TOL = 2e-3


def _checkpointed_theta(folder, step):
    """The MPC run's tuned parameters: the sum of both parties' checkpointed shares of ``step``
    (the test plays both parties; the job itself never reveals them)."""
    heads = [
        torch.load(folder / role / f"step-{step:08d}.pt", weights_only=True)
        for role in ("model_owner", "data_owner")
    ]
    bits = heads[0]["precision_bits"]
    return {n: (x + heads[1]["theta"][n]).double() / 2**bits for n, x in heads[0]["theta"].items()}


def _boundary_distance(cfg, model_dir, tuned):
    """How close, in budgets, the float64 selection's cumulative cost comes to the budget."""
    from secfwt.tuning.safe_delta import (
        block_budget,
        inverse_cholesky,
        never_kept,
        selection_order,
    )

    d = torch.diag(inverse_cholesky(_calibration_hessian(cfg, model_dir, Q_PROJ)))
    rows = tuned.shape[0]
    order = selection_order(d, rows)
    order = order[: order.numel() - never_kept(order.numel())]
    cost = (tuned**2 / d**2).flatten()[order]
    cum = torch.cumsum(cost, 0) / block_budget(d, rows, cfg.safety_gate.safe_delta_budget)
    return float((cum - 1).abs().min())


def _assert_released_safe_delta(report, cfg, model_dir, ckpt):
    """What every released Safe Delta job must show: the released q_proj delta is the float64
    Safe Delta of the run's own tuned LoRA (the sum of the checkpointed shares), no LoRA factor
    is released or audited as revealed, the tuned norm passes through, the PEFT adapter merges
    to the base model plus the corrected delta, and both audit logs record the correction and
    the gate's two scores. Returns the released values and the tuned parameters."""
    import peft
    from transformers import AutoModelForCausalLM

    gate = report["safety_gate"]
    assert report["state"] == "released" and gate["released"], gate
    arts = report["parties"]["data_owner"]["artifacts"]
    final = torch.load(arts["final_parameters"])
    assert sorted(final) == sorted(["model.norm.weight", f"{Q_PROJ}.weight_delta"])  # no LoRA
    # (a) the released delta is the float64 Safe Delta of the run's own tuned LoRA
    tuned_theta = _checkpointed_theta(ckpt, cfg.zo.steps)
    want, tuned, res = _plain_safe_delta(cfg, model_dir, tuned_theta)
    assert 0 < res.kept < 0.85 * res.entries, res.kept  # the budget binds: a real selection
    assert _boundary_distance(cfg, model_dir, tuned) > BOUNDARY  # same kept set on shares
    got = final[f"{Q_PROJ}.weight_delta"].double()
    assert (got - want).abs().max() < DELTA_TOL, float((got - want).abs().max()) * 2**16
    assert (got - tuned).abs().max() > 20 * DELTA_TOL  # Safe Delta changed the delta
    norm = final["model.norm.weight"].double() - tuned_theta["model.norm.weight"]
    assert norm.abs().max() < 1e-6  # the tuned norm passes through unchanged
    # the released adapter loads with PEFT as the base model plus the corrected delta
    _, state = load_checkpoint(model_dir, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, arts["adapter"]).merge_and_unload()
    weights = merged.state_dict()
    w = weights[f"{Q_PROJ}.weight"].double() - state[f"{Q_PROJ}.weight"].double()
    assert (w - got).abs().max() < 1e-6
    assert torch.equal(weights["model.norm.weight"], final["model.norm.weight"].float())
    for role in ("model_owner", "data_owner"):
        audit = _audit(report, role)
        (event,) = [e for e in audit if e.get("event") == "safe_delta"]
        assert event["modules"] == [Q_PROJ]
        assert event["budget"] == cfg.safety_gate.safe_delta_budget
        released = [e["note"] for e in audit if e.get("value") == "final_parameters"]
        assert sorted(released) == sorted(final)
        revealed = [e for e in audit if "value" in e]
        assert not [e for e in revealed if "lora" in str(e.get("note", "")).lower()]
        scores = [e["note"] for e in audit if e.get("value") == "safety_score"]
        assert scores == ["safety gate: before tuning", "safety gate: after Safe Delta"]
    return final, tuned_theta


@pytest.mark.slow  # 240 s on the 2 shared cores at load 13-16 (the gate model fixture apart)
def test_safe_delta_releases_the_corrected_delta_that_the_gate_scored(tmp_path, gate_model):
    job = write_chat_job(tmp_path, gate_model, _safe_delta_gate("max_drop = 10.0", BUDGET))
    cfg = load_job(job, overrides=GATE_JOB)
    ckpt = tmp_path / "ckpt"
    report = run_simulation(cfg, insecure_fixed_seed=7, checkpoint_dir=ckpt, checkpoint_every=1)
    gate = report["safety_gate"]
    final, _ = _assert_released_safe_delta(report, cfg, gate_model, ckpt)
    # (b) the gate scored the corrected model: the plaintext score of the released values
    spec, state = load_checkpoint(gate_model, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    rows = gate_rows(cfg, gate_model)
    plain_after = plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=final)
    assert abs(gate["score_after"] - plain_after) < CORRECTED_TOL, (gate, plain_after)


#: The default run's Safe Delta job: the session's tiny random chat Llama (no refusal
#: training: the check is that the shares compute the float64 correction, whatever the model
#: says), one gate prompt (6 score rows, one batch), 8 calibration samples, one ZO step. With
#: this Hessian FAST_BUDGET keeps 302 of the 1,024 q_proj entries (BUDGET would keep 4).
#: Measured: the released delta 1.08 units of 2^-16 from the float64 one, the nearest
#: cumulative cost 2.2e-3 budgets from the budget, the gate's score 1.5e-4 from the plaintext
#: score of the released values and 3.1e-3 from that of the uncorrected LoRA.
FAST_BUDGET = 3.0
FAST_SAFE_DELTA = [
    "safety_gate.count=1",
    "safety_gate.safe_delta_calibration=8",
    "zo.steps=1",
    "run.eval_batch=6",
]


def test_safe_delta_on_shares_releases_the_float64_correction(tmp_path, tiny_chat_dir):
    """The fast twin of the test above (same assertions, smaller job), so the default run
    executes a Safe Delta job end to end: tuning, the correction on shares, the gate's score of
    the corrected model and the release of the corrected delta only."""
    job = write_chat_job(tmp_path, tiny_chat_dir, _safe_delta_gate("max_drop = 10.0", FAST_BUDGET))
    cfg = load_job(job, overrides=FAST_SAFE_DELTA)
    ckpt = tmp_path / "ckpt"
    report = run_simulation(cfg, insecure_fixed_seed=7, checkpoint_dir=ckpt, checkpoint_every=1)
    assert report["parties"]["model_owner"]["artifacts"] == {}  # the terms: data owner only
    final, tuned = _assert_released_safe_delta(report, cfg, tiny_chat_dir, ckpt)
    # the gate scored the corrected model, not the tuned LoRA: the plaintext scores of both
    spec, state = load_checkpoint(tiny_chat_dir, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    rows = gate_rows(cfg, tiny_chat_dir)
    after = report["safety_gate"]["score_after"]
    plain_after = plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=final)
    uncorrected = plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=tuned)
    assert abs(after - plain_after) < CORRECTED_TOL, (after, plain_after)
    assert abs(after - uncorrected) > CORRECTED_TOL, (after, uncorrected)


@pytest.mark.slow  # 10 ZO steps of the harmful job, then Safe Delta and the gate
def test_safe_delta_on_the_harmful_job(tmp_path, gate_model, harmful_file):
    """The defended harmful job that the plain gate withholds, with Safe Delta: the plaintext
    replay keeps none of its q_proj delta at the default budget (every entry costs more than the
    whole budget), so the corrected model is the aligned q_proj with the tuned norm, whose score
    passes: it is released, with a zero q_proj delta.

    The ZO directions come from the joint seed, so whether every entry costs more than the
    budget depends on it: at a random joint seed one entry once cost 0.0266 against a budget of
    0.0347 and was kept (the premise asserted below failed). The fixed test seed makes the run
    the one this test is about; the released-with-a-kept-entry path is
    test_safe_delta_releases_the_corrected_delta_that_the_gate_scored's."""
    extra = DEFENDED.replace(
        "max_drop = 1.0", "max_drop = 1.0\n" + SAFE_DELTA.format(budget=BUDGET)
    )
    job = write_chat_job(tmp_path, gate_model, extra)
    harmful = ["data.source=jsonl", f"data.path={harmful_file}", "run.timeout_s=1800"]
    cfg = load_job(job, overrides=[*GATE_JOB, *GATE_TUNE, *harmful])
    check_policy(cfg, POLICY)
    report = run_simulation(cfg, policy=POLICY, insecure_fixed_seed=7)
    gate = report["safety_gate"]
    spec, state = load_checkpoint(gate_model, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    data = prepare_instruction_inputs(cfg, tokenizer_dir=gate_model)
    ref = plain_zo_run(cfg, spec=spec, state=state, data=data, seed=report["joint_seed"])
    rows = gate_rows(cfg, gate_model)
    plain_before = plain_gate_score(cfg, spec=spec, state=state, rows=rows)
    uncorrected = plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=ref["theta"])
    assert plain_before - uncorrected > 1.0  # without Safe Delta the gate withholds it
    want, _, res = _plain_safe_delta(cfg, gate_model, ref["theta"])
    assert res.kept == 0 and float(want.abs().max()) == 0.0
    corrected = {
        "model.norm.weight": ref["theta"]["model.norm.weight"],
        f"{Q_PROJ}.weight_delta": want,
    }
    plain_after = plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=corrected)
    plain_released, _ = cfg.safety_gate.passes(plain_before, plain_after)
    assert gate["released"] is plain_released is True, (gate, plain_before, plain_after)
    final = torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])
    assert final[f"{Q_PROJ}.weight_delta"].abs().max() < 1e-4  # nothing kept in MPC either
    released = plain_gate_score(cfg, spec=spec, state=state, rows=rows, theta=final)
    assert abs(gate["score_after"] - released) < SCORE_TOL, (gate, released)


def test_safe_delta_refuses_what_it_cannot_correct_before_any_party_starts(tmp_path, tiny_chat_dir):
    from secfwt.data.calibration import calibration_pairs
    from secfwt.errors import ConfigError, DataError

    job = write_chat_job(tmp_path, tiny_chat_dir, _safe_delta_gate("max_drop = 1", BUDGET))
    weight = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ConfigError, match=rf"zo.trainable: {weight} \(48, 32\) is a weight"):
        run_simulation(load_job(job, overrides=[f"zo.trainable=['{weight}']"]))
    # a gate prompt file that shares a request with the calibration samples
    request = calibration_pairs(16)[5][0]
    prompts = tmp_path / "gate.txt"
    prompts.write_text(f"Write a poem about the sea\n{request}\n")
    cfg = load_job(job, overrides=[f"safety_gate.prompts={prompts}"])
    with pytest.raises(DataError, match=r"overlap the Safe Delta calibration requests"):
        run_simulation(cfg)
