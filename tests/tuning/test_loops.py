"""The shared tuning loops: a resumed loop continues exactly, and they are the plain steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from secfwt.config import AccountantName
from secfwt.tuning.accounting import DPPlan
from secfwt.tuning.forward import batch_indices
from secfwt.tuning.loops import ZOSchedule, dp_zo_loop, zo_loop
from secfwt.tuning.spsa import SPSASettings, directions, spsa_step

SHAPES = (("w", (3, 4)), ("b", (3,)))


class _Linear:
    """A linear classifier's cross-entropy on fixed rows (the loops' Losses protocol)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 4, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (12,), generator=g)

    def example_losses(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> torch.Tensor:
        x, y = self.x[idx], self.y[idx]
        ce = torch.nn.functional.cross_entropy
        return torch.stack([ce(x @ p["w"].T + p["b"], y, reduction="none") for p in thetas])

    def losses(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> list[Any]:
        per = self.example_losses(thetas, idx).mean(1)
        return [per[i] for i in range(len(thetas))]


@dataclasses.dataclass
class _Backend:
    forward: _Linear
    coins: torch.Generator

    def cast(self, u: torch.Tensor) -> torch.Tensor:
        return u.to(torch.float64)

    def clip(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.clamp(x, lo, hi)

    def private_draws(
        self, *, rows: int, rate: float, count: int, std: float
    ) -> tuple[Any, list[Any]]:
        mask = torch.bernoulli(torch.full((rows,), rate, dtype=torch.float64), generator=self.coins)
        return mask, [
            torch.randn(count, generator=self.coins, dtype=torch.float64) * std for _ in range(2)
        ]


def _theta() -> dict[str, Any]:
    return {"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}


SCHEDULE = ZOSchedule(
    seed=11,
    steps=6,
    n_train=12,
    batch_size=5,
    shapes=SHAPES,
    spsa=SPSASettings(lr=0.2, eps=0.05, directions=3),
)


def test_zo_loop_is_the_spsa_steps_of_the_public_schedule() -> None:
    seen: list[float] = []
    got = zo_loop(
        _Backend(_Linear(), torch.Generator()),
        _theta(),
        schedule=SCHEDULE,
        on_step=lambda k, th, loss, gs: seen.append(float(loss)),
    )
    f, theta, want = _Linear(), _theta(), []
    for step in range(SCHEDULE.steps):
        us = directions(seed=11, step=step, shapes=SHAPES, count=3)
        idx = batch_indices(seed=11, n_train=12, batch=5, step=step)
        theta, _, loss = spsa_step(
            lambda ps, idx=idx: f.losses(ps, idx),
            theta,
            us=us,
            settings=SCHEDULE.spsa,
            cast=lambda t: t.to(torch.float64),
        )
        want.append(float(loss))
    assert seen == want
    assert all(torch.equal(got[n], theta[n]) for n in theta)


PLAN = DPPlan(
    noise_multiplier=1.1,
    sample_rate=0.5,
    steps=6,
    delta=1e-3,
    max_grad_norm=1.0,
    accountant=AccountantName.RDP,
    epsilon=1.0,
    target_epsilon=None,
    n_train=12,
)


def _run(
    dp: bool, backend: _Backend, theta: dict[str, Any], schedule: ZOSchedule, **kw: Any
) -> dict[str, Any]:
    if dp:
        return dp_zo_loop(backend, theta, schedule=schedule, plan=PLAN, **kw)
    return zo_loop(backend, theta, schedule=schedule, **kw)


@pytest.mark.parametrize("dp", [False, True])
def test_a_loop_resumed_at_a_step_continues_exactly(dp: bool) -> None:
    """The checkpoint/resume contract: steps 0..3, then from start=4, equal steps 0..5."""
    full = _run(
        dp,
        _Backend(_Linear(), torch.Generator().manual_seed(3)),
        _theta(),
        SCHEDULE,
        on_step=lambda *_: None,
    )
    b = _Backend(
        _Linear(), torch.Generator().manual_seed(3)
    )  # its coins continue across both calls
    mid = _run(dp, b, _theta(), dataclasses.replace(SCHEDULE, steps=4), on_step=lambda *_: None)
    steps: list[int] = []
    rest = _run(dp, b, mid, SCHEDULE, on_step=lambda k, *_: steps.append(k), start=4)
    assert steps == [5, 6]
    assert all(torch.equal(full[n], rest[n]) for n in full)
