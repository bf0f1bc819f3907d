"""The ``fot-vs-full-ft`` sub-benchmark: SecFwT's own pairing, one tuning iteration of secfwt's
forward-only tuning against one iteration of MPC full fine-tuning by backpropagation.

The setup it measures is the docstring of :func:`fot_vs_full_ft`, which the report quotes as
``setup``. Every iteration's loss is checked against float64 plaintext (as in
:mod:`.fot_vs_backprop`); a baseline whose loss is wrong is called out and its ratios are not
reported as the headline. A case whose parties fail (killed for memory, timed out) is
reported as failed, with no ratios, and the row's other iterations still run and are checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from secfwt.bench import metrics
from secfwt.bench.cases.fot_vs_backprop import (
    LOSS_TOLERANCE,
    fastest_right,
    flag_wrong,
    loss_row,
    plain_losses,
)
from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import CaseFailed, Runner
from secfwt.bench.shapes import FULL_MODELS, hidden_states, synthetic_model
from secfwt.errors import ConfigError
from secfwt.models.spec import Attention, Head, Pooling
from secfwt.roles import Role


def fot_vs_full_ft(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    """One forward-only tuning iteration vs one iteration of MPC full fine-tuning, same model,
    batch and sequence length (the pairing of SecFwT,
    Luo et al., arXiv 2506.15307).

    Model: each of ``full_ft_models`` (MiniLM: the packaged all-MiniLM-L6-v2's shape, 6 layers;
    BERT-base: 12 layers) as a BERT classifier with random weights, at each of
    ``full_ft_seq_lens``. Every case starts from the same shared hidden states (N, T, H): the
    embedding tables and their LayerNorm are in neither iteration.
    Full fine-tuning (the baseline, what CrypTen offers): every weight of every layer, the
    pooler and the classifier secret-shared by the model owner; CrypTen autograd over
    :mod:`secfwt.bench.vanilla` (CrypTen's softmax), ``cross_entropy``, ``backward()``,
    ``crypten.optim.SGD.step()``, on secfwt's engine (ring matmul on).
    ZO with the top layers secret (``fot_layer_vs_full_ft_*``): the step of ``fot-vs-backprop``,
    one SPSA step with ``fot_directions`` direction(s), two forwards each, training the top
    ``fot_layers`` layer(s), pooler and classifier (secret) from the cached frozen prefix of the
    layers below (computed once per training row, not per iteration, so not in the iteration),
    with softmax and with RFA; the faster of the two counts (RFA pays off at long T).
    ZO with owner-held weights (the configuration a job uses to tune more than a head): the
    same step training LoRA factors of rank ``fot_lora_rank`` and the classifier (secret),
    every other weight of those layers and the pooler held by the model owner
    (secfwt.mpc.owned), the factors drawn at unit gain so that the loss check sees them; in
    two placements: on the top layers' query and value projections
    (``fot_lora_qv_vs_full_ft_*``), with softmax and with RFA, the faster counting (its
    attention is the report's ``zo_attention``, which CMA-ES uses too); and on their
    feed-forward layers (``fot_lora_ffn_vs_full_ft_*``), where the first trained layer's
    attention half depends on no trainable value and joins the cached prefix
    (:meth:`secfwt.tuning.trainable.TrainableSet.attention_frozen`), so a step runs that
    layer's feed-forward half only. The headline ``fot_vs_full_ft_*`` is the faster placement
    (``zo_lora_placement``).
    Every iteration runs at least twice in one session and its faster run counts: the first
    also measures each matmul class's method and sends each frozen weight's mask once.
    CMA-ES (``fot_cma_vs_full_ft_*``): one iteration of SecFwT's black-box prompt tuning with a
    population of ``cma_population`` prompts of ``cma_prompt_length`` tokens entering the top
    layer (as secfwt/jobs/prompt_tuning_rfa.toml), the frozen top layer and head held by the
    model owner (secfwt.mpc.owned), with the attention the ZO step found faster; the candidates'
    logits go to the data owner, which scores them (the first run: ``first_rep`` in the report).
    With ``full_ft_pooling`` CLS (the default) the head reads token 0 through BERT's pooler,
    so every iteration computes the top layer at that position only (its query, attention
    output and feed-forward; keys and values from every position):
    :meth:`secfwt.models.encoder.EncoderModel.top_layers` for secfwt, ``vanilla.block``'s
    ``query_rows`` for full fine-tuning, whose backward reaches every weight (before commit
    771217d CrypTen's backward stopped at the pooler: ``vanilla._first``). With MEAN (the
    default job's pooling) the classifier reads the mean over tokens, there is no pooler, and
    every iteration computes the top layer at every position.
    Every linear weight is drawn at unit gain (std 1/sqrt(fan-in), about a trained model's
    scale, not BERT's initial 0.02), so each layer changes its input and the loss depends on
    the whole computation: the check against float64 plaintext then tells a right iteration
    from a wrong one (with BERT's initialisation every layer is close to the identity and
    every loss close to ln 2). Costs in MPC do not depend on the values.
    """
    for model_name in plan.full_ft_models:
        if FULL_MODELS[model_name][1] <= plan.fot_layers:
            raise ConfigError(
                f"bench: fot_layers={plan.fot_layers} leaves no frozen layer in {model_name} "
                f"({FULL_MODELS[model_name][1]} layers); set fot_layers lower"
            )
    rows, wrong = [], []
    for model_name in plan.full_ft_models:
        for t in plan.full_ft_seq_lens:
            rows.append(_row(plan, runner, model_name, t, wrong))
    head = rows[0]
    return {
        "setup": fot_vs_full_ft.__doc__,
        "batch": plan.fot_batch,
        "directions": plan.fot_directions,
        "population": plan.cma_population,
        "prompt_length": plan.cma_prompt_length,
        "loss_tolerance": LOSS_TOLERANCE,
        "pairings": rows,
        "cases": [c for r in rows for c in r["cases"]],
        "wrong_results": wrong,
        "headline_row": f"{head['model']}, T={head['seq_len']}",
        **{k: head[k] for k in _RATIO_KEYS},
    }


_RATIO_KEYS = (
    "fot_vs_full_ft_time_ratio",
    "fot_vs_full_ft_bytes_ratio",
    "fot_lora_qv_vs_full_ft_time_ratio",
    "fot_lora_qv_vs_full_ft_bytes_ratio",
    "fot_lora_ffn_vs_full_ft_time_ratio",
    "fot_lora_ffn_vs_full_ft_bytes_ratio",
    "fot_layer_vs_full_ft_time_ratio",
    "fot_layer_vs_full_ft_bytes_ratio",
    "fot_cma_vs_full_ft_time_ratio",
    "fot_cma_vs_full_ft_bytes_ratio",
)


def _row(
    plan: BenchPlan, runner: Runner, model_name: str, t: int, wrong: list[str]
) -> dict[str, Any]:
    """The cases of one model and sequence length, with their ratios."""
    shape, layers = FULL_MODELS[model_name]
    spec, state, _ = synthetic_model(
        shape, layers=layers, head=Head.SEQUENCE_CLASSIFICATION, seed=plan.seed
    )
    state = unit_gain(spec, state, seed=plan.seed)
    b = plan.fot_batch
    x = hidden_states(batch=b, seq_len=t, hidden=shape.hidden, seed=plan.seed + 3)
    labels = torch.arange(b) % 2
    cut = layers - plan.fot_layers
    mo = {"spec": spec, "state": state}
    do = {"input": x, "labels": labels}
    # every iteration at least twice in one session, the faster counting: the first also
    # measures each matmul class's method (secfwt.mpc.ring_tuning) and sends each frozen
    # weight's mask once, costs of a session, not of an iteration
    pooling = plan.full_ft_pooling
    common = {
        "batch": b,
        "seq_len": t,
        "seed": plan.seed,
        "reps": max(2, plan.step_reps),
        "pooling": pooling,
    }
    desc = f"{shape.name}-shaped, {layers} layers, B={b}, T={t}, {pooling.value} pooling"
    tag = f"full-ft/{model_name}/{t}/{pooling.value}"
    # mean pooling feeds the classifier directly (secfwt's encoder and vanilla.classify): the
    # pooler is not in the model, so neither side trains it
    head = (
        ["classifier.*"] if pooling is Pooling.MEAN else [f"{spec.prefix}pooler.*", "classifier.*"]
    )

    def run(key: str, label: str, *, owner: dict[str, Any] = mo, **extra: Any) -> dict[str, Any]:
        return runner.run(
            f"{tag}/{key}", label, model_owner=owner, data_owner=do, common={**common, **extra}
        )

    def plain(cut: int, attention: Attention, prompts: torch.Tensor | None = None) -> Any:
        return plain_losses(
            spec, state, x, labels, cut=cut, attention=attention, prompts=prompts, pooling=pooling
        )

    def checked(
        key: str, label: str, check: Callable[[dict[str, Any]], dict[str, Any]], **extra: Any
    ) -> dict[str, Any]:
        """The case's summary as ``check`` makes it from the case's result (each checks the
        loss against float64), or, when the case's parties fail (at T=512 a case can outgrow
        the machine's memory: the baseline first, CMA-ES's population next), an entry saying
        so: the row's other iterations are still measured and checked, and every ratio with
        the failed case is left out."""
        try:
            res = run(key, label, **extra)
        except CaseFailed as exc:
            return {"label": label, "failed": f"{type(exc.cause).__name__}: {exc}"}
        return check(res)

    def fastest(*keys: str) -> str:
        """The key of the fastest case that completed (the first key when none did)."""
        done = [k for k in keys if "failed" not in cases[k]]
        return min(done, key=lambda k: cases[k]["time_s"]) if done else keys[0]

    cases = {
        "full_ft": checked(
            "full_ft",
            f"full fine-tuning step, every weight secret, CrypTen autograd + SGD ({desc})",
            lambda res: loss_row(res, float(plain(0, Attention.SOFTMAX)[0]), wrong),
            case="backprop_step",
            trainable=[f"{spec.prefix}encoder.layer.*", *head],
        )
    }
    top = [f"{spec.prefix}encoder.layer.{i}.*" for i in range(cut, layers)] + head

    def lora_step(
        key: str, what: str, modules: list[str], att: Attention, *, ffn: bool = False
    ) -> dict[str, Any]:
        """A ZO step training LoRA factors on ``modules`` and the classifier (secret), every
        other weight the model owner's, checked against float64; ``ffn``: the modules are the
        feed-forward layers (the first one's attention half is then in the cached prefix)."""
        owner_state = {**state, **_lora_pairs(spec, state, modules, rank=plan.fot_lora_rank)}
        placement = "feed-forward (intermediate and output dense)" if ffn else "query and value"

        def check(res: dict[str, Any]) -> dict[str, Any]:
            reference = plain_losses(
                spec,
                owner_state,
                x,
                labels,
                cut=cut,
                attention=att,
                attention_cached=ffn,
                pooling=pooling,
            )
            return loss_row(res, float(reference[0]), wrong)

        return checked(
            key,
            f"forward-only SPSA step, {what}, LoRA r={plan.fot_lora_rank} on the top "
            f"{plan.fot_layers} layer(s)' {placement} + classifier (secret), "
            f"owner-held weights ({desc})",
            check,
            owner={"spec": spec, "state": owner_state},
            case="fot_step",
            attention=att,
            trainable=["classifier.*"],
            lora_modules=modules,
            lora_rank=plan.fot_lora_rank,
            directions=plan.fot_directions,
        )

    def layer_step(att: Attention) -> dict[str, Any]:
        """A ZO step training the top layers and the head (secret), checked against float64."""
        return checked(
            f"zo_{att.value}",
            f"forward-only SPSA step, secfwt {att.value}, top {plan.fot_layers} layer(s) + head "
            f"from the cached prefix ({desc})",
            lambda res: loss_row(res, float(plain(cut, att)[0]), wrong),
            case="fot_step",
            attention=att,
            trainable=top,
            directions=plan.fot_directions,
        )

    for att in (Attention.SOFTMAX, Attention.RFA):
        cases[f"zo_{att.value}"] = layer_step(att)
        cases[f"zo_lora_{att.value}"] = lora_step(
            f"zo_lora_{att.value}", f"secfwt {att.value}", _lora_modules(spec, cut, layers), att
        )
    layer_key = fastest("zo_softmax", "zo_rfa")
    qv_key = fastest("zo_lora_softmax", "zo_lora_rfa")
    att = Attention(qv_key.removeprefix("zo_lora_"))
    cases["zo_lora_ffn"] = lora_step(
        "zo_lora_ffn",
        f"layer {cut}'s attention half in the cached prefix",
        _lora_modules(spec, cut, layers, ffn=True),
        att,
        ffn=True,
    )
    zo_key = fastest(qv_key, "zo_lora_ffn")

    def cma_row(res: dict[str, Any]) -> dict[str, Any]:
        return _cma_row(res, lambda cands: plain(cut, att, cands), wrong)

    cases["cma"] = checked(
        "cma",
        f"forward-only CMA-ES iteration, secfwt {att.value}, population {plan.cma_population} "
        f"x {plan.cma_prompt_length}-token prompt at layer {cut}, owner-held weights ({desc})",
        cma_row,
        case="cma_step",
        attention=att,
        prompt_layer=cut,
        population=plan.cma_population,
        prompt_length=plan.cma_prompt_length,
        intrinsic_dim=plan.cma_intrinsic_dim,
    )
    base, layer, zo, cm = cases["full_ft"], cases[layer_key], cases[zo_key], cases["cma"]
    qv, ffn_row = cases[qv_key], cases["zo_lora_ffn"]
    base_ok = base["label"] not in wrong and "failed" not in base
    return {
        "model": model_name,
        "shape": shape.describe(),
        "layers": layers,
        "seq_len": t,
        "pooling": pooling.value,
        "zo_attention": att.value,
        "zo_lora_placement": "feed-forward" if zo_key == "zo_lora_ffn" else "query and value",
        "baseline_correct": base_ok,
        "baseline_failed": base.get("failed"),
        "cases": list(cases.values()),
        **_ratios("fot_vs_full_ft", base, zo, wrong),
        **_ratios("fot_lora_qv_vs_full_ft", base, qv, wrong),
        **_ratios("fot_lora_ffn_vs_full_ft", base, ffn_row, wrong),
        **_ratios("fot_layer_vs_full_ft", base, layer, wrong),
        **_ratios("fot_cma_vs_full_ft", base, cm, wrong),
    }


def _lora_modules(spec: Any, cut: int, layers: int, *, ffn: bool = False) -> list[str]:
    """The query and value projections of the trainable top layers (LoRA's usual placement,
    Hu et al., ICLR 2022), or with ``ffn`` their feed-forward layers (the placement He et al.,
    ICLR 2022, found as effective per parameter; the attention half of the first of those
    layers is then frozen and cached)."""
    if ffn:
        names = ("intermediate.dense", "output.dense")
        return [f"{spec.prefix}encoder.layer.{i}.{m}" for i in range(cut, layers) for m in names]
    return [
        f"{spec.prefix}encoder.layer.{i}.attention.self.{m}"
        for i in range(cut, layers)
        for m in ("query", "value")
    ]


def _lora_pairs(
    spec: Any, state: dict[str, torch.Tensor], modules: list[str], *, rank: int
) -> dict[str, torch.Tensor]:
    """LoRA factors for ``modules`` as a trained adapter might hold them: A (r, in) at std
    1/sqrt(in), B (out, r) at std 1/sqrt(r), so each adapter adds a unit-gain term and the
    loss check can see it (LoRA's own initialisation, B = 0, would hide a wrong product)."""
    from secfwt.models.transformer import LORA_A, LORA_B

    g = torch.Generator().manual_seed(17)
    out = {}
    for m in modules:
        w_out, w_in = state[f"{m}.weight"].shape
        out[f"{m}.{LORA_A}"] = torch.randn(rank, w_in, generator=g) / w_in**0.5
        out[f"{m}.{LORA_B}"] = torch.randn(w_out, rank, generator=g) / rank**0.5
    return out


def unit_gain(spec: Any, state: dict[str, torch.Tensor], *, seed: int) -> dict[str, torch.Tensor]:
    """``state`` with every linear weight (out, in) redrawn at std 1/sqrt(in)."""
    g = torch.Generator().manual_seed(seed + 11)
    out = dict(state)
    for name, w in state.items():
        if spec.is_linear_weight(name):
            out[name] = torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5
    return out


def _ratios(
    key: str, base: dict[str, Any], fot: dict[str, Any], wrong: list[str]
) -> dict[str, float | None]:
    """full fine-tuning / forward-only time and bytes; None when either loss is wrong (its
    cost measures a broken computation) or either case failed."""
    if any(c["label"] in wrong or "failed" in c for c in (base, fot)):
        return {f"{key}_time_ratio": None, f"{key}_bytes_ratio": None}
    return {
        f"{key}_time_ratio": metrics.ratio(base["time_s"], fot["time_s"]),
        f"{key}_bytes_ratio": metrics.ratio(base["bytes_sent_total"], fot["bytes_sent_total"]),
    }


def _cma_row(
    res: dict[str, Any],
    reference: Callable[[torch.Tensor], torch.Tensor],
    wrong: list[str],
) -> dict[str, Any]:
    """The CMA-ES case's summary: each iteration's candidates' losses (pop,) against their
    float64 ``reference(candidates)``. Its repetitions are successive iterations, each asking
    for new candidates; costs do not depend on the values, so, as :func:`loss_row` does, the
    fastest iteration whose every loss is right counts, and the others are counted."""
    do = res["values"][Role.DATA_OWNER]
    losses, cands = do["output_each_rep"], do["candidates_each_rep"]  # per rep: (pop,), (pop, P, H)
    refs = [reference(c) for c in cands]
    errs = [float((v.double() - r).abs().max()) for v, r in zip(losses, refs, strict=True)]
    s = fastest_right(res, errs)
    i = s["rep"]
    s.update(
        loss=float(losses[i].mean()),
        loss_reference=float(refs[i].mean()),
        max_abs_err=errs[i],
        loss_each_rep=[float(v.mean()) for v in losses],
        loss_reference_each_rep=[float(r.mean()) for r in refs],
        trainable_numel=res["values"][Role.MODEL_OWNER]["trainable_numel"],
    )
    flag_wrong(s, wrong)
    return s


__all__ = ["fot_vs_full_ft", "unit_gain"]
