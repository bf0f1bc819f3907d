"""One computing party's side of a tuning job (both modes), run inside its own process.

Data path: agree on terms -> data owner announces public dataset facts -> model owner loads
and shares weights -> data owner shares its inputs -> the frozen prefix (everything below the
first trainable value) is computed once per example and kept as shares -> evaluate -> tune
(:mod:`secfwt.tuning.loops` on secret shares: SPSA/DP-ZO on shared parameters, or the SecFwT
prompt search local to the data owner) -> evaluate -> reveal per terms -> artifacts.

The job comes in as a :class:`~secfwt.runtime.contract.PartyJob` and the result goes back as
a :class:`~secfwt.runtime.contract.PartyOutcome` (:mod:`secfwt.runtime.contract`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from secfwt.config import JobConfig, Mode
from secfwt.data.inputs import DataOwnerInputs, InstructionInputs
from secfwt.errors import ConfigError
from secfwt.models.encoder import EncoderModel
from secfwt.models.spec import EmbeddingMode, Head, ModelSpec
from secfwt.mpc.disclosure import Revealable
from secfwt.mpc.launcher import PartyContext
from secfwt.mpc.session import traffic_now
from secfwt.mpc.traffic import Traffic
from secfwt.roles import Role
from secfwt.runtime.artifacts import AdapterExport, deliver
from secfwt.runtime.backend import SharedBackend, SharedPromptScorer
from secfwt.runtime.causal import causal_runner, check_causal_model, lm_head_params
from secfwt.runtime.checkpoint import (
    PREFIX_AFTER_ATTENTION,
    PREFIX_AT_LAYER,
    Checkpoint,
    from_share,
    precision_bits,
)
from secfwt.runtime.checkpointer import JobCheckpointer, agree_checkpointing, restore_theta
from secfwt.runtime.contract import (
    ComparisonJob,
    ComparisonOutcome,
    ModelFacts,
    PartyJob,
    PartyOutcome,
    StepRecord,
    VariantOutcome,
    public_job_digest,
)
from secfwt.runtime.gate import WITHHELD, GateDecision, SafetyGate, build_gate
from secfwt.runtime.inputs import disclose_table, share_rows, share_word_embeddings
from secfwt.runtime.range_checks import OUTPUT_BOUND, RangeChecks
from secfwt.runtime.session import PartySession
from secfwt.tuning.causal_lm import CausalLMForward
from secfwt.tuning.cma import CMASettings, PromptSearch
from secfwt.tuning.forward import CachedForward, forward_settings, prefix
from secfwt.tuning.loops import ZOSchedule, ZOStepHook, cma_loop, dp_zo_loop, zo_loop
from secfwt.tuning.spsa import SPSASettings
from secfwt.tuning.swat import update_scales
from secfwt.tuning.trainable import TrainableSet, initial_values, trainable_set

log = logging.getLogger(__name__)

#: (parameters, prompt, history, DP guarantee) of one tuning run
Tuned = tuple[dict[str, Any], Any, list[StepRecord], dict[str, Any] | None]


class _Progress:
    def __init__(self, queue: Any, role: Role) -> None:
        self.queue, self.role = queue, role

    def __call__(self, **msg: Any) -> None:
        if self.queue is not None:
            self.queue.put((self.role, msg))


@dataclasses.dataclass
class _Prepared:
    """A session that has shared everything, cached the prefix and evaluated the start."""

    sess: PartySession
    cfg: JobConfig
    progress: _Progress
    t_start: float
    out_dir: Path
    ckpt: JobCheckpointer | None
    resumed: Checkpoint | None
    data: DataOwnerInputs | InstructionInputs | None
    spec: ModelSpec
    trainable: TrainableSet
    seed: int  # the joint seed
    theta: dict[str, Any]  # shares of the starting (or restored) trainable values
    plain_table: torch.Tensor | None  # the word embeddings, where disclosed to this party
    runner: CachedForward | CausalLMForward
    cut: int
    prefix_end: str  # where the cached prefix ends (secfwt.runtime.checkpoint.PREFIX_*)
    n_train: int
    eval_idx: list[int]
    prefix_s: float
    prefix_traffic: dict[str, int]  # this party's traffic while it computed the frozen prefix
    checks: RangeChecks  # the range checks of the prefix and of every later secure forward
    gate: SafetyGate | None = None  # the safety gate's rows, where the job carries one
    gate_before: float | None = None  # its score with the untuned parameters
    #: Safe Delta's U per LoRA module (the model owner's, plaintext; None elsewhere)
    safe_delta_u: dict[str, torch.Tensor] | None = None
    #: the held-out metric before tuning: accuracy, or a causal-LM job's mean response loss
    before: float | None = None
    local: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def causal(self) -> bool:
        return isinstance(self.runner, CausalLMForward)

    def evaluate(self, theta: dict[str, Any], prompt: Any, note: str) -> float | None:
        """The held-out metric, revealed to the parties the terms name (None elsewhere):
        accuracy, or for a causal-LM job the mean response loss per held-out row."""
        bs, discloser, n = self.cfg.run.eval_batch, self.sess.discloser, len(self.eval_idx)
        if isinstance(self.runner, CausalLMForward):
            mean = self.runner.loss_sum(theta, self.eval_idx, batch=bs) * (1.0 / n)
            to = discloser.terms.recipients(Revealable.EVAL_LOSS)
            loss = discloser.reveal(mean, value=Revealable.EVAL_LOSS, to=to, note=note)
            return None if loss is None else float(loss)
        count = self.runner.correct_count(theta, self.eval_idx, batch=bs, prompt=prompt)
        to = discloser.terms.recipients(Revealable.EVAL_ACCURACY)
        revealed = discloser.reveal(count, value=Revealable.EVAL_ACCURACY, to=to, note=note)
        return None if revealed is None else float(revealed) / n

    def report_eval(self, when: str, value: float | None) -> None:
        key = "loss" if self.causal else "accuracy"
        self.progress(kind="eval", when=when, **{key: value})


def run_job_party(ctx: PartyContext, job: PartyJob) -> PartyOutcome:
    """This party's whole job: tune, evaluate, deliver per terms."""
    s = _prepare(ctx, job)
    before_tuning = traffic_now()
    theta, prompt, history, dp_report = _tune(s, s.cfg, s.theta, ckpt=s.ckpt)
    tuning_traffic = _since(before_tuning)
    after = s.evaluate(theta, prompt, "after tuning")
    s.report_eval("after", after)
    if s.cfg.safety_gate.safe_delta:
        theta = _safe_delta(s, theta)
    decision = None
    if s.gate is not None:
        assert s.gate_before is not None
        when = "after Safe Delta" if s.cfg.safety_gate.safe_delta else "after"
        decision = s.gate.decide(s.gate_before, s.gate.score(theta, note=f"safety gate: {when}"))
        s.progress(kind="gate", **decision.to_dict())
    if decision is None or decision.released:
        adapter = None
        if s.causal:
            adapter = AdapterExport(
                base_model=job.model_dir, scale=s.runner.settings.lora_scale, spec=s.spec
            )
        artifacts = deliver(s.sess, theta, s.local, s.out_dir, adapter=adapter)
    else:
        artifacts = _withhold(s, decision)
    spec = s.spec
    return PartyOutcome(
        accuracy_before=None if s.causal else s.before,
        accuracy_after=None if s.causal else after,
        eval_loss_before=s.before if s.causal else None,
        eval_loss_after=after if s.causal else None,
        rows_recomputed=s.checks.recomputed,
        history=tuple(history),
        trainable_names=tuple(s.trainable.names),
        trainable_numel=s.trainable.numel,
        cut_layer=s.cut,
        prefix_end=s.prefix_end,
        joint_seed=s.seed,
        prefix_s=s.prefix_s,
        party_wall_s=time.perf_counter() - s.t_start,
        resumed_from_step=None if s.resumed is None else s.resumed.step,
        checkpoints_written=() if s.ckpt is None else tuple(s.ckpt.written),
        artifacts=artifacts,
        reveals=s.sess.discloser.count,
        dp=dp_report,
        model=ModelFacts(family=spec.family.value, layers=spec.num_layers, hidden=spec.hidden_size),
        safety_gate=None if decision is None else decision.to_dict(),
        phase_traffic=(
            {"frozen_prefix": s.prefix_traffic, "tuning": tuning_traffic}
            if s.prefix_traffic and tuning_traffic
            else {}
        ),
        prefix_rows=s.n_train + len(s.eval_idx),
    )


