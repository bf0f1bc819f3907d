"""The tuning loops: ZO (SPSA/MeZO), DP-ZO and CMA-ES prompt search, over either backend.

One copy of each loop runs both the MPC job (:mod:`secfwt.runtime.job`: parameters and losses
are secret shares) and its plaintext reference (:mod:`secfwt.tuning.reference`: float64
tensors). A backend supplies only what differs: how a public direction enters its values, the
clip, where DP-ZO's private Poisson mask and noise come from, and how candidate prompts are
scored. Everything public (directions, minibatch schedule) is regenerated from the joint seed
and the step, so an MPC run and its plaintext replay make the same draws in the same order,
and a resumed run continues exactly where the checkpointed one stopped.

After each step the loops call ``on_step``; the caller reveals, records, reports and
checkpoints there (between steps only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from secfwt.tuning.accounting import DPPlan
from secfwt.tuning.cma import PromptSearch
from secfwt.tuning.forward import batch_indices
from secfwt.tuning.spsa import DPZOSettings, SPSASettings, directions, dp_spsa_step, spsa_step
from secfwt.tuning.swat import UpdateScales

Params = Mapping[str, Any]


class Losses(Protocol):
    """Losses of parameter sets on training rows (:class:`~secfwt.tuning.forward.CachedForward`)."""

    def losses(self, thetas: Sequence[Params], idx: list[int]) -> list[Any]:
        """Mean loss of each parameter set on the rows ``idx``."""
        ...

    def example_losses(self, thetas: Sequence[Params], idx: list[int]) -> Any:
        """Per-example losses (k, B) of k parameter sets on the rows ``idx``."""
        ...


class ZOBackend(Protocol):
    """What the ZO loops need from plaintext tensors or secret shares."""

    @property
    def forward(self) -> Losses: ...

    def cast(self, u: torch.Tensor) -> Any:
        """A public direction as a term of the parameters (as is in MPC, float64 in plaintext)."""
        ...

    def clip(self, x: Any, lo: float, hi: float) -> Any:
        """Elementwise clamp to [lo, hi] (a secure comparison in MPC)."""
        ...

    def private_draws(
        self, *, rows: int, rate: float, count: int, std: float
    ) -> tuple[Any, list[Any]]:
        """One DP-ZO step's private randomness, drawn in this order: the Poisson mask (rows,)
        of inclusion probability ``rate``, then each party's Gaussian noise (count,)."""
        ...


class PromptScorer(Protocol):
    """What the CMA-ES loop needs: the losses of candidate prompts, known to the searcher."""

    def candidate_losses(
        self, candidates: torch.Tensor | None, idx: list[int], *, iteration: int
    ) -> torch.Tensor | None:
        """Mean loss (population,) of each candidate prompt (population, P, H) on the rows
        ``idx``; ``candidates`` and the result are None on a party that does not search."""
        ...


#: on_step(step (1-based), parameters after the step, mean loss (as the backend holds it),
#: projected gradients of the step)
ZOStepHook = Callable[[int, dict[str, Any], Any, Any], None]
#: on_step(iteration (1-based), best candidate loss or None where this party does not search)
CMAStepHook = Callable[[int, float | None], None]


@dataclasses.dataclass(frozen=True)
class ZOSchedule:
    """The public schedule of a ZO run: which directions and rows each step uses."""

    seed: int  # the joint seed of the session
    steps: int
    n_train: int
    batch_size: int  # rows per step (plain ZO; DP-ZO steps run on all rows)
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # the trainable set's names and shapes
    spsa: SPSASettings
    scales: UpdateScales | None = None  # [safety]: public per-tensor step factors by step

    def factors(self, step: int) -> dict[str, float] | None:
        return None if self.scales is None else self.scales.factors(step)


def zo_loop(
    backend: ZOBackend,
    theta: dict[str, Any],
    *,
    schedule: ZOSchedule,
    on_step: ZOStepHook,
    start: int = 0,
) -> dict[str, Any]:
    """SPSA/MeZO steps ``start`` .. ``schedule.steps - 1``; returns the final parameters."""
    s = schedule
    for step in range(start, s.steps):
        us = directions(seed=s.seed, step=step, shapes=s.shapes, count=s.spsa.directions)
        idx = batch_indices(seed=s.seed, n_train=s.n_train, batch=s.batch_size, step=step)

        def losses(ps: list[Params], idx: list[int] = idx) -> list[Any]:
            return backend.forward.losses(ps, idx)

        theta, gs, mean_loss = spsa_step(
            losses, theta, us=us, settings=s.spsa, cast=backend.cast, factors=s.factors(step)
        )
        on_step(step + 1, theta, mean_loss, gs)
    return theta


def dp_zo_loop(
    backend: ZOBackend,
    theta: dict[str, Any],
    *,
    schedule: ZOSchedule,
    plan: DPPlan,
    on_step: ZOStepHook,
    start: int = 0,
) -> dict[str, Any]:
    """DP-ZO steps ``start`` .. ``schedule.steps - 1`` (see :mod:`secfwt.tuning.dp_zo`): each
    step runs on every training row; a private Poisson mask selects the sample and the
    parties' private Gaussian noise is added to the clipped sum. Returns the final parameters.
    """
    s = schedule
    rows = list(range(s.n_train))
    dp = DPZOSettings(clip=plan.max_grad_norm, expected_batch=plan.expected_batch)
    std = plan.noise_multiplier * plan.max_grad_norm
    q = s.spsa.directions
    for step in range(start, s.steps):
        us = directions(seed=s.seed, step=step, shapes=s.shapes, count=q)
        rate = plan.sample_rate
        mask, noises = backend.private_draws(rows=s.n_train, rate=rate, count=q, std=std)

        def losses(ps: list[Params]) -> Any:
            return backend.forward.example_losses(ps, rows)

        theta, g, mean_loss = dp_spsa_step(
            losses,
            theta,
            us=us,
            settings=s.spsa,
            dp=dp,
            mask=mask,
            noises=noises,
            clip=backend.clip,
            cast=backend.cast,
            factors=s.factors(step),
        )
        on_step(step + 1, theta, mean_loss, g)
    return theta


def cma_loop(
    scorer: PromptScorer,
    search: PromptSearch | None,
    *,
    seed: int,
    iterations: int,
    n_train: int,
    batch_size: int,
    on_step: CMAStepHook,
    start: int = 0,
) -> None:
    """CMA-ES iterations ``start`` .. ``iterations - 1`` of a prompt search (SecFwT/BBT).

    ``search`` is the searcher's optimiser state (None on the other party), updated in place:
    per iteration every candidate runs on the same public minibatch, the searcher tells
    CMA-ES their losses.
    """
    for it in range(start, iterations):
        idx = batch_indices(seed=seed, n_train=n_train, batch=batch_size, step=it)
        cands = search.ask() if search is not None else None  # (pop, P, H), searcher only
        losses = scorer.candidate_losses(cands, idx, iteration=it)  # (pop,) or None
        loss = None
        if search is not None and losses is not None:
            search.tell(losses.tolist())
            loss = float(losses.min())
        on_step(it + 1, loss)


def candidate_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, population: int
) -> torch.Tensor:
    """Mean cross-entropy (population,) of each candidate from its logits (population * B, C),
    row k * B + i holding candidate k on example i, against the B labels (float64)."""
    b = len(labels)
    flat = logits.view(population, b, -1).reshape(population * b, -1).double()
    ce = torch.nn.functional.cross_entropy(flat, labels.repeat(population), reduction="none")
    return ce.view(population, b).mean(1)
