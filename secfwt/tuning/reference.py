"""Plaintext reference of a ZO job: the same tuner, schedule and directions, in float64 torch.

Given the joint seed of an MPC run, :func:`plain_zo_run` replays the job as if one party held
both model and data; the MPC run must track it step for step within fixed-point error
(tests/runtime/test_zo_tracking.py).
"""

from __future__ import annotations

from typing import Any

import torch

from secfwt.config import JobConfig
from secfwt.models.encoder import EncoderModel, plain_params
from secfwt.models.ops import PlainOps
from secfwt.models.spec import ModelSpec, Pooling
from secfwt.runtime.forward import CachedForward, batch_indices, mean_pool_weights, prefix
from secfwt.runtime.job import DataOwnerInputs, forward_settings, trainable_set
from secfwt.dp.accounting import DPPlan
from secfwt.dp.zo import NOISE_CONTRIBUTORS
from secfwt.tuning.spsa import DPZOSettings, SPSASettings, directions, dp_spsa_step, spsa_step
from secfwt.tuning.trainable import initial_values


def plain_zo_run(cfg: JobConfig, *, spec: ModelSpec, state: dict[str, torch.Tensor], data: DataOwnerInputs, seed: int, dp_plan: DPPlan | None = None, dp_seed: int = 0) -> dict[str, Any]:
    """Replay a ZO job in plaintext; with ``dp_plan``, replay DP-ZO with the Poisson masks and
    both parties' noise drawn from ``dp_seed`` (a plaintext study, not a private run)."""
    ops = PlainOps()
    settings = forward_settings(cfg, seed=cfg.job.seed)
    trainable = trainable_set(cfg, spec)
    init = initial_values(spec, state, trainable, seed=cfg.job.seed)
    theta = {n: init[n].to(torch.float64) for n in trainable.names}
    frozen = {k: v for k, v in plain_params(state).items() if k not in trainable.names}
    params = plain_params(state)
    mask = data.attention_mask.to(torch.float64)
    pool_w = mean_pool_weights(data.attention_mask) if cfg.model.pooling is Pooling.MEAN else None
    onehot = torch.nn.functional.one_hot(data.labels, data.num_labels).to(torch.float64)
    word = params[spec.word_embeddings][data.input_ids]
    cut = trainable.first_layer(spec)
    cache = prefix(EncoderModel(spec, frozen, ops, settings), word, mask, pool_w, cut=cut)
    runner = CachedForward(ops=ops, public=lambda t: t.to(torch.float64), spec=spec, frozen=frozen, settings=settings, cache=cache, mask=mask, pool_w=pool_w, onehot=onehot, cut=cut, prompt_layer=cfg.zo.prompt_layer)
    z = cfg.zo
    n, n_train = data.input_ids.shape[0], data.n_train
    eval_idx = list(range(n_train, n))
    acc_before = float(runner.correct_count(theta, eval_idx, batch=n, prompt=None)) / len(eval_idx)
    losses, gs_all = [], []
    s = SPSASettings(lr=z.lr, eps=z.eps, directions=z.directions)
    coins = torch.Generator().manual_seed(dp_seed)
    for step in range(z.steps):
        us = directions(seed=seed, step=step, shapes=trainable.shapes, count=z.directions)
        if dp_plan is not None:
            rows = list(range(n_train))
            mask = torch.bernoulli(torch.full((n_train,), dp_plan.sample_rate, dtype=torch.float64), generator=coins)
            noises = [torch.randn(z.directions, generator=coins, dtype=torch.float64) * (dp_plan.noise_multiplier * dp_plan.max_grad_norm) for _ in range(NOISE_CONTRIBUTORS)]
            dp = DPZOSettings(clip=dp_plan.max_grad_norm, expected_batch=dp_plan.expected_batch)
            theta, gs, mean_loss = dp_spsa_step(lambda ps: runner.example_losses(ps, rows), theta, us=us, settings=s, dp=dp, mask=mask, noises=noises, clip=torch.clamp, cast=lambda t: t.to(torch.float64))
        else:
            idx = batch_indices(seed=seed, n_train=n_train, batch=z.batch_size, step=step)
            theta, gs, mean_loss = spsa_step(lambda ps, idx=idx: runner.losses(ps, idx), theta, us=us, settings=s, cast=lambda t: t.to(torch.float64))
        losses.append(float(mean_loss))
        gs_all.append([float(g) for g in gs])
    acc_after = float(runner.correct_count(theta, eval_idx, batch=n, prompt=None)) / len(eval_idx)
    return {"theta": theta, "losses": losses, "gs": gs_all, "accuracy_before": acc_before, "accuracy_after": acc_after}