def _since(start: Traffic | None) -> dict[str, int]:
    """This party's traffic since ``start`` (:func:`traffic_now`), as a dict; empty where
    nothing counts it."""
    now = traffic_now()
    return {} if start is None or now is None else dataclasses.asdict(now.minus(start))


def _safe_delta(s: _Prepared, theta: dict[str, Any]) -> dict[str, Any]:
    """The tuned LoRA pairs replaced by their Safe Delta weight deltas, on shares
    (:mod:`secfwt.runtime.safe_delta`); recorded in the audit log without any secret (how much
    was kept is not revealed)."""
    from secfwt.runtime.safe_delta import corrected_theta, lora_modules

    assert isinstance(s.runner, CausalLMForward)
    g = s.cfg.safety_gate
    t0 = time.perf_counter()
    out = corrected_theta(
        theta,
        factors=s.safe_delta_u,
        scale=s.runner.settings.lora_scale,
        budget=g.safe_delta_budget,
        progress=s.progress,
    )
    seconds = time.perf_counter() - t0
    s.sess.discloser.record(
        "safe_delta",
        modules=lora_modules(theta),
        budget=g.safe_delta_budget,
        calibration_samples=g.safe_delta_calibration,
        seconds=round(seconds, 3),
    )
    s.progress(kind="phase", phase=f"Safe Delta: {seconds:.1f} s in all")
    return out


