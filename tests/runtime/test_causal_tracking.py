"""A causal-LM (instruction-tuning) job in MPC tracks its plaintext reference step for step, and
hands its LoRA over as a PEFT adapter that transformers loads and generates with."""

from __future__ import annotations

import pytest
import torch

from secfwt.config import load_job
from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.decoder import DecoderModel
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Head
from secfwt.models.transformer import ForwardSettings, plain_params
from secfwt.runtime.data_owner import prepare_instruction_inputs
from secfwt.runtime.simulate import run_simulation
from secfwt.tuning.accounting import plan
from secfwt.tuning.reference import plain_zo_run
from tests.conftest import DataOwnerKiller, write_chat_job

pytestmark = pytest.mark.multiprocess

#: Per-step mean response loss and held-out loss: fixed-point inputs (2^-16), the range-safe
#: log-sum-exp over 49,152 logits (per-token error ~2e-4) through 1 secure layer, the final
#: norm and the head [measured 5e-4 on the step losses, 7e-4 on the held-out loss].
LOSS_TOL = 5e-3
#: Parameters after the steps: each adds lr * g * u, g carrying the loss error / (2 eps) = 50x
#: it, times lr = 0.05 and |u| ~ 3 [measured 1.2e-3].
PARAM_TOL = 2e-2
#: PEFT's logits against secfwt's float64 forward with the same factors: transformers' RMSNorm
#: computes in float32 even in a float64 model [measured 3.0e-6 on logits ~1].
ADAPTER_TOL = 1e-5


def _reference(cfg, model_dir, report, **kw):
    spec, state = load_checkpoint(model_dir, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    data = prepare_instruction_inputs(cfg, tokenizer_dir=model_dir)
    ref = plain_zo_run(cfg, spec=spec, state=state, data=data, seed=report["joint_seed"], **kw)
    return spec, state, data, ref


def _assert_tracks(report, ref, state):
    mpc = torch.tensor(report["loss_history"], dtype=torch.float64)
    want = torch.tensor(ref["losses"], dtype=torch.float64)
    assert (mpc - want).abs().max() < LOSS_TOL, (mpc, want)
    for when in ("before", "after"):
        got, exp = report[f"eval_loss_{when}"], ref[f"eval_loss_{when}"]
        assert abs(got - exp) < LOSS_TOL, (when, got, exp)
    final = torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])
    assert set(final) == set(ref["theta"])
    worst = max(float((final[n].double() - ref["theta"][n]).abs().max()) for n in final)
    start = {n: state[n].double() if n in state else 0.0 for n in final}
    moved = max(
        float((ref["theta"][n] - start[n]).abs().max())
        for n in final
        if "lora_A" not in n and n != "soft_prompt"
    )
    assert worst < PARAM_TOL and moved > 5 * worst, (worst, moved)
    return final


