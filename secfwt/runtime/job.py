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
import math
import time
from pathlib import Path
from typing import Any

import torch

from secfwt.config import JobConfig, Mode
from secfwt.errors import ConfigError
from secfwt.models.encoder import SOFT_PROMPT, EncoderModel, ForwardSettings
from secfwt.models.spec import EmbeddingMode, ModelSpec, Pooling
from secfwt.mpc.attention import RFASettings
from secfwt.mpc.disclosure import Revealable
from secfwt.mpc.launcher import PartyContext
from secfwt.roles import COMPUTING_ROLES, Role
from secfwt.runtime.inputs import disclose_table, share_word_embeddings, table_name
from secfwt.runtime.session import PartySession
from secfwt.tuning.spsa import SPSASettings, directions, spsa_step
from secfwt.tuning.trainable import TrainableSet, init_new_parameters, select_trainable

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
    cfg: JobConfig = payload["config"]
    role = ctx.role
    out_dir = Path(payload["out_dir"]) / role.value
    out_dir.mkdir(parents=True, exist_ok=True)
    sess = PartySession(role=role, terms=cfg.terms, audit_path=out_dir / "audit.jsonl")
    progress = _Progress(payload.get("progress"), role)
    t_start = time.perf_counter()
    sess.agree(cfg.terms.digest(), what="the disclosure terms (digest)")
    sess.agree(_public_job_digest(cfg), what="the job settings")

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
    trainable = _trainable(cfg, spec)
    seed = sess.joint_seed()
    settings = forward_settings(cfg, seed=cfg.job.seed)

    # -- share weights and inputs -------------------------------------------------------------
    progress(kind="phase", phase="sharing weights")
    private_table = cfg.model.embedding is EmbeddingMode.PRIVATE
    frozen_names = [n for n, _ in spec.param_shapes if (private_table or n != table_name(spec)) and n not in trainable.names]
    frozen = sess.share_params(spec, state, names=frozen_names)
    init = None
    if role is Role.MODEL_OWNER:
        assert state is not None
        init = {**{n: state[n] for n in trainable.names if n in state}, **init_new_parameters(spec, state, trainable, seed=cfg.job.seed)}
    theta = {n: sess.share(None if init is None else init[n], owner=Role.MODEL_OWNER, shape=s, name=n) for n, s in trainable.shapes}
    plain_table = disclose_table(sess, spec, state) if not private_table else None
    secret_table = frozen.get(table_name(spec))
    n, t = facts["n"], facts["t"]
    c = facts["num_labels"]
    onehot = sess.share(None if data is None else torch.nn.functional.one_hot(data.labels, c).float(), owner=Role.DATA_OWNER, shape=(n, c), name="labels")
    mask = sess.share(None if data is None else data.attention_mask.float(), owner=Role.DATA_OWNER, shape=(n, t), name="attention mask")
    pool_w = None
    if cfg.model.pooling is Pooling.MEAN:
        pw = None if data is None else data.attention_mask.float() / data.attention_mask.sum(1, keepdim=True).clamp(min=1).float()
        pool_w = sess.share(pw, owner=Role.DATA_OWNER, shape=(n, t), name="pooling weights")

    # -- frozen prefix, computed once ---------------------------------------------------------
    cut = cfg.cma.prompt_layer if cfg.job.mode is Mode.CMA else trainable.first_layer(spec)
    frozen_model = EncoderModel(spec, frozen, sess.ops, settings)
    chunks = []
    bs = cfg.run.eval_batch
    t_prefix = time.perf_counter()
    for s in range(0, n, bs):
        e = min(n, s + bs)
        ids = None if data is None else data.input_ids[s:e]
        word = share_word_embeddings(sess, spec, mode=cfg.model.embedding, input_ids=ids, shape=(e - s, t), secret_table=secret_table, plain_table=plain_table)
        chunks.append(_prefix(frozen_model, word, mask[s:e], None if pool_w is None else pool_w[s:e], cut=cut, spec=spec, trainable=trainable))
        progress(kind="prefix", done=e, total=n, elapsed=time.perf_counter() - t_prefix)
    from secfwt.crypten_compat import crypten

    cache = chunks[0] if len(chunks) == 1 else crypten.cat(chunks, dim=0)
    prefix_s = time.perf_counter() - t_prefix

    runner = _Runner(sess=sess, spec=spec, frozen=frozen, settings=settings, cache=cache, mask=mask, pool_w=pool_w, onehot=onehot, cut=cut, prompt_layer=(cfg.cma.prompt_layer if cfg.job.mode is Mode.CMA else cfg.zo.prompt_layer))
    n_train = facts["n_train"]
    eval_idx = list(range(n_train, n))
    acc_before = runner.accuracy(theta, eval_idx, batch=bs, prompt=None, note="before tuning")
    progress(kind="eval", when="before", accuracy=acc_before)

    if cfg.job.mode is Mode.ZO:
        theta, history = _tune_zo(cfg, runner, theta, trainable, seed=seed, n_train=n_train, progress=progress)
        prompt = None
    else:
        theta, prompt, history = _tune_cma(cfg, runner, spec, seed=seed, n_train=n_train, progress=progress, plain_table=plain_table, labels=None if data is None else data.labels)
    acc_after = runner.accuracy(theta, eval_idx, batch=bs, prompt=prompt, note="after tuning")
    progress(kind="eval", when="after", accuracy=acc_after)

    artifacts = _deliver(sess, cfg, theta, runner.local_artifacts, out_dir)
    return {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "steps": len(history),
        "history": history,
        "trainable": {"names": list(trainable.names), "numel": trainable.numel},
        "cut_layer": cut,
        "prefix_s": prefix_s,
        "party_wall_s": time.perf_counter() - t_start,
        "artifacts": artifacts,
        "reveals": sess.discloser.count,
        "spec": {"family": spec.family.value, "layers": spec.num_layers, "hidden": spec.hidden_size},
    }


