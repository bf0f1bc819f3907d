"""Zeroth-order SGD with simultaneous perturbations (SPSA, Spall 1992; MeZO, Malladi et al. 2023).

One step, for q directions u_1..u_q drawn from a seed both parties generated jointly:

    g_i = (L(theta + eps u_i) - L(theta - eps u_i)) / (2 eps)  (secret scalar)
    theta <- theta - lr / q * sum_i g_i u_i                      (public direction x secret scalar)

Written against plain tensors and CrypTen tensors alike: in MPC theta and g_i are secret
shares, u_i is public, so the update is local (no communication) and no backward pass or
optimizer state exists. :func:`spsa_step` with plain tensors is the plaintext reference the
MPC run is tested against step for step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class SPSASettings:
    lr: float
    eps: float
    directions: int


class Perturbed(Mapping[str, Any]):
    """A variant ``base + offset`` of a parameter set, keeping both parts: the offset is public
    (a direction times +-eps), so a loss that is linear in these parameters can compute its base
    part once for all variants and each offset's part locally
    (:meth:`secfwt.tuning.forward.CachedForward.example_losses`). The sums are formed when first
    read: that path reads none (in MPC, 256 share additions a step of the default job, 30 ms)."""

    def __init__(self, base: Params, offset: dict[str, torch.Tensor]) -> None:
        self.base, self.offset = base, offset
        self._sums: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._sums:
            self._sums[name] = self.base[name] + self.offset[name]
        return self._sums[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def perturbed(
    params: Params, u: dict[str, torch.Tensor], eps: float, cast: Callable[[torch.Tensor], Any]
) -> Perturbed:
    """``params + eps * u`` (``eps`` may be negative) as a :class:`Perturbed`."""
    return Perturbed(params, {n: cast(u[n]) * eps for n in params})


def directions(
    *, seed: int, step: int, shapes: tuple[tuple[str, tuple[int, ...]], ...], count: int
) -> list[dict[str, torch.Tensor]]:
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
    factors: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], list[Any], Any]:
    """One SPSA step. Returns (new params, projected gradients g_i, mean of L(theta + eps u_i)).

    ``losses`` evaluates a list of parameter sets at once (in MPC all 2q evaluations then share
    their communication rounds). ``factors``: public per-tensor step factors (see
    :func:`_update`).
    """
    eps, lr, q = settings.eps, settings.lr, len(us)
    variants: list[Params] = []
    for u in us:
        variants += [perturbed(params, u, eps, cast), perturbed(params, u, -eps, cast)]
    values = losses(variants)
    gs = [(values[2 * i] - values[2 * i + 1]) * (1.0 / (2 * eps)) for i in range(q)]
    new = _update(params, gs, us, lr=lr, cast=cast, factors=factors)
    mean_plus = values[0]
    for i in range(1, q):
        mean_plus = mean_plus + values[2 * i]
    return new, gs, mean_plus * (1.0 / q)


def _update(
    params: Params,
    gs: list[Any],
    us: list[dict[str, torch.Tensor]],
    *,
    lr: float,
    cast: Callable[[torch.Tensor], torch.Tensor],
    factors: Mapping[str, float] | None,
) -> dict[str, Any]:
    """theta_n <- theta_n - lr * m_n / q * sum_i g_i u_i,n for each tensor n, the ZO and DP-ZO
    update alike. ``factors`` are the public m_n (:mod:`secfwt.tuning.swat`; None: all 1); a
    tensor with m_n = 0 keeps its value as it is (no arithmetic, so bit-identical)."""
    q = len(us)
    new = {}
    for n in params:
        m = 1.0 if factors is None else factors[n]
        if m == 0.0:
            new[n] = params[n]
            continue
        upd: Any = None  # the sum over directions (a share in MPC)
        for g, u in zip(gs, us, strict=True):
            term = g * cast(u[n])  # secret scalar x public direction: local in MPC
            upd = term if upd is None else upd + term
        new[n] = params[n] - upd * (lr * m / q)
    return new


@dataclasses.dataclass(frozen=True)
class DPZOSettings:
    """DP-ZO (DPZero, Zhang et al. 2023; DP-ZO, Tang et al. 2024), the q-direction form.

    Each example's q projected differences d_j = (d_1j..d_qj) are clipped coordinate-wise to
    +-clip/sqrt(q), so ||d_j||_2 <= clip: adding or removing one example moves the summed
    vector by at most ``clip`` in L2, the sensitivity the Gaussian accountant assumes.
    ``expected_batch`` (sample rate x training rows, public) normalises the noisy sum, as
    Opacus does for Poisson batches.
    """

    clip: float
    expected_batch: float


def dp_spsa_step(
    example_losses: Callable[[list[Params]], Any],
    params: Params,
    *,
    us: list[dict[str, torch.Tensor]],
    settings: SPSASettings,
    dp: DPZOSettings,
    mask: Any,
    noises: list[Any],
    clip: Callable[[Any, float, float], Any],
    cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    factors: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], Any, Any]:
    """One DP-ZO step; returns (new params, noisy projected gradients (q,), masked mean loss).

    ``example_losses`` maps 2q parameter sets to per-example losses (2q, B) on the candidate
    rows; ``mask`` (B,) is the Poisson sample (0/1, secret in MPC); ``noises`` are the
    parties' Gaussian contributions (each (q,), secret-shared by its owner). Only the noisy,
    normalised sum g~ enters the parameters, so they are a post-processing of g~.
    """
    eps, lr, q = settings.eps, settings.lr, len(us)
    variants: list[Params] = [perturbed(params, u, eps, cast) for u in us]
    variants += [perturbed(params, u, -eps, cast) for u in us]
    losses = example_losses(variants)  # (2q, B)
    d = (losses[:q] - losses[q:]) * (1.0 / (2 * eps))  # (q, B) per-example projected differences
    bound = dp.clip / q**0.5
    g = (clip(d, -bound, bound) * mask).sum(1)  # (q,) masked sum over the Poisson sample
    for z in noises:
        g = g + z
    g = g * (1.0 / dp.expected_batch)
    new = _update(params, [g[i] for i in range(q)], us, lr=lr, cast=cast, factors=factors)
    mean_plus = (losses[:q].mean(0) * mask).sum() * (1.0 / dp.expected_batch)
    return new, g, mean_plus
