"""Zeroth-order SGD with simultaneous perturbations (SPSA, Spall 1992; MeZO, Malladi et al. 2023).

One step, for q directions u_1..u_q drawn from a seed both parties generated jointly:

    g_i = (L(theta + eps u_i) - L(theta - eps u_i)) / (2 eps)        (secret scalar)
    theta <- theta - lr / q * sum_i g_i u_i                            (public direction x secret scalar)

Written against plain tensors and CrypTen tensors alike: in MPC theta and g_i are secret
shares, u_i is public, so the update is local (no communication) and no backward pass or
optimizer state exists. :func:`spsa_step` with plain tensors is the plaintext reference the
MPC run is tested against step for step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class SPSASettings:
    lr: float
    eps: float
    directions: int


def directions(*, seed: int, step: int, shapes: tuple[tuple[str, tuple[int, ...]], ...], count: int) -> list[dict[str, torch.Tensor]]:
    """The public Gaussian directions of one step, regenerated from (seed, step) as in MeZO."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return [{name: torch.randn(shape, generator=g) for name, shape in shapes} for _ in range(count)]


def spsa_step(
    losses: Callable[[list[Params]], list[Any]],
    params: Params,
    *,
    us: list[dict[str, torch.Tensor]],
    settings: SPSASettings,
    cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[dict[str, Any], list[Any], Any]:
    """One SPSA step. Returns (new params, projected gradients g_i, mean of L(theta + eps u_i)).

    ``losses`` evaluates a list of parameter sets at once (in MPC all 2q evaluations then share
    their communication rounds).
    """
    eps, lr, q = settings.eps, settings.lr, len(us)
    variants: list[Params] = []
    for u in us:
        variants.append({n: params[n] + cast(u[n]) * eps for n in params})
        variants.append({n: params[n] - cast(u[n]) * eps for n in params})
    values = losses(variants)
    gs = [(values[2 * i] - values[2 * i + 1]) * (1.0 / (2 * eps)) for i in range(q)]
    new = {}
    for n in params:
        upd = None
        for g, u in zip(gs, us):
            term = g * cast(u[n])  # secret scalar x public direction: local in MPC
            upd = term if upd is None else upd + term
        new[n] = params[n] - upd * (lr / q)
    mean_plus = values[0]
    for i in range(1, q):
        mean_plus = mean_plus + values[2 * i]
    return new, gs, mean_plus * (1.0 / q)
