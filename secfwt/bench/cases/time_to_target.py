"""The ``time-to-target`` sub-benchmark: time and bytes to the same held-out accuracy gain, secfwt's
default job against MPC fine-tuning by backpropagation in CrypTen.

The setup it measures is the docstring of :func:`time_to_target`, which the report quotes as
``setup``. Steps to the target come from each method's plaintext twin
(:mod:`secfwt.bench.steps_to_target`); what a step (and the one-time frozen prefix) costs is
measured in MPC, every loss and output checked against float64 plaintext as in
:mod:`.fot_vs_backprop`.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from secfwt.bench import metrics
from secfwt.bench.cases.fot_vs_backprop import LOSS_TOLERANCE, flag_wrong, loss_row, plain_losses
from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner, case_summary, max_err, pick
from secfwt.bench.shapes import FULL_MODELS, hidden_states, synthetic_model
from secfwt.bench.steps_to_target import Job, backprop_twin, zo_twin
from secfwt.models.spec import Attention, Head, Pooling
from secfwt.roles import Role

#: The job whose accuracy gain is the target (``make run``'s).
DEFAULT_JOB = Path(__file__).resolve().parents[2] / "jobs" / "default.toml"


def time_to_target(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    """Time and bytes to +``tta_gain`` held-out accuracy on the default job's data, secfwt's
    default job against MPC backpropagation (top layer + head; the full model).

    Steps to target (plaintext twins, evaluated on the job's 60 held-out rows after every
    step; the first step from which the gain holds for ``tta_confirm`` more steps):
    secfwt: the default job replayed in float64 (``plain_zo_run``, as ``make run``'s replay)
    at each of ``tta_seeds`` joint seeds, the median counting (the spread is reported).
    Backprop: full-batch SGD with exact gradients (48 training rows a step, as the job's
    batch) through secfwt's float64 encoder from the same checkpoint and initial head, the
    top layer + classifier (learning rate ``tta_lr_top``) or every weight but the word
    embeddings (``tta_lr_full``), at most ``tta_max_steps`` steps; the rates were chosen by a
    plaintext sweep (docs/benchmarks.md).
    Cost per step, in MPC on a ``tta_model``-shaped model (random weights at unit gain, as
    ``fot-vs-full-ft``), batch ``tta_batch``, T=``tta_seq_len``: secfwt: the default job's ZO
    step, ``tta_directions`` directions (2 x that many heads in one batched forward) on the
    classifier from the mean-pooled cached features, each row's logits and losses
    range-checked as the job does. Backprop: ``fot-vs-backprop``'s step (top layer and
    classifier from the cached prefix) and ``fot-vs-full-ft``'s (every weight secret from
    the embeddings' output), both with the default job's mean pooling, so every position of
    the top layer is computed; CrypTen autograd + SGD on secfwt's engine.
    One-time costs, measured in MPC: the frozen prefix over the ``tta_prefix_rows`` training
    rows (chunks of ``tta_prefix_chunk``, range-checked, frozen weights held by the model
    owner): all layers and mean pooling for secfwt, the layers below the top one for top-layer
    backprop, none for full fine-tuning. Held-out evaluations are left out of every total.
    Totals = one-time + steps x per step, for the measured time and bytes and for the LAN and
    WAN models of the bench (the projections add up section by section).
    """
    job = Job.load(DEFAULT_JOB)
    gain, confirm = plan.tta_gain, plan.tta_confirm
    twins = {
        "zo": zo_twin(job, seeds=plan.tta_seeds, gain=gain, confirm=confirm),
        "backprop_top": backprop_twin(
            job, top=1, lr=plan.tta_lr_top, max_steps=plan.tta_max_steps, gain=gain, confirm=confirm
        ),
        "backprop_full": backprop_twin(
            job,
            top=None,
            lr=plan.tta_lr_full,
            max_steps=plan.tta_max_steps,
            gain=gain,
            confirm=confirm,
        ),
    }
    zo_steps = [r["steps"] for r in twins["zo"]["runs"]]
    steps = {
        "zo": None if None in zo_steps else statistics.median_low(zo_steps),
        "backprop_top": twins["backprop_top"]["steps"],
        "backprop_full": twins["backprop_full"]["steps"],
    }
    costs, wrong = _mpc_costs(plan, runner)
    methods = {
        key: _total(costs[key], costs.get(f"{key}_one_time"), steps[key])
        for key in ("zo", "backprop_top", "backprop_full")
    }
    zo = methods["zo"]
    return {
        "setup": time_to_target.__doc__,
        "target_gain": gain,
        "confirm_steps": confirm,
        "twins": twins,
        "zo_steps_spread": {"min": min(zo_steps, default=None), "max": max(zo_steps, default=None)}
        if None not in zo_steps
        else None,
        "steps": steps,
        "methods": methods,
        "cases": [c for k, c in costs.items() if k != "zo_one_time"],  # measured sections
        "loss_tolerance": LOSS_TOLERANCE,
        "wrong_results": wrong,
        **_ratios("", methods["backprop_full"], zo, wrong),
        **_ratios("top_layer_", methods["backprop_top"], zo, wrong),
    }


def _mpc_costs(plan: BenchPlan, runner: Runner) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each MPC section's summary, checked against float64 plaintext, by key: ``zo``,
    ``backprop_top``, ``backprop_full`` (one step each) and ``zo_one_time``,
    ``backprop_top_one_time`` (the frozen prefix)."""
    from secfwt.bench.cases.fot_vs_full_ft import unit_gain

    shape, layers = FULL_MODELS[plan.tta_model]
    spec, state, _ = synthetic_model(
        shape, layers=layers, head=Head.SEQUENCE_CLASSIFICATION, seed=plan.seed
    )
    state = unit_gain(spec, state, seed=plan.seed)
    b, t, h = plan.tta_batch, plan.tta_seq_len, shape.hidden
    labels = torch.arange(b) % 2
    x = hidden_states(batch=b, seq_len=t, hidden=h, seed=plan.seed + 3)  # (B, T, H)
    pooled = hidden_states(batch=b, seq_len=1, hidden=h, seed=plan.seed + 5)[:, 0]  # (B, H)
    mo = {"spec": spec, "state": state}
    common = {"batch": b, "seq_len": t, "seed": plan.seed, "reps": plan.step_reps}
    desc = f"{shape.name}-shaped, {layers} layers, B={b}, T={t}"
    tag = f"tta/{plan.tta_model}/{b}/{t}"
    head = ["classifier.*"]  # mean pooling, as the default job's model: no pooler
    wrong: list[str] = []
    out: dict[str, dict[str, Any]] = {}

    zo = runner.run(
        f"{tag}/zo",
        f"default job's ZO step: classifier head, {plan.tta_directions} directions, "
        f"range-checked ({desc})",
        model_owner=mo,
        data_owner={"input": pooled, "labels": labels},
        common={
            **common,
            "case": "fot_step",
            "attention": Attention.SOFTMAX,
            "pooling": Pooling.MEAN,
            "range_check": True,
            "trainable": ["classifier.*"],
            "directions": plan.tta_directions,
        },
    )
    out["zo"] = loss_row(zo, _head_loss(spec, state, pooled, labels), wrong)
    out.update(_prefix(plan, runner, spec, state, tag, wrong))
    for key, cut, trainable, what in (
        (
            "backprop_top",
            layers - 1,
            [f"{spec.prefix}encoder.layer.{layers - 1}.*", *head],
            "top layer + head from the cached prefix",
        ),
        (
            "backprop_full",
            0,
            [f"{spec.prefix}encoder.layer.*", *head],
            "every weight secret, from the embeddings' output",
        ),
    ):
        res = runner.run(
            f"{tag}/{key}",
            f"backprop step, CrypTen autograd + SGD, {what} ({desc})",
            model_owner=mo,
            data_owner={"input": x, "labels": labels},
            common={
                **common,
                "case": "backprop_step",
                "trainable": trainable,
                "pooling": Pooling.MEAN,  # as the twins: every position of the top layer
            },
        )
        ref = plain_losses(
            spec, state, x, labels, cut=cut, attention=Attention.SOFTMAX, pooling=Pooling.MEAN
        )
        out[key] = loss_row(res, float(ref[0]), wrong)
    return out, wrong


