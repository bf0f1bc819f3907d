"""One computing party's side of a tuning job (both modes), run inside its own process.

Data path: agree on terms -> data owner announces public dataset facts -> model owner loads
and shares weights -> data owner shares its inputs -> the frozen prefix (everything below the
first trainable value) is computed once per example and kept as shares -> evaluate -> tune
(ZO: SPSA on secret-shared parameters; CMA: SecFwT prompt search local to the data owner) ->
evaluate -> reveal per terms -> artifacts.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from secfwt.config import JobConfig, Mode
from secfwt.errors import ConfigError
from secfwt.models.encoder import EncoderModel, ForwardSettings
from secfwt.models.spec import EmbeddingMode, ModelSpec, Pooling
from secfwt.models.attention import RFASettings
from secfwt.mpc.disclosure import Revealable
from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role
from secfwt.runtime.checkpoint import Checkpoint, CheckpointStop, PartyCheckpoints, common_checkpoint, from_share, is_shared, precision_bits, share_of
from secfwt.runtime.forward import CachedForward, batch_indices, mean_pool_weights, prefix
from secfwt.runtime.inputs import disclose_table, share_word_embeddings
from secfwt.runtime.session import PartySession
from secfwt.tuning.spsa import SPSASettings, directions, spsa_step
from secfwt.tuning.trainable import TrainableSet, initial_values, select_trainable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DataOwnerInputs:
    """The data owner's private inputs, already tokenized (train rows first, then eval rows)."""

    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) 0/1
    labels: torch.Tensor  # (N,) long
    n_train: int
    num_labels: int


def forward_settings(cfg: JobConfig, *, seed: int) -> ForwardSettings:
    m = cfg.model
    return ForwardSettings(attention=m.attention, rfa=RFASettings(num_features=m.rfa_features, sigma=m.rfa_sigma, seed=seed), pooling=m.pooling)


class _Progress:
    def __init__(self, queue: Any, role: Role) -> None:
        self.queue, self.role = queue, role

    def __call__(self, **msg: Any) -> None:
        if self.queue is not None:
            self.queue.put((self.role, msg))


