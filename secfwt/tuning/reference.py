"""Plaintext reference of a ZO job: the same loop, schedule and directions, in float64 torch.

Given the joint seed of an MPC run, :func:`plain_zo_run` replays the job as if one party held
both model and data; the MPC run must track it step for step within fixed-point error
(tests/runtime/test_zo_tracking.py). The steps are :func:`secfwt.tuning.loops.zo_loop` and
:func:`~secfwt.tuning.loops.dp_zo_loop`, the very loops the MPC job runs on secret shares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from secfwt.config import JobConfig
from secfwt.data.inputs import DataOwnerInputs, InstructionInputs, slot_selection
from secfwt.data.refusal_margin import MarginRows, margin_score
from secfwt.models.decoder import DecoderModel
from secfwt.models.encoder import EncoderModel, plain_params
from secfwt.models.ops import PlainOps
from secfwt.models.spec import EmbeddingMode, ModelSpec, Pooling
from secfwt.tuning.accounting import DPPlan
from secfwt.tuning.causal_lm import (
    CausalLMForward,
    PromptSlots,
    ResponseTargets,
    causal_prefix,
)
from secfwt.tuning.cma import CMASettings, PromptSearch
from secfwt.tuning.dp_zo import NOISE_CONTRIBUTORS
from secfwt.tuning.forward import CachedForward, forward_settings, mean_pool_weights, prefix
from secfwt.tuning.loops import (
    PromptScorer,
    ZOSchedule,
    candidate_losses,
    cma_loop,
    dp_zo_loop,
    zo_loop,
)
from secfwt.tuning.spsa import SPSASettings
from secfwt.tuning.swat import update_scales
from secfwt.tuning.trainable import initial_values, trainable_set


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


@dataclasses.dataclass(frozen=True)
class PlainBackend:
    """The loops' backend in plaintext: float64 tensors; DP-ZO's private coins come from
    ``coins`` (a plaintext study, not a private run)."""

    forward: CachedForward | CausalLMForward
    coins: torch.Generator
    labels: torch.Tensor | None = None  # (N,) long, for scoring candidate prompts

    def cast(self, u: torch.Tensor) -> torch.Tensor:
        return _float64(u)

    def clip(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.clamp(x, lo, hi)

    def private_draws(
        self, *, rows: int, rate: float, count: int, std: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rates = torch.full((rows,), rate, dtype=torch.float64)
        mask = torch.bernoulli(rates, generator=self.coins)  # (rows,) 0/1
        noises = [
            torch.randn(count, generator=self.coins, dtype=torch.float64) * std
            for _ in range(NOISE_CONTRIBUTORS)
        ]
        return mask, noises

    def candidate_losses(
        self, candidates: torch.Tensor | None, idx: list[int], *, iteration: int
    ) -> torch.Tensor | None:
        if candidates is None or self.labels is None:
            return None
        assert isinstance(self.forward, CachedForward)  # prompt search: classification jobs
        pop = int(candidates.shape[0])
        prompts = _float64(candidates.repeat_interleave(len(idx), dim=0))  # (pop * B, P, H)
        rows = [i for _ in range(pop) for i in idx]  # row k*B + i: candidate k, example i
        logits = self.forward.logits({}, rows, prompt=prompts)
        return candidate_losses(logits, self.labels[torch.tensor(idx)], population=pop)


def _plain_forward(
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    data: DataOwnerInputs,
    frozen_out: Sequence[str],
    cut: int,
    prompt_layer: int,
    attention_cached: bool = False,
) -> CachedForward:
    """The job's cached forward in float64, every value but ``frozen_out`` frozen, the prefix
    below layer ``cut`` (and with ``attention_cached`` that layer's attention half) computed
    once, as the MPC job caches it in shares."""
    ops = PlainOps()
    settings = forward_settings(cfg, seed=cfg.job.seed)
    params = plain_params(state)
    frozen = {k: v for k, v in params.items() if k not in frozen_out}
    mask = data.attention_mask.to(torch.float64)
    pool_w = mean_pool_weights(data.attention_mask) if cfg.model.pooling is Pooling.MEAN else None
    onehot = torch.nn.functional.one_hot(data.labels, data.num_labels).to(torch.float64)
    word = params[spec.word_embeddings][data.input_ids]
    cache = prefix(
        EncoderModel(spec, frozen, ops, settings),
        word,
        mask,
        pool_w,
        cut=cut,
        attention_cached=attention_cached,
    )
    return CachedForward(
        ops=ops,
        public=_float64,
        spec=spec,
        frozen=frozen,
        settings=settings,
        cache=cache,
        mask=mask,
        pool_w=pool_w,
        onehot=onehot,
        cut=cut,
        prompt_layer=prompt_layer,
        attention_cached=attention_cached,
    )


def _plain_causal_forward(
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    data: InstructionInputs,
    frozen_out: Sequence[str],
    cut: int,
) -> CausalLMForward:
    """A causal-LM job's cached forward in float64: the prefix below ``cut`` computed once,
    the target rows of the LM head looked up once (as the MPC job shares them)."""
    ops = PlainOps()
    settings = forward_settings(cfg, seed=cfg.job.seed)
    params = plain_params(state)
    frozen = {k: v for k, v in params.items() if k not in frozen_out}
    mask = data.attention_mask.to(torch.float64)
    head = params.get("lm_head.weight", params[spec.word_embeddings])  # (V, H)
    word = params[spec.word_embeddings][data.input_ids]
    model = DecoderModel(spec, frozen, ops, settings)
    prompt = None
    if data.prompt_slots is not None:
        slots = data.prompt_slots.to(torch.float64)
        selection = slot_selection(data.prompt_slots, cfg.zo.soft_prompt_length).double()
        prompt = PromptSlots(slots=slots, selection=selection, layer=cfg.zo.prompt_layer)
    slots_or_none = None if prompt is None else prompt.slots
    cache = causal_prefix(model, word, mask, cut=cut, window=data.window, slots=slots_or_none)
    return CausalLMForward(
        ops=ops,
        spec=spec,
        frozen=frozen,
        settings=settings,
        cache=cache,
        mask=mask,
        targets=ResponseTargets(
            rows=head[data.target_ids], weights=data.target_weights.to(torch.float64)
        ),
        cut=cut,
        window=data.window,
        prompt=prompt,
    )


def plain_gate_score(
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    rows: MarginRows,
    theta: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """The safety gate's score (:mod:`secfwt.data.refusal_margin`) in float64, with the job's
    trainable values ``theta`` (None: their initial values), on the rows the job scores.
    ``theta`` may hold Safe Delta's full weight deltas (``"<module>.weight_delta"``) in place
    of a module's LoRA factors (:meth:`~secfwt.models.transformer.TransformerModel.linear`)."""
    trainable = trainable_set(cfg, spec)
    if theta is None:
        theta = initial_values(spec, state, trainable, seed=cfg.job.seed)
    data = InstructionInputs(
        input_ids=rows.input_ids,
        attention_mask=rows.attention_mask,
        target_ids=rows.target_ids,
        target_weights=rows.target_weights,
        n_train=0,
    )
    runner = _plain_causal_forward(
        cfg,
        spec=spec,
        state=state,
        data=data,
        frozen_out=trainable.names,
        cut=trainable.first_layer(spec),
    )
    plain = {n: v.to(torch.float64) for n, v in theta.items()}
    losses = runner.example_losses([plain], list(range(len(rows.row_weights))))[0]
    return margin_score(losses, rows)


@dataclasses.dataclass
class _Recording:
    """A prompt scorer that keeps every candidate loss it returns (per iteration)."""

    inner: PromptScorer
    seen: list[list[float]] = dataclasses.field(default_factory=list)

    def candidate_losses(
        self, candidates: torch.Tensor | None, idx: list[int], *, iteration: int
    ) -> torch.Tensor | None:
        out = self.inner.candidate_losses(candidates, idx, iteration=iteration)
        if out is not None:
            self.seen.append(out.tolist())
        return out


def plain_zo_run(
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    data: DataOwnerInputs | InstructionInputs,
    seed: int,
    dp_plan: DPPlan | None = None,
    dp_seed: int = 0,
    after_step: Callable[[int, dict[str, Any]], None] | None = None,
    curve: bool = False,
) -> dict[str, Any]:
    """Replay a ZO job in plaintext; with ``dp_plan``, replay DP-ZO with the Poisson masks and
    both parties' noise drawn from ``dp_seed`` (a plaintext study, not a private run).
    ``after_step`` sees each step's number (1-based) and parameters.

    Returns ``theta`` (final parameters), ``losses`` and ``gs`` (per step), and the held-out
    metric before and after: ``accuracy_before`` / ``accuracy_after`` (classification) or
    ``eval_loss_before`` / ``eval_loss_after`` (causal LM: mean response loss per row); with
    ``curve``, also ``<metric>_curve``, the held-out metric after each step (for steps to a
    target accuracy).
    """
    trainable = trainable_set(cfg, spec)
    init = initial_values(spec, state, trainable, seed=cfg.job.seed)
    theta = {n: init[n].to(torch.float64) for n in trainable.names}
    cut = trainable.first_layer(spec)
    n, n_train = data.input_ids.shape[0], data.n_train
    eval_idx = list(range(n_train, n))
    runner: CachedForward | CausalLMForward
    if isinstance(data, InstructionInputs):
        causal = _plain_causal_forward(
            cfg, spec=spec, state=state, data=data, frozen_out=trainable.names, cut=cut
        )
        runner, metric = causal, "eval_loss"

        def evaluate(theta: dict[str, Any]) -> float:
            return float(causal.loss_sum(theta, eval_idx, batch=n)) / len(eval_idx)

    else:
        encoder = _plain_forward(
            cfg,
            spec=spec,
            state=state,
            data=data,
            frozen_out=trainable.names,
            cut=cut,
            prompt_layer=cfg.zo.prompt_layer,
            attention_cached=trainable.attention_frozen(spec),
        )
        runner, metric = encoder, "accuracy"

        def evaluate(theta: dict[str, Any]) -> float:
            correct = encoder.correct_count(theta, eval_idx, batch=n, prompt=None)
            return float(correct) / len(eval_idx)

    z = cfg.zo
    before = evaluate(theta)
    losses: list[float] = []
    gs_all: list[list[float]] = []
    metric_curve: list[float] = []

    def on_step(step: int, theta: dict[str, Any], mean_loss: Any, gs: Any) -> None:
        losses.append(float(mean_loss))
        gs_all.append([float(g) for g in gs])
        if curve:
            metric_curve.append(evaluate(theta))
        if after_step is not None:
            after_step(step, theta)

    backend = PlainBackend(forward=runner, coins=torch.Generator().manual_seed(dp_seed))
    schedule = ZOSchedule(
        seed=seed,
        steps=z.steps,
        n_train=n_train,
        batch_size=z.batch_size,
        shapes=trainable.shapes,
        spsa=SPSASettings(lr=z.lr, eps=z.eps, directions=z.directions),
        scales=update_scales(cfg.safety, trainable.names),
    )
    if dp_plan is not None:
        theta = dp_zo_loop(backend, theta, schedule=schedule, plan=dp_plan, on_step=on_step)
    else:
        theta = zo_loop(backend, theta, schedule=schedule, on_step=on_step)
    return {
        "theta": theta,
        "losses": losses,
        "gs": gs_all,
        f"{metric}_before": before,
        f"{metric}_after": evaluate(theta),
        **({f"{metric}_curve": metric_curve} if curve else {}),
    }


def plain_cma_run(
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    data: DataOwnerInputs,
    seed: int,
) -> dict[str, Any]:
    """Replay a SecFwT (CMA-ES prompt search) job in plaintext with the joint seed ``seed``.

    The draws are the job's: minibatches from ``seed`` and the iteration, the projection A and
    CMA-ES from ``cfg.job.seed`` (``cma`` samples from numpy's global generator, which
    :class:`~secfwt.tuning.cma.PromptSearch` seeds: nothing else may draw from it during the
    replay), A scaled by the word-embedding table's std when the table is disclosed to the data
    owner (0.05 otherwise, as the job does). Nothing of the data owner's search leaves it in a
    real job; here one process holds everything.

    Returns ``losses`` (best candidate loss per iteration, as the job's history records it),
    ``candidate_losses`` (per iteration, all candidates, in the order asked), ``prompt`` (the
    final mean prompt the data owner keeps, float32 (P, H)) and the accuracies before and after.
    """
    c = cfg.cma
    runner = _plain_forward(
        cfg,
        spec=spec,
        state=state,
        data=data,
        frozen_out=(),
        cut=c.prompt_layer,
        prompt_layer=c.prompt_layer,
    )
    table = state[spec.word_embeddings]
    private = cfg.model.embedding is EmbeddingMode.PRIVATE
    emb_std = 0.05 if private else float(table.to(torch.float32).std())
    search = PromptSearch(
        CMASettings(
            intrinsic_dim=c.intrinsic_dim,
            prompt_length=c.prompt_length,
            hidden_size=spec.hidden_size,
            population=c.population,
            sigma0=c.sigma0,
            seed=cfg.job.seed,
        ),
        embedding_std=emb_std,
    )
    n, n_train = data.input_ids.shape[0], data.n_train
    eval_idx = list(range(n_train, n))

    def accuracy(prompt: torch.Tensor | None) -> float:
        p = None if prompt is None else _float64(prompt)
        return float(runner.correct_count({}, eval_idx, batch=n, prompt=p)) / len(eval_idx)

    best: list[float] = []

    def on_step(it: int, loss: float | None) -> None:
        assert loss is not None  # this process searches
        best.append(loss)

    acc_before = accuracy(None)
    scorer = _Recording(PlainBackend(forward=runner, coins=torch.Generator(), labels=data.labels))
    cma_loop(
        scorer,
        search,
        seed=seed,
        iterations=c.iterations,
        n_train=n_train,
        batch_size=c.batch_size,
        on_step=on_step,
    )
    prompt = search.mean_prompt
    return {
        "losses": best,
        "candidate_losses": scorer.seen,
        "prompt": prompt,
        "accuracy_before": acc_before,
        "accuracy_after": accuracy(prompt),
    }