def _head_loss(
    spec: Any, state: dict[str, torch.Tensor], pooled: torch.Tensor, labels: torch.Tensor
) -> float:
    """float64 mean loss of the classifier on pooled features (B, H), the head-only ZO step's
    starting point."""
    from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
    from secfwt.models.ops import PlainOps

    ops = PlainOps()
    model = EncoderModel(spec, plain_params(state), ops, ForwardSettings(pooling=Pooling.MEAN))
    onehot = torch.nn.functional.one_hot(labels, spec.num_labels).double()
    return float(ops.log_softmax_nll(model.classify(pooled.double()), onehot).mean())


def _prefix(
    plan: BenchPlan,
    runner: Runner,
    spec: Any,
    state: dict[str, torch.Tensor],
    tag: str,
    wrong: list[str],
) -> dict[str, dict[str, Any]]:
    """The one-time frozen prefix over the training rows, both sections checked against the
    float64 prefix (largest |difference| of a revealed value, :data:`LOSS_TOLERANCE`)."""
    from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
    from secfwt.models.ops import PlainOps
    from secfwt.tuning.forward import mean_pool_weights

    n, t = plan.tta_prefix_rows, plan.tta_seq_len
    word = hidden_states(batch=n, seq_len=t, hidden=spec.hidden_size, seed=plan.seed + 7)
    res = runner.run(
        f"{tag}/prefix/{n}",
        f"frozen prefix over {n} training rows (chunks of {plan.tta_prefix_chunk}, range-checked)",
        model_owner={"spec": spec, "state": state},
        data_owner={"input": word},
        common={
            "case": "frozen_prefix",
            "rows": n,
            "seq_len": t,
            "chunk": plan.tta_prefix_chunk,
            "attention": Attention.SOFTMAX,
        },
    )
    model = EncoderModel(
        spec, plain_params(state), PlainOps(), ForwardSettings(pooling=Pooling.MEAN)
    )
    mask = torch.ones(n, t, dtype=torch.float64)
    top = spec.num_layers - 1
    hidden = model.layers(model.embed(word.double()), mask, stop=top)  # (n, t, H)
    pooled = model.pool(model.layers(hidden, mask, start=top), mean_pool_weights(mask))  # (n, H)
    vals = res["values"]
    below = case_summary(res)
    below.update(
        label=f"{res['label']}: layers below the top one",
        max_abs_err=max_err(vals[Role.DATA_OWNER]["hidden"], hidden),
    )
    upper = pick({r: v["top_costs"] for r, v in vals.items()})
    upper.update(
        label=f"{res['label']}: top layer + mean pooling",
        max_abs_err=max_err(vals[Role.DATA_OWNER]["output"], pooled),
    )
    for s in (below, upper):
        s["recomputed_rows"] = vals[Role.MODEL_OWNER]["recomputed"]
        flag_wrong(s, wrong)
    return {
        "backprop_top_one_time": below,
        "zo_one_time": {**_add(below, upper), "label": f"{res['label']}: all layers + pooling"},
        "prefix_top_layer": upper,
    }


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two measured sections one after the other: times, bytes, rounds and projections add."""
    return {
        "time_s": a["time_s"] + b["time_s"],
        "bytes_sent_total": a["bytes_sent_total"] + b["bytes_sent_total"],
        "dealer_bytes": a["dealer_bytes"] + b["dealer_bytes"],
        "rounds": a["rounds"] + b["rounds"],
        "projected_s": {k: a["projected_s"][k] + b["projected_s"][k] for k in a["projected_s"]},
        "max_abs_err": max(a["max_abs_err"] or 0.0, b["max_abs_err"] or 0.0),
    }


def _total(
    step: dict[str, Any], one_time: dict[str, Any] | None, steps: int | None
) -> dict[str, Any]:
    """One method's cost to target: one-time + steps x per step (None when the twin did not
    reach the target)."""
    keys = ("time_s", "bytes_sent_total")
    per = {k: step[k] for k in keys} | {f"{k}_s": v for k, v in step["projected_s"].items()}
    once = (
        {k: 0.0 for k in per}
        if one_time is None
        else {k: one_time[k] for k in keys}
        | {f"{k}_s": v for k, v in one_time["projected_s"].items()}
    )
    return {
        "steps": steps,
        "per_step": per,
        "one_time": once,
        "total": None if steps is None else {k: once[k] + steps * per[k] for k in per},
    }


def _ratios(
    prefix: str, base: dict[str, Any], zo: dict[str, Any], wrong: list[str]
) -> dict[str, Any]:
    """backprop / secfwt totals (time, bytes, LAN, WAN); None where a total is missing or a
    case computed a wrong result."""
    keys = {"time": "time_s", "bytes": "bytes_sent_total", "lan_time": "LAN_s", "wan_time": "WAN_s"}
    ok = not wrong and base["total"] is not None and zo["total"] is not None
    return {
        f"{prefix}{name}_to_target_ratio": metrics.ratio(base["total"][k], zo["total"][k])
        if ok
        else None
        for name, k in keys.items()
    }


__all__ = ["DEFAULT_JOB", "time_to_target"]