def run_job_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any]:
    """This party's whole job; returns its result dict (see the end of the function).

    Payload keys (the same dict from ``secfwt simulate`` and from the party daemons):

    * ``config`` (:class:`JobConfig`), ``out_dir`` (str; this party writes under
      ``out_dir/ROLE``), ``model_dir`` (str; the model owner's checkpoint, the data owner's
      tokenizer), ``data`` (:class:`DataOwnerInputs`, optional: prepared inputs of the data
      owner), ``progress`` (a queue or None; messages ``(role, {"kind": ...})``),
      ``variants`` (list of (label, JobConfig), optional: comparison runs, no checkpoints).
    * ``checkpoint_dir`` (str or None, default None): this party's own checkpoint folder
      (:mod:`secfwt.runtime.checkpoint`); None writes no checkpoints. Must be set on both
      computing parties or on neither.
    * ``checkpoint_every`` (int >= 1, default 10): write a checkpoint after every this many
      tuning steps (ZO/DP-ZO steps, CMA-ES iterations), never mid-step. Equal on both parties.
    * ``resume`` (bool, default False): continue from the latest step both parties
      checkpointed (agreed over the MPC channel); with no common checkpoint the job starts
      from step 0 (a job killed before its first checkpoint can only restart, and does so
      with the same result). False with checkpoints already in the folder is refused.
    * ``stop_after_step`` (int or None; tests only): raise :class:`CheckpointStop` right
      after the checkpoint of that step is written, as if the process had been killed there.

    Progress: ``{"kind": "checkpoint", "step": k}`` after each write; on resume a ``phase``
    message ``"resumed from step k"`` (or ``"no common checkpoint: starting from step 0"``).
    """
    cfg: JobConfig = payload["config"]
    role = ctx.role
    out_dir = Path(payload["out_dir"]) / role.value
    out_dir.mkdir(parents=True, exist_ok=True)
    sess = PartySession(role=role, terms=cfg.terms, audit_path=out_dir / "audit.jsonl")
    progress = _Progress(payload.get("progress"), role)
    t_start = time.perf_counter()
    sess.agree(cfg.terms.digest(), what="the disclosure terms (digest)")
    job_digest = _public_job_digest(cfg)
    sess.agree(job_digest, what="the job settings")
    ckpt = _Checkpointer.from_payload(payload, sess=sess, progress=progress, job_digest=job_digest, terms_digest=cfg.terms.digest())
    resumed = ckpt.agree_resume() if ckpt is not None else None

    # -- public facts and the model ---------------------------------------------------------
    data: DataOwnerInputs | None = payload.get("data")
    if role is Role.DATA_OWNER and data is None:
        from secfwt.runtime.data_owner import prepare_inputs

        progress(kind="phase", phase="preparing data")
        data = prepare_inputs(cfg, tokenizer_dir=Path(payload["model_dir"]))
    facts = sess.broadcast(
        None if data is None else {"n": int(data.input_ids.shape[0]), "t": int(data.input_ids.shape[1]), "n_train": data.n_train, "num_labels": data.num_labels},
        src=Role.DATA_OWNER,
    )
    spec = state = None
    if role is Role.MODEL_OWNER:
        from secfwt.models.checkpoint import load_checkpoint

        progress(kind="phase", phase="loading model")
        spec, state = load_checkpoint(Path(payload["model_dir"]), head=cfg.model.head, num_labels=facts["num_labels"], seed=cfg.job.seed)
    spec = sess.agree_spec(spec)
    prompt_len = cfg.zo.soft_prompt_length if cfg.job.mode is Mode.ZO else cfg.cma.prompt_length
    if facts["t"] + prompt_len > spec.max_tokens:
        raise ConfigError(f"model.max_length = {facts['t']} plus a prompt of {prompt_len} exceeds this model's {spec.max_tokens} positions; lower model.max_length")
    trainable = trainable_set(cfg, spec)
    seed = resumed[0].joint_seed if resumed is not None else sess.joint_seed()
    settings = forward_settings(cfg, seed=cfg.job.seed)

    # -- share weights and inputs -------------------------------------------------------------
    progress(kind="phase", phase="sharing weights")
    private_table = cfg.model.embedding is EmbeddingMode.PRIVATE
    frozen_names = [n for n, _ in spec.param_shapes if (private_table or n != spec.word_embeddings) and n not in trainable.names]
    frozen = sess.share_params(spec, state, names=frozen_names, frozen=True)
    init = None
    if role is Role.MODEL_OWNER:
        assert state is not None
        init = initial_values(spec, state, trainable, seed=cfg.job.seed)
    theta = {n: sess.share(None if init is None else init[n], owner=Role.MODEL_OWNER, shape=s, name=n) for n, s in trainable.shapes}
    if resumed is not None:
        # Shared above all the same: every later share then uses the same randomness as in the
        # run that wrote the checkpoint (bit-identical resumes under insecure_fixed_seed).
        theta = _restore_theta(resumed[0], trainable)
    plain_table = disclose_table(sess, spec, state) if not private_table else None
    secret_table = frozen.get(spec.word_embeddings)
    n, t = facts["n"], facts["t"]
    c = facts["num_labels"]
    onehot = sess.share(None if data is None else torch.nn.functional.one_hot(data.labels, c).float(), owner=Role.DATA_OWNER, shape=(n, c), name="labels")
    mask = sess.share(None if data is None else data.attention_mask.float(), owner=Role.DATA_OWNER, shape=(n, t), name="attention mask")
    pool_w = None
    if cfg.model.pooling is Pooling.MEAN:
        pw = None if data is None else mean_pool_weights(data.attention_mask).float()
        pool_w = sess.share(pw, owner=Role.DATA_OWNER, shape=(n, t), name="pooling weights")

    # -- frozen prefix, computed once ---------------------------------------------------------
    cut = cfg.cma.prompt_layer if cfg.job.mode is Mode.CMA else trainable.first_layer(spec)
    frozen_model = EncoderModel(spec, frozen, sess.ops, settings)
    chunks = []
    bs = cfg.run.eval_batch
    t_prefix = time.perf_counter()
    cached = None if resumed is None else resumed[1]
    if cached is not None:
        cache = from_share(cached, precision_bits())
        progress(kind="phase", phase="frozen prefix loaded from the checkpoint")
    else:
        for s in range(0, n, bs):
            e = min(n, s + bs)
            ids = None if data is None else data.input_ids[s:e]
            word = share_word_embeddings(sess, spec, mode=cfg.model.embedding, input_ids=ids, shape=(e - s, t), secret_table=secret_table, plain_table=plain_table)
            chunks.append(prefix(frozen_model, word, mask[s:e], None if pool_w is None else pool_w[s:e], cut=cut))
            progress(kind="prefix", done=e, total=n, elapsed=time.perf_counter() - t_prefix)
        from secfwt.crypten_compat import crypten

        cache = chunks[0] if len(chunks) == 1 else crypten.cat(chunks, dim=0)
    prefix_s = time.perf_counter() - t_prefix

    runner = CachedForward(ops=sess.ops, public=sess.public, spec=spec, frozen=frozen, settings=settings, cache=cache, mask=mask, pool_w=pool_w, onehot=onehot, cut=cut, prompt_layer=(cfg.cma.prompt_layer if cfg.job.mode is Mode.CMA else cfg.zo.prompt_layer))
    n_train = facts["n_train"]
    eval_idx = list(range(n_train, n))
    local: dict[str, torch.Tensor] = {}

    def accuracy(theta: dict[str, Any], prompt: Any, note: str) -> float | None:
        count = runner.correct_count(theta, eval_idx, batch=bs, prompt=prompt)
        to = sess.discloser.terms.recipients(Revealable.EVAL_ACCURACY)
        revealed = sess.discloser.reveal(count, value=Revealable.EVAL_ACCURACY, to=to, note=note)
        return None if revealed is None else float(revealed) / len(eval_idx)

    if resumed is not None:
        acc_before = resumed[0].accuracy_before  # revealed (per terms) before the interruption
    else:
        acc_before = accuracy(theta, None, "before tuning")
    progress(kind="eval", when="before", accuracy=acc_before)
    if ckpt is not None:
        ckpt.start(joint_seed=seed, accuracy_before=acc_before, cache=cache, resumed=None if resumed is None else resumed[0])

    def tune(run: JobConfig, theta: dict[str, Any]) -> tuple[dict[str, Any], Any, list[dict[str, Any]], dict[str, Any] | None]:
        if run.job.mode is Mode.CMA:
            th, prompt, hist = _tune_cma(run, runner, sess, spec, seed=seed, n_train=n_train, progress=progress, plain_table=plain_table, labels=None if data is None else data.labels, local=local, ckpt=ckpt if run is cfg else None)
            return th, prompt, hist, None
        if not run.dp.enabled:
            th, hist = _tune_zo(run, runner, sess, theta, trainable, seed=seed, n_train=n_train, progress=progress, ckpt=ckpt if run is cfg else None)
            return th, None, hist, None
        from secfwt.dp.accounting import plan as dp_plan
        from secfwt.dp.zo import guarantee

        plan = dp_plan(run.dp, n_train=n_train, batch_size=run.zo.batch_size, steps=run.zo.steps, where=run.source)
        # Accounting: the plan composes zo.steps steps. After a resume the steps since the last
        # checkpoint run again with fresh noise; their first results were secret-shared and are
        # discarded unreleased, so the released parameters still compose exactly zo.steps
        # noisy steps (the history, restored from the checkpoint, has exactly that length).
        th, hist = _tune_dp_zo(run, runner, sess, theta, trainable, plan, seed=seed, n_train=n_train, progress=progress, ckpt=ckpt if run is cfg else None)
        return th, None, hist, guarantee(plan, run.terms)

    variants: list[tuple[str, JobConfig]] | None = payload.get("variants")
    if variants and ckpt is not None:
        raise ConfigError("checkpoint_dir: comparison variants (dp-compare) do not checkpoint; run them without checkpoint_dir")
    if variants:
        return {"accuracy_before": acc_before, "n_eval": len(eval_idx), "prefix_s": prefix_s, "joint_seed": seed, "variants": _run_variants(sess, variants, tune, accuracy, theta, progress), "party_wall_s": time.perf_counter() - t_start}
    theta, prompt, history, dp_report = tune(cfg, theta)
    acc_after = accuracy(theta, prompt, "after tuning")
    progress(kind="eval", when="after", accuracy=acc_after)

    artifacts = _deliver(sess, cfg, theta, local, out_dir)
    return {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "steps": len(history),
        "history": history,
        "trainable": {"names": list(trainable.names), "numel": trainable.numel},
        "cut_layer": cut,
        "joint_seed": seed,
        "prefix_s": prefix_s,
        "party_wall_s": time.perf_counter() - t_start,
        "resumed_from_step": None if resumed is None else resumed[0].step,
        "checkpoints_written": [] if ckpt is None else ckpt.written,
        "artifacts": artifacts,
        "reveals": sess.discloser.count,
        "dp": dp_report,
        "spec": {"family": spec.family.value, "layers": spec.num_layers, "hidden": spec.hidden_size},
    }