def _public_job_digest(cfg: JobConfig) -> str:
    import hashlib
    import json

    public = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("source",)}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()


def _trainable(cfg: JobConfig, spec: ModelSpec) -> TrainableSet:
    if cfg.job.mode is Mode.CMA:
        return TrainableSet(shapes=(), new=(), prompt_layer=cfg.cma.prompt_layer)
    z = cfg.zo
    return select_trainable(spec, patterns=z.trainable, lora_modules=z.lora_modules, lora_rank=z.lora_rank, soft_prompt_length=z.soft_prompt_length, prompt_layer=z.prompt_layer, max_tokens=spec.max_tokens)


def _prefix(model: EncoderModel, word: Any, mask: Any, pool_w: Any, *, cut: int, spec: ModelSpec, trainable: TrainableSet) -> Any:
    """The frozen computation below layer ``cut`` for one chunk of sequences."""
    if cut == 0:
        return word  # embeddings are recomputed per step (the prompt enters before them)
    h = model.layers(model.embed(word), mask, stop=cut)
    if cut < spec.num_layers:
        return h
    return model.pool(h, pool_w)  # only the head trains: cache pooled features (N, H)


class _Runner:
    """Forward from the cached prefix with given trainable values (plain dict of shares)."""

    def __init__(self, *, sess: PartySession, spec: ModelSpec, frozen: dict[str, Any], settings: ForwardSettings, cache: Any, mask: Any, pool_w: Any, onehot: Any, cut: int, prompt_layer: int) -> None:
        self.sess, self.spec, self.frozen, self.settings = sess, spec, frozen, settings
        self.cache, self.mask, self.pool_w, self.onehot = cache, mask, pool_w, onehot
        self.cut, self.prompt_layer = cut, prompt_layer
        self.local_artifacts: dict[str, torch.Tensor] = {}

    def logits(self, theta: dict[str, Any], idx: list[int], *, prompt: Any = None) -> Any:
        params = {**self.frozen, **theta}
        model = EncoderModel(self.spec, params, self.sess.ops, self.settings)
        ix = torch.tensor(idx)
        x = self.cache[ix]
        if self.cut == self.spec.num_layers:
            return model.classify(x)
        mask = self.mask[ix]
        pool_w = None if self.pool_w is None else self.pool_w[ix]
        prompt = theta.get(SOFT_PROMPT, prompt)
        if prompt is None:
            h = model.embed(x) if self.cut == 0 else x
            h = model.layers(h, mask, start=self.cut)
            return model.output(h, pool_w)
        ones = self.sess.public(torch.ones(len(idx), prompt.shape[-2]))
        zeros = self.sess.public(torch.zeros(len(idx), prompt.shape[-2]))
        if self.cut == 0 and self.prompt_layer == 0:
            h, mask2 = model.insert_prompt(x, mask, prompt, ones)
            h = model.embed(h)
            start = 0
        else:
            h = model.embed(x) if self.cut == 0 else x
            h = model.layers(h, mask, start=self.cut, stop=self.prompt_layer)
            h, mask2 = model.insert_prompt(h, mask, prompt, ones)
            start = self.prompt_layer
        if pool_w is not None:
            pool_w = self.sess.ops.cat([pool_w[:, :1], zeros, pool_w[:, 1:]], dim=1)
        h = model.layers(h, mask2, start=start)
        return model.output(h, pool_w)

    def loss(self, theta: dict[str, Any], idx: list[int], *, prompt: Any = None) -> Any:
        logits = self.logits(theta, idx, prompt=prompt)
        return self.sess.ops.log_softmax_nll(logits, self.onehot[torch.tensor(idx)]).mean()

    def correct(self, logits: Any, idx: list[int]) -> Any:
        """Secret count of correct argmax predictions (ties -> lowest class, like torch.argmax)."""
        y = self.onehot[torch.tensor(idx)]
        if logits.shape[-1] == 2:
            pred1 = (logits[:, 1] - logits[:, 0]).gt(0)  # (B,)
            return (y[:, 1] * pred1 + y[:, 0] * (1 - pred1)).sum()
        return (logits.argmax(dim=-1, one_hot=True) * y).sum()

    def accuracy(self, theta: dict[str, Any], idx: list[int], *, batch: int, prompt: Any, note: str) -> float | None:
        total = None
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            c = self.correct(self.logits(theta, part, prompt=prompt), part)
            total = c if total is None else total + c
        to = self.sess.discloser.terms.recipients(Revealable.EVAL_ACCURACY)
        count = self.sess.discloser.reveal(total, value=Revealable.EVAL_ACCURACY, to=to, note=note)
        return None if count is None else float(count) / len(idx)


