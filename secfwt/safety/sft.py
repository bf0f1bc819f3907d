"""Plaintext supervised fine-tuning of a causal LM on chat pairs: the model owner's own step on
public data, before any private tuning.

Full fine-tuning with AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101; torch's
implementation, no weight decay), the loss being the mean cross-entropy of the reply tokens and
their end-of-turn token (:func:`secfwt.data.chat_tokenize.masked_next_token_loss`; prompt and
template are context only). Gradients are clipped to norm 1. Each epoch visits the rows in a
seeded random order; each batch is cut to its longest row (right padding), which on CPUs saves
most of the compute since refusals are short.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from secfwt.data.chat_tokenize import InstructionBatch, masked_next_token_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SftSettings:
    epochs: int
    lr: float
    batch_size: int
    seed: int
    max_grad_norm: float = 1.0


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)


def fine_tune(
    model: Any,  # a transformers causal LM, updated in place
    batch: InstructionBatch,  # right-padded
    settings: SftSettings,
    *,
    on_step: Callable[[float], None] | None = None,
    lr_factors: Callable[[int], Mapping[str, float]] | None = None,
) -> list[float]:
    """Train every parameter of ``model`` that requires a gradient on ``batch``; returns the
    loss of each step (before its update). ``on_step(loss)`` after each step.

    ``lr_factors(step)`` (0-based), when given, maps each trained parameter's name to a factor
    on its learning rate at that step (SWAT's warm-up and per-module rates,
    :mod:`secfwt.tuning.swat`); a parameter at factor 0 is skipped by that step (its gradient is
    dropped, so AdamW's moments do not see it either).
    """
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": [p], "name": n} for n, p in named] if lr_factors else params
    optimiser = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    losses: list[float] = []
    for epoch in range(settings.epochs):
        order = torch.randperm(len(batch), generator=generator)  # (N,)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            width = int(batch.attention_mask[rows].sum(dim=1).max())
            logits = model(
                input_ids=batch.input_ids[rows, :width].to(device),
                attention_mask=batch.attention_mask[rows, :width].to(device),
            ).logits  # (B, width, V)
            loss = masked_next_token_loss(
                logits,
                batch.target_ids[rows, :width].to(device),
                batch.target_mask[rows, :width].to(device),
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if lr_factors is not None:
                factors = lr_factors(len(losses))
                for group in optimiser.param_groups:
                    group["lr"] = settings.lr * factors[group["name"]]
                    if group["lr"] == 0.0:
                        group["params"][0].grad = None
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimiser.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(losses[-1])
        n = steps_per_epoch(len(batch), settings.batch_size)
        log.info("epoch %d: mean loss %.4f", epoch + 1, sum(losses[-n:]) / n)
    model.eval()
    return losses