def _withhold(s: _Prepared, decision: GateDecision) -> dict[str, str]:
    """The gate failed: nothing is revealed; this party deletes its checkpointed shares of the
    tuned parameters and records why in its audit log. Returns no artifacts.

    Its in-memory shares are neither written nor wiped: they are dropped when this party's job
    returns, and its process exits right after (the launcher and the daemon start one process
    per party and job)."""
    deleted = [] if s.ckpt is None else s.ckpt.store.discard_tuned()
    s.sess.discloser.record(
        "withheld",
        state=WITHHELD,
        reason=decision.reason,
        score_before=decision.score_before,
        score_after=decision.score_after,
        checkpoints_deleted=deleted,
    )
    log.warning("%s: %s; the tuned parameters are not released", WITHHELD, decision.reason)
    s.progress(kind="phase", phase=f"{WITHHELD}: tuned parameters deleted, nothing released")
    return {}


def run_comparison_party(ctx: PartyContext, job: ComparisonJob) -> ComparisonOutcome:
    """Each variant tuned from the same start on this session's cached prefix, evaluated."""
    s = _prepare(ctx, job.job)
    if s.causal:
        raise ConfigError("dp-compare compares held-out accuracy; it does not run causal_lm jobs")
    out = []
    for v in job.variants:
        s.sess.agree(public_job_digest(v.config), what=f"the settings of variant {v.label!r}")
        s.progress(kind="phase", phase=f"variant {v.label}")
        c0, t0 = traffic_now(), time.perf_counter()
        theta, prompt, history, dp_report = _tune(s, v.config, s.theta, ckpt=None)
        acc = s.evaluate(theta, prompt, f"after tuning ({v.label})")
        used = _since(c0)  # what this party sent the other and the rounds, for this variant
        s.progress(kind="eval", when=f"after ({v.label})", accuracy=acc)
        out.append(
            VariantOutcome(
                label=v.label,
                accuracy_after=acc,
                tune_s=time.perf_counter() - t0,
                loss_history=tuple(h.loss for h in history),
                bytes_sent=used.get("sent", 0),
                rounds=used.get("rounds", 0),
                dp=dp_report,
            )
        )
    return ComparisonOutcome(
        accuracy_before=s.before,
        n_eval=len(s.eval_idx),
        prefix_s=s.prefix_s,
        joint_seed=s.seed,
        variants=tuple(out),
        party_wall_s=time.perf_counter() - s.t_start,
    )


