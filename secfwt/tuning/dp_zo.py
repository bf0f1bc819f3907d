"""DP zeroth-order updates inside MPC: each party's private randomness and the stated guarantee.

Mechanism per step (see :func:`secfwt.tuning.spsa.dp_spsa_step`): every training row is in
the step's sample with probability ``sample_rate``; the data owner draws that Poisson mask
and secret-shares it, so nobody else learns which rows were used and the computation touches
every training row (its pattern does not depend on the sample). Per-example projected
differences are clipped in MPC to L2 norm C and summed over the sample. **Each computing
party** secret-shares its own Gaussian vector N(0, (sigma C)^2 I); the sum stays secret.

What that guarantees (add/remove-one-row neighbours, Poisson-subsampled Gaussian, composed
over the steps by the job's accountant):

- against **each party alone** (semi-honest, it knows its own noise but not the other's):
  noise multiplier sigma, hence the job's headline epsilon;
- against **anyone who only sees the released result** (e.g. the final parameters handed to
  an owner and published later): both noises, multiplier sigma * sqrt(2), a smaller epsilon;
- the dealer sees only correlated randomness, nothing data-dependent.

Not covered: values the terms reveal that do not go through the noisy sum, such as held-out
accuracy (computed on evaluation rows, not training rows) or training losses revealed to
the data owner (its own data). :func:`guarantee` lists these for the report.

Randomness comes from the operating system's CSPRNG (``random.SystemRandom``): a party's
noise must be unpredictable to the other party, which knows every public seed.
Like every fixed-point MPC mechanism, the noise is added at 2^-16 resolution; the known
floating-point attacks on Gaussian samplers (Mironov 2012) are not addressed here.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from secfwt.mpc.disclosure import DisclosureTerms, Revealable
from secfwt.roles import Role
from secfwt.tuning.accounting import DPPlan, epsilon

#: Number of computing parties that each add a full-scale noise vector.
NOISE_CONTRIBUTORS = 2


class PrivateRandomness:
    """One party's private coins (the OS CSPRNG); never derived from a shared seed."""

    def __init__(self) -> None:
        self._rng = random.SystemRandom()

    def poisson_mask(self, n: int, rate: float) -> torch.Tensor:
        return torch.tensor([1.0 if self._rng.random() < rate else 0.0 for _ in range(n)])

    def gaussian(self, n: int, std: float) -> torch.Tensor:
        return torch.tensor([self._rng.gauss(0.0, std) for _ in range(n)], dtype=torch.float64)


def guarantee(plan: DPPlan, terms: DisclosureTerms) -> dict[str, Any]:
    """The (epsilon, delta) statements a DP-ZO job's report carries."""
    released = epsilon(
        noise_multiplier=plan.noise_multiplier * math.sqrt(NOISE_CONTRIBUTORS),
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=plan.delta,
        accountant=plan.accountant,
    )
    covered = [
        f"{Revealable.FINAL_PARAMETERS.value} -> "
        f"{', '.join(r.value for r in terms.recipients(Revealable.FINAL_PARAMETERS)) or 'nobody'}"
    ]
    not_covered = []
    for value in (Revealable.EVAL_ACCURACY, Revealable.EVAL_LOSS, Revealable.TRAIN_LOSS):
        to = terms.recipients(value)
        if to:
            why = (
                "the data owner's own training data"
                if value is Revealable.TRAIN_LOSS
                else "held-out rows, not training rows"
            )
            not_covered.append(f"{value.value} -> {', '.join(r.value for r in to)} ({why})")
    checked = ", ".join(sorted(r.value for r in terms.recipients(Revealable.RANGE_CHECK)))
    if checked:
        not_covered.append(
            f"{Revealable.RANGE_CHECK.value} -> {checked} (one bit "
            "per row and secure forward, training rows included: whether a truncation failure, "
            "whose chance grows with the row's values, blew the row up)"
        )
    return {
        "mechanism": (
            "Poisson-subsampled Gaussian on per-example clipped ZO projections, "
            "noise from both computing parties"
        ),
        "neighbouring": "add or remove one training row",
        "delta": plan.delta,
        "epsilon": plan.epsilon,
        "epsilon_against_each_party": plan.epsilon,
        "epsilon_released_output": released,
        "noise_multiplier_per_party": plan.noise_multiplier,
        "noise_multiplier_released": plan.noise_multiplier * math.sqrt(NOISE_CONTRIBUTORS),
        "noise_contributors": [Role.MODEL_OWNER.value, Role.DATA_OWNER.value],
        "covered_releases": covered,
        "not_covered_releases": not_covered,
        **{k: v for k, v in plan.to_dict().items() if k not in ("epsilon", "delta")},
    }
