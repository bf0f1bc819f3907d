"""Plaintext reference of a ZO job: the same loop, schedule and directions, in float64 torch.

Given the joint seed of an MPC run, :func:`plain_zo_run` replays the job as if one party held
both model and data; the MPC run must track it step for step within fixed-point error
(tests/runtime/test_zo_tracking.py). The steps are :func:`secfwt.tuning.loops.zo_loop` and
:func:`~secfwt.tuning.loops.dp_zo_loop`, the very loops the MPC job runs on secret shares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from secfwt.config import JobConfig
from secfwt.data.inputs import DataOwnerInputs
from secfwt.models.encoder import EncoderModel, plain_params
from secfwt.models.ops import PlainOps
from secfwt.models.spec import ModelSpec, Pooling
from secfwt.tuning.accounting import DPPlan
from secfwt.tuning.dp_zo import NOISE_CONTRIBUTORS
from secfwt.tuning.forward import CachedForward, forward_settings, mean_pool_weights, prefix
from secfwt.tuning.loops import ZOSchedule, candidate_losses, dp_zo_loop, zo_loop
from secfwt.tuning.spsa import SPSASettings
from secfwt.tuning.trainable import initial_values, trainable_set


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


@dataclasses.dataclass(frozen=True)
class PlainBackend:
    """The loops' backend in plaintext: float64 tensors; DP-ZO's private coins come from
    ``coins`` (a plaintext study, not a private run)."""

    forward: CachedForward
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
        pop = int(candidates.shape[0])
        prompts = _float64(candidates.repeat_interleave(len(idx), dim=0))  # (pop * B, P, H)
        rows = [i for _ in range(pop) for i in idx]  # row k*B + i: candidate k, example i
        logits = self.forward.logits({}, rows, prompt=prompts)
        return candidate_losses(logits, self.labels[torch.tensor(idx)], population=pop)


def plain_zo_run(
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    data: DataOwnerInputs,
    seed: int,
    dp_plan: DPPlan | None = None,
    dp_seed: int = 0,
) -> dict[str, Any]:
    """Replay a ZO job in plaintext; with ``dp_plan``, replay DP-ZO with the Poisson masks and
    both parties' noise drawn from ``dp_seed`` (a plaintext study, not a private run).

    Returns ``theta`` (final parameters), ``losses`` and ``gs`` (per step), accuracies.
    """
    ops = PlainOps()
    settings = forward_settings(cfg, seed=cfg.job.seed)
    trainable = trainable_set(cfg, spec)
    init = initial_values(spec, state, trainable, seed=cfg.job.seed)
    theta = {n: init[n].to(torch.float64) for n in trainable.names}
    params = plain_params(state)
    frozen = {k: v for k, v in params.items() if k not in trainable.names}
    mask = data.attention_mask.to(torch.float64)
    pool_w = mean_pool_weights(data.attention_mask) if cfg.model.pooling is Pooling.MEAN else None
    onehot = torch.nn.functional.one_hot(data.labels, data.num_labels).to(torch.float64)
    word = params[spec.word_embeddings][data.input_ids]
    cut = trainable.first_layer(spec)
    cache = prefix(EncoderModel(spec, frozen, ops, settings), word, mask, pool_w, cut=cut)
    runner = CachedForward(
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
        prompt_layer=cfg.zo.prompt_layer,
    )
    z = cfg.zo
    n, n_train = data.input_ids.shape[0], data.n_train
    eval_idx = list(range(n_train, n))
    acc_before = float(runner.correct_count(theta, eval_idx, batch=n, prompt=None)) / len(eval_idx)
    losses: list[float] = []
    gs_all: list[list[float]] = []

    def on_step(step: int, theta: dict[str, Any], mean_loss: Any, gs: Any) -> None:
        losses.append(float(mean_loss))
        gs_all.append([float(g) for g in gs])

    backend = PlainBackend(forward=runner, coins=torch.Generator().manual_seed(dp_seed))
    schedule = ZOSchedule(
        seed=seed,
        steps=z.steps,
        n_train=n_train,
        batch_size=z.batch_size,
        shapes=trainable.shapes,
        spsa=SPSASettings(lr=z.lr, eps=z.eps, directions=z.directions),
    )
    if dp_plan is not None:
        theta = dp_zo_loop(backend, theta, schedule=schedule, plan=dp_plan, on_step=on_step)
    else:
        theta = zo_loop(backend, theta, schedule=schedule, on_step=on_step)
    acc_after = float(runner.correct_count(theta, eval_idx, batch=n, prompt=None)) / len(eval_idx)
    return {
        "theta": theta,
        "losses": losses,
        "gs": gs_all,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
    }