def _prepare(ctx: PartyContext, job: PartyJob) -> _Prepared:
    """Everything before tuning: agreements, sharing, the frozen prefix, the first evaluation."""
    cfg = job.config
    role = ctx.role
    out_dir = Path(job.out_dir) / role.value
    out_dir.mkdir(parents=True, exist_ok=True)
    sess = PartySession(role=role, terms=cfg.terms, audit_path=out_dir / "audit.jsonl")
    progress = _Progress(job.progress, role)
    t_start = time.perf_counter()
    sess.agree(cfg.terms.digest(), what="the disclosure terms (digest)")
    job_digest = public_job_digest(cfg)
    sess.agree(job_digest, what="the job settings")
    ckpt = agree_checkpointing(
        job.checkpoints,
        sess=sess,
        progress=progress,
        job_digest=job_digest,
        terms_digest=cfg.terms.digest(),
    )
    resumed = ckpt.agree_resume() if ckpt is not None else None

    # -- public facts and the model ---------------------------------------------------------
    causal = cfg.model.head is Head.CAUSAL_LM
    data = job.data
    if role is Role.DATA_OWNER and data is None:
        progress(kind="phase", phase="preparing data")
        held = cfg if job.held_data is None else dataclasses.replace(cfg, data=job.held_data)
        data = _prepare_data(held, Path(job.model_dir))
    facts = sess.broadcast(None if data is None else _public_facts(data), src=Role.DATA_OWNER)
    spec = state = None
    if role is Role.MODEL_OWNER:
        from secfwt.models.checkpoint import load_checkpoint

        progress(kind="phase", phase="loading model")
        spec, state = load_checkpoint(
            Path(job.model_dir),
            head=cfg.model.head,
            num_labels=facts["num_labels"],
            seed=cfg.job.seed,
        )
    spec = sess.agree_spec(spec)
    if causal:
        check_causal_model(
            cfg, family_is_decoder=spec.family.is_decoder, tied=spec.tie_word_embeddings
        )
    zo_mode = cfg.job.mode is Mode.ZO
    prompt_len = cfg.zo.soft_prompt_length if zo_mode else cfg.cma.prompt_length
    if causal:
        prompt_len = 0  # a causal job's prompt slots are among its max_length positions
    if facts["t"] + prompt_len > spec.max_tokens:
        raise ConfigError(
            f"model.max_length = {facts['t']} plus a prompt of {prompt_len} exceeds this model's "
            f"{spec.max_tokens} positions; lower model.max_length"
        )
    trainable = trainable_set(cfg, spec)
    cut = cfg.cma.prompt_layer if cfg.job.mode is Mode.CMA else trainable.first_layer(spec)
    attention_cached = trainable.attention_frozen(spec)  # False for CMA (nothing trains), decoders
    prefix_end = PREFIX_AFTER_ATTENTION if attention_cached else PREFIX_AT_LAYER
    if resumed is not None and resumed[1] is not None and resumed[0].prefix_end != prefix_end:
        raise ConfigError(
            f"the checkpoint's cached prefix ends at the {resumed[0].prefix_end!r} mark; for "
            f"this trainable set this version caches it to the {prefix_end!r} mark (an earlier "
            "version wrote the checkpoint); empty both parties' checkpoint folders to start over"
        )
    seed = resumed[0].joint_seed if resumed is not None else sess.joint_seed()
    settings = forward_settings(cfg, seed=cfg.job.seed)

    # -- share weights --------------------------------------------------------------------------
    progress(kind="phase", phase="sharing weights")
    private_table = cfg.model.embedding is EmbeddingMode.PRIVATE
    frozen_names = [
        n
        for n, _ in spec.param_shapes
        if (private_table or n != spec.word_embeddings) and n not in trainable.names
    ]
    frozen = sess.share_params(spec, state, names=frozen_names, frozen=True)
    if causal:
        frozen.update(lm_head_params(sess, spec, state))
    init = None
    if role is Role.MODEL_OWNER:
        assert state is not None
        init = initial_values(spec, state, trainable, seed=cfg.job.seed)
    theta = {
        n: sess.share(None if init is None else init[n], owner=Role.MODEL_OWNER, shape=s, name=n)
        for n, s in trainable.shapes
    }
    theta0 = theta  # the untuned values: the safety gate's reference score
    if resumed is not None:
        # Shared above all the same: every later share then uses the same randomness as in the
        # run that wrote the checkpoint (bit-identical resumes under insecure_fixed_seed).
        theta = restore_theta(resumed[0], trainable)
    plain_table = disclose_table(sess, spec, state) if not private_table else None

    # -- the data owner's rows and the frozen prefix, computed once ---------------------------
    cached = None if resumed is None else resumed[1]
    cached = None if cached is None else from_share(cached, precision_bits())
    n, t = facts["n"], facts["t"]
    runner: CachedForward | CausalLMForward
    checks: RangeChecks
    before_prefix = traffic_now()
    if causal:
        assert data is None or isinstance(data, InstructionInputs)
        runner, cache, prefix_s, checks = causal_runner(
            sess,
            cfg,
            spec=spec,
            state=state,
            data=data,
            frozen=frozen,
            settings=settings,
            plain_table=plain_table,
            n=n,
            t=t,
            cut=cut,
            cached=cached,
            progress=progress,
        )
    else:
        assert data is None or isinstance(data, DataOwnerInputs)
        checks = RangeChecks(sess)
        runner, cache, prefix_s = _encoder_runner(
            sess,
            cfg,
            spec=spec,
            data=data,
            facts=facts,
            frozen=frozen,
            settings=settings,
            plain_table=plain_table,
            cut=cut,
            attention_cached=attention_cached,
            cached=cached,
            progress=progress,
            checks=checks,
        )
    prefix_traffic = _since(before_prefix)
    gate = None
    if causal and cfg.safety_gate.enabled:
        assert isinstance(runner, CausalLMForward)
        gate = build_gate(
            sess,
            cfg,
            job_forward=runner,
            state=state,
            model_dir=Path(job.model_dir),
            checks=checks,
            progress=progress,
        )
    p = _Prepared(
        sess=sess,
        cfg=cfg,
        progress=progress,
        t_start=t_start,
        out_dir=out_dir,
        ckpt=ckpt,
        resumed=None if resumed is None else resumed[0],
        data=data,
        spec=spec,
        trainable=trainable,
        seed=seed,
        theta=theta,
        plain_table=plain_table,
        runner=runner,
        cut=cut,
        prefix_end=prefix_end,
        n_train=facts["n_train"],
        eval_idx=list(range(facts["n_train"], n)),
        prefix_s=prefix_s,
        prefix_traffic=prefix_traffic,
        checks=checks,
        gate=gate,
    )
    if cfg.safety_gate.safe_delta and role is Role.MODEL_OWNER:
        from secfwt.runtime.safe_delta import calibration_factors, lora_modules

        t0 = time.perf_counter()
        modules = lora_modules(trainable.names)
        n_cal = cfg.safety_gate.safe_delta_calibration
        p.safe_delta_u = calibration_factors(cfg, Path(job.model_dir), modules)
        done = (
            f"Safe Delta: Hessians of {len(modules)} module(s) on {n_cal} "
            f"calibration samples, {time.perf_counter() - t0:.1f} s"
        )
        log.info(done)
        progress(kind="phase", phase=done, own=True)  # its own step: the data owner never sees it
    if gate is not None:
        p.gate_before = gate.score(theta0, note="safety gate: before tuning")
        progress(kind="phase", phase=f"safety gate: score before tuning {p.gate_before:.4f}")
    if p.resumed is not None:
        # revealed (per terms) before the interruption; the checkpoint keeps the job's metric
        p.before = p.resumed.accuracy_before
    else:
        p.before = p.evaluate(theta, None, "before tuning")
    p.report_eval("before", p.before)
    if ckpt is not None:
        ckpt.start(
            joint_seed=seed,
            accuracy_before=p.before,
            cache=cache,
            prefix_end=p.prefix_end,
            resumed=p.resumed,
        )
    return p