def _run_variants(sess: PartySession, variants: list[tuple[str, JobConfig]], tune: Any, accuracy: Any, theta0: dict[str, Any], progress: Any) -> list[dict[str, Any]]:
    """Several tuning runs from the same start on the same cached prefix (comparisons such as
    ``secfwt dp-compare``); each is evaluated, none delivers parameters."""
    from secfwt.mpc.session import communication_stats

    out = []
    for label, run in variants:
        sess.agree(_public_job_digest(run), what=f"the settings of variant {label!r}")
        progress(kind="phase", phase=f"variant {label}")
        c0, t0 = communication_stats(), time.perf_counter()
        theta, prompt, history, dp_report = tune(run, theta0)
        acc = accuracy(theta, prompt, f"after tuning ({label})")
        c1 = communication_stats()
        progress(kind="eval", when=f"after ({label})", accuracy=acc)
        out.append({"label": label, "accuracy_after": acc, "tune_s": time.perf_counter() - t0, "steps": len(history), "loss_history": [h["loss"] for h in history], "bytes_sent": c1["bytes"] - c0["bytes"], "rounds": c1["rounds"] - c0["rounds"], "dp": dp_report})
    return out


def _public_job_digest(cfg: JobConfig) -> str:
    import hashlib
    import json

    public = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("source",)}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()


