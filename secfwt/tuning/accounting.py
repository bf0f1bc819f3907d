"""Privacy accounting for both DP paths (Opacus DP-SGD baseline and DP-ZO in MPC).

Both mechanisms are the Poisson-subsampled Gaussian mechanism repeated ``steps`` times: per
step each training row is included with probability ``sample_rate``; the released sum has L2
sensitivity ``max_grad_norm`` (per-example gradients clipped in DP-SGD, per-example projected
differences clipped in DP-ZO) and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm``. Neighbouring datasets differ by adding or removing one
row. The epsilon arithmetic is Opacus's accountants (RDP or PRV), not ours; the tests check
it against Google's independent ``dp-accounting`` library.

:func:`plan` turns a job's ``[dp]`` section and the number of training rows into the settings
of a run and refuses impossible ones (before any party process starts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from secfwt.config import AccountantName, DPSection
from secfwt.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DPPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    accountant: AccountantName
    epsilon: float  # what ``steps`` steps spend at ``noise_multiplier``
    target_epsilon: float | None
    n_train: int

    @property
    def expected_batch(self) -> float:
        return self.sample_rate * self.n_train

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["accountant"] = self.accountant.value
        d["expected_batch"] = self.expected_batch
        return d


def make_accountant(name: AccountantName) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name is AccountantName.RDP else PRVAccountant()


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = AccountantName.RDP,
) -> float:
    """(epsilon, delta)-DP of ``steps`` Poisson-subsampled Gaussian steps."""
    acc = make_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = AccountantName.RDP,
) -> float:
    """The smallest noise multiplier (to Opacus's 0.01 tolerance) whose epsilon is <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant.value,
                epsilon_tolerance=0.01,
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"dp.target_epsilon = {target_epsilon}: unreachable with {steps} steps at sample rate "
            f"{sample_rate:.4g} ({exc}); raise the target or lower the steps"
        ) from exc


def plan(
    dp: DPSection,
    *,
    n_train: int,
    batch_size: int,
    steps: int,
    where: str = "[dp]",
    steps_key: str = "zo.steps",
) -> DPPlan:
    """Validate ``dp`` against the data size and return the run's settings (no work done yet)."""
    if n_train < 1:
        raise ConfigError(f"{where}: no training rows; DP needs data")
    if dp.delta >= 1.0 / n_train:
        raise ConfigError(
            f"{where}: dp.delta = {dp.delta:g} is not below 1 / (training rows) = 1/{n_train} = "
            f"{1 / n_train:.3g}; "
            f"such a delta allows releasing a whole row. Use dp.delta <= {0.1 / n_train:.1g}"
        )
    if dp.sample_rate is not None:
        rate = dp.sample_rate
    else:
        rate = batch_size / n_train
        if rate > 1:
            raise ConfigError(
                f"{where}: sample rate zo.batch_size / training rows = {batch_size}/{n_train} = "
                f"{rate:.3g} exceeds 1; "
                f"lower zo.batch_size to at most {n_train} or set dp.sample_rate"
            )
    if not 0 < rate <= 1:
        raise ConfigError(
            f"{where}: dp.sample_rate = {rate}: a Poisson sampling rate must be in (0, 1]"
        )
    if steps < 1:
        raise ConfigError(f"{where}: {steps_key} = {steps}: must be >= 1")
    if dp.target_epsilon is None and dp.noise_multiplier is None:
        raise ConfigError(
            f"{where}: set dp.target_epsilon (noise calibrated to it) or dp.noise_multiplier"
        )
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
        eps = epsilon(
            noise_multiplier=sigma,
            sample_rate=rate,
            steps=steps,
            delta=dp.delta,
            accountant=dp.accountant,
        )
        if dp.target_epsilon is not None and eps > dp.target_epsilon:
            affordable = _affordable_steps(dp, sigma=sigma, rate=rate, steps=steps)
            fewer = (
                f"lower {steps_key} to at most {affordable},"
                if affordable
                else "even one step is over budget, so"
            )
            raise ConfigError(
                f"{where}: {steps} steps at dp.noise_multiplier = {sigma:g} and sample rate "
                f"{rate:.4g} spend epsilon = {eps:.3f}, "
                f"over the budget dp.target_epsilon = {dp.target_epsilon:g}; {fewer} raise "
                "dp.noise_multiplier, "
                "or drop dp.noise_multiplier to calibrate the noise to the budget"
            )
    else:
        assert dp.target_epsilon is not None
        sigma = noise_for_epsilon(
            target_epsilon=dp.target_epsilon,
            sample_rate=rate,
            steps=steps,
            delta=dp.delta,
            accountant=dp.accountant,
        )
        eps = epsilon(
            noise_multiplier=sigma,
            sample_rate=rate,
            steps=steps,
            delta=dp.delta,
            accountant=dp.accountant,
        )
    if not math.isfinite(eps):
        raise ConfigError(
            f"{where}: epsilon is infinite for these settings; raise dp.noise_multiplier or "
            "dp.target_epsilon"
        )
    return DPPlan(
        noise_multiplier=sigma,
        sample_rate=rate,
        steps=steps,
        delta=dp.delta,
        max_grad_norm=dp.max_grad_norm,
        accountant=dp.accountant,
        epsilon=eps,
        target_epsilon=dp.target_epsilon,
        n_train=n_train,
    )


def _affordable_steps(dp: DPSection, *, sigma: float, rate: float, steps: int) -> int:
    """Largest step count within the budget (binary search; epsilon grows with steps)."""
    assert dp.target_epsilon is not None
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (
            epsilon(
                noise_multiplier=sigma,
                sample_rate=rate,
                steps=mid,
                delta=dp.delta,
                accountant=dp.accountant,
            )
            <= dp.target_epsilon
        ):
            lo = mid
        else:
            hi = mid - 1
    return lo