def _prepare_data(cfg: JobConfig, model_dir: Path) -> DataOwnerInputs | InstructionInputs:
    """The data owner's rows, read here when the launcher did not prepare them."""
    if cfg.model.head is Head.CAUSAL_LM:
        from secfwt.runtime.data_owner import prepare_instruction_inputs

        return prepare_instruction_inputs(cfg, tokenizer_dir=model_dir)
    from secfwt.runtime.data_owner import prepare_inputs

    return prepare_inputs(cfg, tokenizer_dir=model_dir)


def _public_facts(data: DataOwnerInputs | InstructionInputs) -> dict[str, int]:
    """What the data owner announces: row count and length, training rows, classes."""
    n, t = data.input_ids.shape
    labels = data.num_labels if isinstance(data, DataOwnerInputs) else 0
    return {"n": int(n), "t": int(t), "n_train": data.n_train, "num_labels": labels}


def _encoder_runner(
    sess: PartySession,
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    data: DataOwnerInputs | None,
    facts: dict[str, int],
    frozen: dict[str, Any],
    settings: Any,
    plain_table: torch.Tensor | None,
    cut: int,
    attention_cached: bool,
    cached: Any | None,
    progress: _Progress,
    checks: RangeChecks,
) -> tuple[CachedForward, Any, float]:
    """A classification job's shared rows and frozen prefix (or the checkpoint's): the forward,
    the cache and the seconds the prefix took. ``checks`` range-checks each prefix row
    (:data:`~secfwt.runtime.range_checks.RANGE_BOUND`) and, in every later forward, each row's
    logits, or in a step its losses and logit differences
    (:data:`~secfwt.runtime.range_checks.OUTPUT_BOUND`)."""
    n, t = facts["n"], facts["t"]
    onehot, mask, pool_w = share_rows(
        sess, data, n=n, t=t, num_labels=facts["num_labels"], pooling=cfg.model.pooling
    )
    frozen_model = EncoderModel(spec, frozen, sess.ops, settings)
    t_prefix = time.perf_counter()
    if cached is not None:
        cache = cached
        progress(kind="phase", phase="frozen prefix loaded from the checkpoint")
    else:

        def compute(rows: list[int]) -> Any:
            ix = torch.tensor(rows)
            word = share_word_embeddings(
                sess,
                spec,
                mode=cfg.model.embedding,
                shape=(len(rows), t),
                input_ids=None if data is None else data.input_ids[ix],
                secret_table=frozen.get(spec.word_embeddings),
                plain_table=plain_table,
            )
            pw_s = None if pool_w is None else pool_w[ix]
            return prefix(
                frozen_model, word, mask[ix], pw_s, cut=cut, attention_cached=attention_cached
            )

        cache = checks.prefix(compute, n=n, batch=cfg.run.eval_batch, progress=progress)
    runner = CachedForward(
        ops=sess.ops,
        public=sess.public,
        spec=spec,
        frozen=frozen,
        settings=settings,
        cache=cache,
        mask=mask,
        pool_w=pool_w,
        onehot=onehot,
        cut=cut,
        prompt_layer=cfg.cma.prompt_layer if cfg.job.mode is Mode.CMA else cfg.zo.prompt_layer,
        guard=checks.guard(what="classifier outputs", bound=OUTPUT_BOUND),
        attention_cached=attention_cached,
    )
    return runner, cache, time.perf_counter() - t_prefix