def test_causal_zo_tracks_the_reference_and_delivers_a_peft_adapter(tmp_path, tiny_chat_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    # LoRA on layer 1's q_proj, the final norm, and a 2-vector soft prompt entering at layer 1
    # (its slots masked as keys in layer 0, replaced by the prompt before layer 1)
    soft = ["zo.soft_prompt_length=2", "zo.prompt_layer=1"]
    cfg = load_job(write_chat_job(tmp_path, tiny_chat_dir), overrides=soft)
    report = run_simulation(cfg)
    assert report["cut_layer"] == 1 and report["steps"] == 2
    assert report["accuracy_before"] is None  # a causal job reveals losses, not accuracy
    assert report["parties"]["model_owner"]["eval_loss_seen"]["after"] == report["eval_loss_after"]
    spec, state, _, ref = _reference(cfg, tiny_chat_dir, report)
    final = _assert_tracks(report, ref, state)

    folder = report["parties"]["data_owner"]["artifacts"]["adapter"]
    base = LlamaForCausalLM.from_pretrained(tiny_chat_dir).double().eval()
    tuned = PeftModel.from_pretrained(base, folder).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello, how are you?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    tuned_values = {n: v.double() for n, v in final.items() if n != "soft_prompt"}
    assert any(".lora_" in n for n in tuned_values) and "model.norm.weight" in tuned_values
    # PEFT computes secfwt's forward with the delivered LoRA factors and final norm weight (the
    # soft prompt is not part of a LoRA adapter)
    mine = DecoderModel(
        spec, {**plain_params(state), **tuned_values}, PlainOps(), ForwardSettings()
    ).forward(base.model.embed_tokens(ids).detach(), torch.ones_like(ids, dtype=torch.float64))
    with torch.no_grad():
        theirs = tuned(input_ids=ids).logits
    assert (mine - theirs).abs().max() < ADAPTER_TOL
    with torch.no_grad():  # and generates: greedy, as the merged model W + scale B A does
        out = tuned.generate(ids, max_new_tokens=6, do_sample=False)
        merged = tuned.merge_and_unload().generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6 and torch.equal(out, merged)


@pytest.mark.slow
def test_causal_dp_zo_tracks_the_reference(tmp_path, tiny_chat_dir):
    """DP-ZO on a causal job: with every row sampled (rate 1) and noise 1e-3 of the clip, the
    run is deterministic up to that noise, so the MPC run must follow the replay's clipped
    per-example differences; the clip bound is small enough to bind."""
    dp = [
        "dp.enabled=true",
        "dp.noise_multiplier=0.001",
        "dp.sample_rate=1.0",
        "dp.delta=0.01",
        "dp.max_grad_norm=0.05",
    ]
    cfg = load_job(write_chat_job(tmp_path, tiny_chat_dir), overrides=dp)
    report = run_simulation(cfg)
    assert report["dp"]["sample_rate"] == 1.0 and report["steps"] == 2
    dp_plan = plan(cfg.dp, n_train=8, batch_size=cfg.zo.batch_size, steps=2)
    _, state, _, ref = _reference(cfg, tiny_chat_dir, report, dp_plan=dp_plan)
    _assert_tracks(report, ref, state)
    loose = plan(
        load_job(write_chat_job(tmp_path, tiny_chat_dir), overrides=[*dp[:-1]]).dp,
        n_train=8,
        batch_size=cfg.zo.batch_size,
        steps=2,
    )
    _, _, _, unclipped = _reference(cfg, tiny_chat_dir, report, dp_plan=loose)
    assert unclipped["gs"] != ref["gs"]  # the clip changed the update


@pytest.mark.slow
def test_killed_then_resumed_causal_job_equals_the_uninterrupted_run(tmp_path, tiny_chat_dir):
    """Checkpoints of a causal job hold its window cache and the held-out loss before tuning;
    a job killed after its checkpoint of step 1 resumes to the uninterrupted run's result, bit
    for bit under fixed test seeds (see tests/runtime/test_checkpoint_resume.py for why)."""
    from secfwt.errors import ProtocolError

    seed, steps = 424242, 3

    def cfg(name: str):
        (tmp_path / name).mkdir()
        job = write_chat_job(tmp_path / name, tiny_chat_dir)
        return load_job(job, overrides=[f"zo.steps={steps}", 'zo.trainable=["model.norm.weight"]'])

    ref = run_simulation(  # checkpointed alike: the test seeds are reset at every checkpoint
        cfg("ref"), insecure_fixed_seed=seed, checkpoint_dir=tmp_path / "c0", checkpoint_every=1
    )
    job = cfg("run")
    kill_data_owner = DataOwnerKiller()

    with pytest.raises(ProtocolError):
        run_simulation(
            job,
            insecure_fixed_seed=seed,
            checkpoint_dir=tmp_path / "c1",
            checkpoint_every=1,
            on_progress=kill_data_owner,
        )
    assert kill_data_owner.killed
    res = run_simulation(
        job,
        insecure_fixed_seed=seed,
        checkpoint_dir=tmp_path / "c1",
        checkpoint_every=1,
        resume=True,
    )
    assert res["resumed_from_step"] is not None and res["steps"] == steps
    assert res["loss_history"] == ref["loss_history"]
    assert res["eval_loss_before"] == ref["eval_loss_before"] is not None
    assert res["eval_loss_after"] == ref["eval_loss_after"]
    a = torch.load(ref["parties"]["data_owner"]["artifacts"]["final_parameters"])
    b = torch.load(res["parties"]["data_owner"]["artifacts"]["final_parameters"])
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