def trainable_set(cfg: JobConfig, spec: ModelSpec) -> TrainableSet:
    if cfg.job.mode is Mode.CMA:
        return TrainableSet(shapes=(), new=(), prompt_layer=cfg.cma.prompt_layer)
    z = cfg.zo
    return select_trainable(spec, patterns=z.trainable, lora_modules=z.lora_modules, lora_rank=z.lora_rank, soft_prompt_length=z.soft_prompt_length, prompt_layer=z.prompt_layer, max_tokens=spec.max_tokens)


def _tune_zo(cfg: JobConfig, runner: CachedForward, sess: PartySession, theta: dict[str, Any], trainable: TrainableSet, *, seed: int, n_train: int, progress: Any, ckpt: _Checkpointer | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    z = cfg.zo
    settings = SPSASettings(lr=z.lr, eps=z.eps, directions=z.directions)

    def step_fn(step: int, theta: dict[str, Any], us: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Any], Any]:
        idx = batch_indices(seed=seed, n_train=n_train, batch=z.batch_size, step=step)
        new, _gs, mean_loss = spsa_step(lambda ps: runner.losses(ps, idx), theta, us=us, settings=settings)
        return new, mean_loss

    return _zo_loop(cfg, sess, theta, trainable, seed=seed, progress=progress, step_fn=step_fn, ckpt=ckpt)


def _tune_dp_zo(cfg: JobConfig, runner: CachedForward, sess: PartySession, theta: dict[str, Any], trainable: TrainableSet, plan: Any, *, seed: int, n_train: int, progress: Any, ckpt: _Checkpointer | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """DP-ZO (see :mod:`secfwt.dp.zo`): every step runs on all training rows; the data owner's
    secret Poisson mask selects the sample; both parties add secret Gaussian noise."""
    from secfwt.dp.zo import PrivateRandomness
    from secfwt.mpc.nonlinear import clip
    from secfwt.tuning.spsa import DPZOSettings, dp_spsa_step

    z = cfg.zo
    settings = SPSASettings(lr=z.lr, eps=z.eps, directions=z.directions)
    dp = DPZOSettings(clip=plan.max_grad_norm, expected_batch=plan.expected_batch)
    coins = PrivateRandomness()
    rows = list(range(n_train))
    noise_std = plan.noise_multiplier * plan.max_grad_norm

    def step_fn(step: int, theta: dict[str, Any], us: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Any], Any]:
        mine = sess.role is Role.DATA_OWNER
        mask = sess.share(coins.poisson_mask(n_train, plan.sample_rate) if mine else None, owner=Role.DATA_OWNER, shape=(n_train,), name="Poisson sample")
        noises = [sess.share(coins.gaussian(z.directions, noise_std) if sess.role is r else None, owner=r, shape=(z.directions,), name=f"DP noise of the {r.value}") for r in (Role.MODEL_OWNER, Role.DATA_OWNER)]
        new, _g, mean_loss = dp_spsa_step(lambda ps: runner.example_losses(ps, rows), theta, us=us, settings=settings, dp=dp, mask=mask, noises=noises, clip=clip)
        return new, mean_loss

    return _zo_loop(cfg, sess, theta, trainable, seed=seed, progress=progress, step_fn=step_fn, ckpt=ckpt)