def _batches(*, seed: int, n_train: int, batch: int, step: int) -> list[int]:
    """Public minibatch schedule (indices only, no content): a fresh permutation per epoch."""
    per_epoch = max(1, n_train // batch) if batch < n_train else 1
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed((seed + 7919 * epoch) % (2**63))
    perm = torch.randperm(n_train, generator=g).tolist()
    if batch >= n_train:
        return perm
    return perm[k * batch : (k + 1) * batch]


def _tune_zo(cfg: JobConfig, runner: _Runner, theta: dict[str, Any], trainable: TrainableSet, *, seed: int, n_train: int, progress: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    z = cfg.zo
    settings = SPSASettings(lr=z.lr, eps=z.eps, directions=z.directions)
    loss_to = runner.sess.discloser.terms.recipients(Revealable.TRAIN_LOSS)
    history = []
    t0 = time.perf_counter()
    for step in range(z.steps):
        idx = _batches(seed=seed, n_train=n_train, batch=z.batch_size, step=step)
        us = directions(seed=seed, step=step, shapes=trainable.shapes, count=z.directions)
        theta, _gs, mean_loss = spsa_step(lambda p: runner.loss(p, idx), theta, us=us, settings=settings)
        loss = None
        if loss_to:
            v = runner.sess.discloser.reveal(mean_loss, value=Revealable.TRAIN_LOSS, to=loss_to, note=f"step {step}")
            loss = None if v is None else float(v)
        history.append({"step": step + 1, "loss": loss})
        progress(kind="step", step=step + 1, total=z.steps, loss=loss, elapsed=time.perf_counter() - t0)
    return theta, history


def _tune_cma(cfg: JobConfig, runner: _Runner, spec: ModelSpec, *, seed: int, n_train: int, progress: Any, plain_table: torch.Tensor | None, labels: torch.Tensor | None) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """SecFwT: the data owner proposes prompts, the MPC forward scores them, the data owner learns.

    Per iteration, every candidate prompt runs on the same public minibatch in one batched
    forward; only the logits of the data owner's own batch are revealed, to the data owner,
    which computes the losses and the CMA-ES update locally (``labels`` never leave it).
    """
    from secfwt.tuning.cma import CMASettings, PromptSearch

    c = cfg.cma
    sess = runner.sess
    search = None
    if sess.role is Role.DATA_OWNER:
        emb_std = float(plain_table.std()) if plain_table is not None else 0.05
        search = PromptSearch(
            CMASettings(intrinsic_dim=c.intrinsic_dim, prompt_length=c.prompt_length, hidden_size=spec.hidden_size, population=c.population, sigma0=c.sigma0, seed=cfg.job.seed),
            embedding_std=emb_std,
        )
    shape = (c.population, c.prompt_length, spec.hidden_size)
    history = []
    t0 = time.perf_counter()
    for it in range(c.iterations):
        idx = _batches(seed=seed, n_train=n_train, batch=c.batch_size, step=it)
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
    final = search.mean_prompt if search is not None else None
    prompt = sess.share(final, owner=Role.DATA_OWNER, shape=shape[1:], name="final prompt")
    if search is not None:
        runner.local_artifacts["prompt"] = final
    return {}, prompt, history


def _repeat(x: Any, times: int) -> Any:
    from secfwt.crypten_compat import crypten

    return crypten.stack([x] * times, dim=0)


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