def _tune(
    s: _Prepared, run: JobConfig, theta: dict[str, Any], *, ckpt: JobCheckpointer | None
) -> Tuned:
    """One tuning run of the settings ``run`` from ``theta`` (checkpointed with ``ckpt``)."""
    if run.job.mode is Mode.CMA:
        return _tune_cma(s, run, ckpt=ckpt)
    z = run.zo
    schedule = ZOSchedule(
        seed=s.seed,
        steps=z.steps,
        n_train=s.n_train,
        batch_size=z.batch_size,
        shapes=s.trainable.shapes,
        spsa=SPSASettings(lr=z.lr, eps=z.eps, directions=z.directions),
        scales=update_scales(run.safety, s.trainable.names),
    )
    history = [] if ckpt is None else ckpt.history()
    on_step = _zo_recorder(s, history, total=z.steps, ckpt=ckpt)
    backend = SharedBackend(sess=s.sess, forward=s.runner)
    start = len(history)
    if not run.dp.enabled:
        theta = zo_loop(backend, theta, schedule=schedule, on_step=on_step, start=start)
        return theta, None, history, None
    from secfwt.tuning.accounting import plan as dp_plan
    from secfwt.tuning.dp_zo import guarantee

    plan = dp_plan(
        run.dp, n_train=s.n_train, batch_size=z.batch_size, steps=z.steps, where=run.source
    )
    # Accounting: the plan composes zo.steps steps. After a resume the steps since the last
    # checkpoint run again with fresh noise; their first results were secret-shared and are
    # discarded unreleased, so the released parameters still compose exactly zo.steps
    # noisy steps (the history, restored from the checkpoint, has exactly that length).
    theta = dp_zo_loop(backend, theta, schedule=schedule, plan=plan, on_step=on_step, start=start)
    return theta, None, history, guarantee(plan, run.terms)