def _zo_loop(cfg: JobConfig, sess: PartySession, theta: dict[str, Any], trainable: TrainableSet, *, seed: int, progress: Any, step_fn: Any, ckpt: _Checkpointer | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The steps of either ZO tuner: public directions, one update, the loss revealed per terms.

    With ``ckpt`` the loop starts after the restored checkpoint's step (``theta`` is already the
    restored shares) and checkpoints after every ``checkpoint_every`` steps.
    """
    z = cfg.zo
    loss_to = sess.discloser.terms.recipients(Revealable.TRAIN_LOSS)
    history: list[dict[str, Any]] = [] if ckpt is None else ckpt.history()
    t0 = time.perf_counter()
    for step in range(len(history), z.steps):
        us = directions(seed=seed, step=step, shapes=trainable.shapes, count=z.directions)
        theta, mean_loss = step_fn(step, theta, us)
        loss = None
        if loss_to:
            v = sess.discloser.reveal(mean_loss, value=Revealable.TRAIN_LOSS, to=loss_to, note=f"step {step}")
            loss = None if v is None else float(v)
        history.append({"step": step + 1, "loss": loss})
        progress(kind="step", step=step + 1, total=z.steps, loss=loss, elapsed=time.perf_counter() - t0)
        if ckpt is not None:
            ckpt.after_step(step + 1, history=history, theta=theta)
    return theta, history


def _tune_cma(cfg: JobConfig, runner: CachedForward, sess: PartySession, spec: ModelSpec, *, seed: int, n_train: int, progress: Any, plain_table: torch.Tensor | None, labels: torch.Tensor | None, local: dict[str, torch.Tensor], ckpt: _Checkpointer | None = None) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """SecFwT: the data owner proposes prompts, the MPC forward scores them, the data owner learns.

    Per iteration, every candidate prompt runs on the same public minibatch in one batched
    forward; only the logits of the data owner's own batch are revealed, to the data owner,
    which computes the losses and the CMA-ES update locally (``labels`` never leave it).
    """
    from secfwt.tuning.cma import CMASettings, PromptSearch

    c = cfg.cma
    search = None
    if sess.role is Role.DATA_OWNER:
        emb_std = float(plain_table.std()) if plain_table is not None else 0.05
        search = PromptSearch(
            CMASettings(intrinsic_dim=c.intrinsic_dim, prompt_length=c.prompt_length, hidden_size=spec.hidden_size, population=c.population, sigma0=c.sigma0, seed=cfg.job.seed),
            embedding_std=emb_std,
        )
    shape = (c.population, c.prompt_length, spec.hidden_size)
    history: list[dict[str, Any]] = [] if ckpt is None else ckpt.history()
    if search is not None and ckpt is not None:
        restored = ckpt.local_state()
        if restored is not None:
            search.restore(restored)
    t0 = time.perf_counter()
    for it in range(len(history), c.iterations):
        idx = batch_indices(seed=seed, n_train=n_train, batch=c.batch_size, step=it)
        b = len(idx)
        cands = search.ask() if search is not None else None  # (pop, P, H), data owner only
        per_row = None if cands is None else cands.repeat_interleave(b, dim=0)  # (pop * b, P, H)
        prompts = sess.share(per_row, owner=Role.DATA_OWNER, shape=(c.population * b, *shape[1:]), name="candidate prompts")
        rows = [i for _ in range(c.population) for i in idx]  # row k*b + i: candidate k, example i
        logits = runner.logits({}, rows, prompt=prompts)
        out = sess.discloser.reveal(logits, value=Revealable.TRAIN_OUTPUTS, to=[Role.DATA_OWNER], note=f"iteration {it}: {c.population} candidates x {b} examples")
        loss = None
        if search is not None and out is not None and labels is not None:
            y = labels[torch.tensor(idx)]
            ce = torch.nn.functional.cross_entropy(out.view(c.population, b, -1).reshape(c.population * b, -1).double(), y.repeat(c.population), reduction="none")
            losses = ce.view(c.population, b).mean(1)
            search.tell(losses.tolist())
            loss = float(losses.min())
        history.append({"step": it + 1, "loss": loss})
        progress(kind="step", step=it + 1, total=c.iterations, loss=loss, elapsed=time.perf_counter() - t0)
        if ckpt is not None:
            ckpt.after_step(it + 1, history=history, theta={}, local=None if search is None else search.state)
    final = search.mean_prompt if search is not None else None
    prompt = sess.share(final, owner=Role.DATA_OWNER, shape=shape[1:], name="final prompt")
    if search is not None:
        local["prompt"] = final
    return {}, prompt, history


class _Checkpointer:
    """This party's checkpoints during one session: agreement on resume, writes every k steps."""

    def __init__(self, store: PartyCheckpoints, *, sess: PartySession, progress: Any, every: int, resume: bool, stop_after: int | None) -> None:
        self.store, self.sess, self.progress = store, sess, progress
        self.every, self.resume, self.stop_after = every, resume, stop_after
        self.written: list[int] = []
        self._restored: Checkpoint | None = None
        self._seed = 0
        self._acc_before: float | None = None
        self._cache: Any = None
        self._prefix_id = ""

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, sess: PartySession, progress: Any, job_digest: str, terms_digest: str) -> _Checkpointer | None:
        folder = payload.get("checkpoint_dir")
        every = payload.get("checkpoint_every", 10)
        resume = bool(payload.get("resume", False))
        stop_after = payload.get("stop_after_step")
        if folder is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ConfigError(f"checkpoint_every = {every!r}: must be a whole number of steps >= 1")
        if folder is None and resume:
            raise ConfigError("resume needs checkpoint_dir: the folder this party's checkpoints were written to")
        # Both parties must write at the same steps (each write agrees an id over the channel).
        sess.agree((folder is not None, every if folder is not None else None, resume), what="checkpointing (checkpoint_dir set, checkpoint_every, resume)")
        if folder is None:
            return None
        store = PartyCheckpoints(folder, role=sess.role, job_digest=job_digest, terms_digest=terms_digest)
        return cls(store, sess=sess, progress=progress, every=every, resume=resume, stop_after=stop_after)

    def agree_resume(self) -> tuple[Checkpoint, torch.Tensor | None] | None:
        """Agree with the peer on the checkpoint to continue from (None: start from step 0)."""
        mine = self.store.available()  # refuses files of another job, terms or role
        listed = [(r.step, r.checkpoint_id) for r in mine]
        theirs = {r: self.sess.broadcast(listed, src=r) for r in (Role.MODEL_OWNER, Role.DATA_OWNER)}
        peer = theirs[Role.DATA_OWNER if self.sess.role is Role.MODEL_OWNER else Role.MODEL_OWNER]
        if not self.resume:
            if mine or peer:
                held = ", ".join(f"{r.value}: steps {[s for s, _ in v]}" for r, v in theirs.items())
                raise ConfigError(
                    f"checkpoint_dir already holds checkpoints of this job ({held}); resume it (payload resume=True, "
                    "`secfwt job resume`) or empty both parties' folders to start over"
                )
            return None
        ref = common_checkpoint(mine, [tuple(x) for x in peer])
        self.sess.agree("none" if ref is None else (ref.step, ref.checkpoint_id), what="the checkpoint to resume from")
        if ref is None:
            log.warning("resume: no checkpoint both parties hold (%s); starting from step 0", {r.value: [s for s, _ in v] for r, v in theirs.items()})
            self.progress(kind="phase", phase="no common checkpoint: starting from step 0")
            return None
        ckpt, cache = self.store.load(ref)
        self.sess.agree(ckpt.prefix_id, what="the cached prefix of the checkpoint")
        self.progress(kind="phase", phase=f"resumed from step {ckpt.step}")
        log.info("resuming from step %d (checkpoint %s)", ckpt.step, ckpt.checkpoint_id)
        self._restored = ckpt
        if cache is not None:
            self._prefix_id = ckpt.prefix_id
        return ckpt, cache

    def start(self, *, joint_seed: int, accuracy_before: float | None, cache: Any, resumed: Checkpoint | None) -> None:
        """Called once the job is where the tuning loop starts (restored or from scratch)."""
        from secfwt.mpc.seeding import insecure_reseed

        self._seed, self._acc_before, self._cache = joint_seed, accuracy_before, cache
        if resumed is not None:
            insecure_reseed(f"step/{resumed.step}")  # the same reseed the writer did (tests only)

    def history(self) -> list[dict[str, Any]]:
        return [] if self._restored is None else [dict(h) for h in self._restored.history]

    def local_state(self) -> Any:
        return None if self._restored is None else self._restored.local

    def _agreed_id(self) -> str:
        return str(self.sess.broadcast(secrets.token_hex(8) if self.sess.role is Role.MODEL_OWNER else None, src=Role.MODEL_OWNER))

    def after_step(self, step: int, *, history: list[dict[str, Any]], theta: dict[str, Any], local: Any = None) -> None:
        """Write this party's checkpoint if ``step`` is a checkpoint step (between steps only)."""
        if step % self.every:
            return
        from secfwt.mpc.seeding import insecure_reseed

        checkpoint_id = self._agreed_id()
        if not self._prefix_id and is_shared(self._cache):
            self._prefix_id = self._agreed_id()
            self.store.write_prefix(self._prefix_id, share_of(self._cache))
        path = self.store.write(
            step=step,
            checkpoint_id=checkpoint_id,
            joint_seed=self._seed,
            history=history,
            accuracy_before=self._acc_before,
            theta_shares={n: share_of(x) for n, x in theta.items()},
            precision_bits=precision_bits(),
            prefix_id=self._prefix_id,
            local=local() if callable(local) else local,
        )
        self.written.append(step)
        log.info("checkpoint of step %d written to %s", step, path)
        self.progress(kind="checkpoint", step=step, path=str(path))
        insecure_reseed(f"step/{step}")  # tests only: later randomness no longer depends on the past
        if self.stop_after is not None and step == self.stop_after:
            raise CheckpointStop(step)


