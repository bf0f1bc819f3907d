"""The ``decoder`` sub-benchmark: the packaged SmolLM2-135M-Instruct in MPC against plaintext, and
one zeroth-order step of the example instruction-tuning job.

* secure forward: chat-template text (one full row, :func:`sample_chat_inputs`) at each of
  ``plan.decoder_seq_lens`` tokens through all 30 layers, the final norm and the tied LM head
  to the (T, 49,152) logits, as a job's frozen prefix computes it (weights with the model owner
  in the clear, the key mask secret); against transformers' float32 forward of the same ids.
  The first forward of a session also sends every frozen weight's mask once (``first_rep``).
* ZO step: one SPSA step of ``secfwt/jobs/smollm2_instruct_zo.toml`` on its first training
  batch, from the cached prefix that job keeps (computed here in plaintext from the job's own
  rows, up to its first trainable layer): the layers from there, final norm, LM head, the
  vocabulary-wide response loss for 2 x directions parameter sets; its mean loss is checked
  against the same step in float64.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import torch

from secfwt.bench import metrics
from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner, case_summary, max_err, outputs
from secfwt.bench.shapes import time_plaintext
from secfwt.errors import ConfigError
from secfwt.models.spec import Head, ModelSpec
from secfwt.roles import Role

MODEL = "packaged:smollm2-135m-instruct"
EXAMPLE_JOB = "smollm2_instruct_zo.toml"


def decoder(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from secfwt.models.checkpoint import load_checkpoint, resolve_model_path
    from secfwt.runtime.verify_decoder import sample_chat_inputs

    model_dir = resolve_model_path(MODEL)
    spec, state = load_checkpoint(model_dir, head=Head.CAUSAL_LM, num_labels=0, seed=plan.seed)
    hf = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    cases = []
    for t in plan.decoder_seq_lens:
        ids, mask, _ = sample_chat_inputs(
            model_dir, seq_len=t, samples=1, vocab_size=spec.vocab_size, seed=plan.seed
        )
        res = runner.run(
            f"decoder/{t}",
            f"SmolLM2-135M (packaged, 30 layers + LM head) T={t}: secfwt softmax",
            model_owner={"spec": spec, "state": state},
            data_owner={"input": state[spec.word_embeddings][ids], "mask": mask.float()},
            common={"case": "secure_decoder", "input_shape": (1, t), "reps": plan.decoder_reps},
        )
        s = case_summary(res)
        plain = time_plaintext(
            lambda ids=ids, mask=mask: hf(input_ids=ids, attention_mask=mask),
            reps=plan.plaintext_reps,
        )
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits
        s.update(seq_len=t, batch=1, plaintext=plain)
        s["max_abs_err"] = max_err(outputs(res["values"][Role.DATA_OWNER]), ref)  # every rep
        s["vs_plaintext_ratio"] = metrics.ratio(s["time_s"], plain["best_s"])
        cases.append(s)
    return {
        "model": f"{MODEL} (LlamaForCausalLM, dequantized Q4_1; vocabulary {spec.vocab_size})",
        "cases": cases,
        "zo_step": _zo_step(plan, runner, spec, state, model_dir),
    }


def _zo_step(
    plan: BenchPlan, runner: Runner, spec: ModelSpec, state: dict[str, torch.Tensor], model_dir: Any
) -> dict[str, Any]:
    from secfwt.config import load_job
    from secfwt.models.decoder import DecoderModel
    from secfwt.models.ops import PlainOps
    from secfwt.models.transformer import ForwardSettings, plain_params
    from secfwt.runtime.data_owner import prepare_instruction_inputs
    from secfwt.tuning.causal_lm import causal_prefix
    from secfwt.tuning.trainable import initial_values, trainable_set

    job = importlib.resources.files("secfwt.jobs").joinpath(EXAMPLE_JOB)
    with importlib.resources.as_file(job) as path:
        cfg = load_job(path)
    trainable = trainable_set(cfg, spec)
    if cfg.zo.soft_prompt_length:
        raise ConfigError(f"bench decoder: {EXAMPLE_JOB} trains a soft prompt; not benchmarked")
    cut = trainable.first_layer(spec)
    data = prepare_instruction_inputs(cfg, tokenizer_dir=model_dir)
    b, r = cfg.zo.batch_size, cfg.model.response_window
    params = plain_params(state)
    model = DecoderModel(spec, params, PlainOps(), ForwardSettings())
    word = params[spec.word_embeddings][data.input_ids[:b]]
    mask = data.attention_mask[:b].double()
    cache = causal_prefix(model, word, mask, cut=cut, window=r).float()  # (B, T or R, H)
    init = initial_values(spec, state, trainable, seed=cfg.job.seed)
    upper = [
        n
        for n, _ in spec.param_shapes
        if n not in trainable.names
        and n != spec.word_embeddings
        and not any(n.startswith(f"{spec.prefix}layers.{i}.") for i in range(cut))
    ]
    step = {
        "trainable": dict(trainable.shapes),
        "frozen_names": upper,
        "cut": cut,
        "batch": b,
        "window": r,
        "cache_shape": tuple(cache.shape),
        "lr": cfg.zo.lr,
        "eps": cfg.zo.eps,
        "directions": cfg.zo.directions,
        "seed": plan.seed,
    }
    res = runner.run(
        "decoder/zo-step",
        f"{cfg.job.name}: one ZO step (B={b}, R={r}, {cfg.zo.directions} direction(s), "
        f"layers {cut}..{spec.num_layers - 1} per step)",
        model_owner={"spec": spec, "state": state, "init": init},
        data_owner={
            "cache": cache,
            "mask": mask.float(),
            "rows": state[spec.word_embeddings][data.target_ids[:b]],
            "weights": data.target_weights[:b].float(),
        },
        common={"case": "causal_zo_step", "reps": plan.step_reps, **step},
    )
    s = case_summary(res)
    each = [float(v) for v in outputs(res["values"][Role.DATA_OWNER])]  # every repetition's
    s["loss"] = each[s["rep"]]  # the one whose cost counts
    s["loss_each_rep"] = each
    s["loss_reference"] = _plain_step_loss(spec, params, cache, mask, data, trainable, init, step)
    s["max_abs_err"] = max(abs(v - s["loss_reference"]) for v in each)
    s.update(
        job=cfg.job.name,
        batch=b,
        response_window=r,
        directions=cfg.zo.directions,
        cut=cut,
        loss_rows=2 * cfg.zo.directions * b * r,
        trainable=list(trainable.names),
    )
    return s


def _plain_step_loss(
    spec: ModelSpec,
    params: dict[str, torch.Tensor],
    cache: torch.Tensor,
    mask: torch.Tensor,
    data: Any,
    trainable: Any,
    init: dict[str, torch.Tensor],
    step: dict[str, Any],
) -> float:
    """The same step's mean loss in float64 (what the secure step must reproduce)."""
    from secfwt.models.ops import PlainOps
    from secfwt.models.transformer import ForwardSettings
    from secfwt.tuning.causal_lm import CausalLMForward, ResponseTargets
    from secfwt.tuning.spsa import SPSASettings, directions, spsa_step

    b = step["batch"]
    table = params[spec.word_embeddings]
    runner = CausalLMForward(
        ops=PlainOps(),
        spec=spec,
        frozen={k: v for k, v in params.items() if k not in trainable.names},
        settings=ForwardSettings(),
        cache=cache.double(),
        mask=mask,
        targets=ResponseTargets(
            rows=table[data.target_ids[:b]], weights=data.target_weights[:b].double()
        ),
        cut=step["cut"],
        window=step["window"],
    )
    spsa = SPSASettings(lr=step["lr"], eps=step["eps"], directions=step["directions"])
    us = directions(seed=step["seed"], step=0, shapes=trainable.shapes, count=spsa.directions)
    theta = {n: init[n].double() for n in trainable.names}
    idx = list(range(b))
    _new, _gs, mean = spsa_step(
        lambda ps: runner.losses(ps, idx), theta, us=us, settings=spsa, cast=lambda u: u.double()
    )
    return float(mean)


__all__ = ["decoder"]