def _zo_recorder(
    s: _Prepared, history: list[StepRecord], *, total: int, ckpt: JobCheckpointer | None
) -> ZOStepHook:
    """After each ZO step: reveal the loss per terms, record, report, checkpoint."""
    discloser = s.sess.discloser
    loss_to = discloser.terms.recipients(Revealable.TRAIN_LOSS)
    t0 = time.perf_counter()

    def on_step(step: int, theta: dict[str, Any], mean_loss: Any, _g: Any) -> None:
        loss = None
        if loss_to:
            note = f"step {step - 1}"
            v = discloser.reveal(mean_loss, value=Revealable.TRAIN_LOSS, to=loss_to, note=note)
            loss = None if v is None else float(v)
        history.append(StepRecord(step=step, loss=loss))
        elapsed = time.perf_counter() - t0
        s.progress(kind="step", step=step, total=total, loss=loss, elapsed=elapsed)
        if ckpt is not None:
            ckpt.after_step(step, history=history, theta=theta)

    return on_step


def _tune_cma(s: _Prepared, run: JobConfig, *, ckpt: JobCheckpointer | None) -> Tuned:
    """SecFwT: the data owner proposes prompts, the MPC forward scores them, the data owner
    learns (see :class:`~secfwt.runtime.backend.SharedPromptScorer`)."""
    c, sess, hidden = run.cma, s.sess, s.spec.hidden_size
    search = None
    if sess.role is Role.DATA_OWNER:
        emb_std = float(s.plain_table.std()) if s.plain_table is not None else 0.05
        search = PromptSearch(
            CMASettings(
                intrinsic_dim=c.intrinsic_dim,
                prompt_length=c.prompt_length,
                hidden_size=hidden,
                population=c.population,
                sigma0=c.sigma0,
                seed=run.job.seed,
            ),
            embedding_std=emb_std,
        )
    history = [] if ckpt is None else ckpt.history()
    if search is not None and ckpt is not None:
        restored = ckpt.local_state()
        if restored is not None:
            search.restore(restored)
    t0 = time.perf_counter()

    def on_step(it: int, loss: float | None) -> None:
        history.append(StepRecord(step=it, loss=loss))
        elapsed = time.perf_counter() - t0
        s.progress(kind="step", step=it, total=c.iterations, loss=loss, elapsed=elapsed)
        if ckpt is not None:
            local = None if search is None else search.state
            ckpt.after_step(it, history=history, theta={}, local=local)

    assert isinstance(s.runner, CachedForward)  # CMA jobs classify (config.validate)
    assert s.data is None or isinstance(s.data, DataOwnerInputs)
    scorer = SharedPromptScorer(
        sess=sess,
        forward=s.runner,
        population=c.population,
        prompt_shape=(c.prompt_length, hidden),
        labels=None if s.data is None else s.data.labels,
    )
    cma_loop(
        scorer,
        search,
        seed=s.seed,
        iterations=c.iterations,
        n_train=s.n_train,
        batch_size=c.batch_size,
        on_step=on_step,
        start=len(history),
    )
    final = search.mean_prompt if search is not None else None
    shape = (c.prompt_length, hidden)
    prompt = sess.share(final, owner=Role.DATA_OWNER, shape=shape, name="final prompt")
    if search is not None and final is not None:
        s.local["prompt"] = final
    return {}, prompt, history, None