def _restore_theta(ckpt: Checkpoint, trainable: TrainableSet) -> dict[str, Any]:
    names = set(trainable.names)
    if set(ckpt.theta_shares) != names:
        raise ConfigError(f"checkpoint of step {ckpt.step} holds parameters {sorted(ckpt.theta_shares)}, the job trains {sorted(names)}")
    out = {}
    for n, shape in trainable.shapes:
        share = ckpt.theta_shares[n]
        if tuple(share.shape) != tuple(shape):
            raise ConfigError(f"checkpoint of step {ckpt.step}: {n} has shape {tuple(share.shape)}, the job's is {tuple(shape)}")
        out[n] = from_share(share, ckpt.precision_bits)
    return out


def _deliver(sess: PartySession, cfg: JobConfig, theta: dict[str, Any], local: dict[str, torch.Tensor], out_dir: Path) -> dict[str, str]:
    """Reveal the tuned parameters to the owners the terms name and save them there.

    ``local`` holds values this party already owns in the clear (the data owner's prompt in
    SecFwT mode); they are saved without any reveal.
    """
    to = sess.discloser.terms.recipients(Revealable.FINAL_PARAMETERS)
    saved: dict[str, str] = {}
    if local:
        path = out_dir / "prompt.pt"
        torch.save(local, path)
        saved["prompt"] = str(path)
    if not to:
        return saved
    values = {}
    for name, x in theta.items():
        v = sess.discloser.reveal(x, value=Revealable.FINAL_PARAMETERS, to=to, note=name)
        if v is not None:
            values[name] = v
    if values:
        path = out_dir / "final_parameters.pt"
        torch.save(values, path)
        saved["final_parameters"] = str(path)
    return saved
