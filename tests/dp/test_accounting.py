"""secfwt's epsilon (Opacus accountants) against Google's independent dp-accounting library."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event, pld, rdp
from dp_accounting.privacy_accountant import NeighboringRelation

from secfwt.config import AccountantName, DPSection
from secfwt.errors import ConfigError
from secfwt.mpc.disclosure import DisclosureTerms, Revealable
from secfwt.roles import Role
from secfwt.tuning.accounting import epsilon, plan
from secfwt.tuning.dp_zo import guarantee

# (noise multiplier, sample rate, steps, delta): DP-SGD-like and DP-ZO-like regimes
SETTINGS = [
    (1.0, 0.01, 1000, 1e-5),
    (1.1, 0.25, 100, 1e-3),
    (3.0, 0.25, 100, 1e-3),
    (0.8, 1.0, 20, 1e-5),
    (7.4, 0.25, 200, 1e-4),
]


def _event(sigma: float, q: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )


def _google_rdp(sigma: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants.rdp import RDPAccountant

    acc = rdp.RdpAccountant(
        orders=RDPAccountant.DEFAULT_ALPHAS,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    acc.compose(_event(sigma, q, steps))
    return acc.get_epsilon(delta)


def _google_pld(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = pld.PLDAccountant(
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=1e-4,
    )
    acc.compose(_event(sigma, q, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_rdp_epsilon_matches_dp_accounting(sigma, q, steps, delta):
    """Same mechanism, same Renyi orders: two implementations of the RDP bound agree (the
    conversion to (eps, delta) differs slightly between libraries, hence 2 %)."""
    ours = epsilon(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        delta=delta,
        accountant=AccountantName.RDP,
    )
    theirs = _google_rdp(sigma, q, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.02)


@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_prv_epsilon_matches_dp_accounting_pld(sigma, q, steps, delta):
    """Numerically composed privacy loss distributions (Opacus PRV vs Google PLD) are both
    near-exact; they agree to within their discretisation errors."""
    ours = epsilon(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        delta=delta,
        accountant=AccountantName.PRV,
    )
    theirs = _google_pld(sigma, q, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.03, abs=0.01)
    assert (
        ours
        <= epsilon(
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            delta=delta,
            accountant=AccountantName.RDP,
        )
        + 1e-6
    )


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_noise_meets_the_target_by_an_independent_count(target):
    p = plan(DPSection(target_epsilon=target, delta=1e-3), n_train=256, batch_size=64, steps=100)
    assert p.sample_rate == 0.25
    assert _google_rdp(p.noise_multiplier, p.sample_rate, p.steps, p.delta) <= target * 1.02
    # and not wastefully: 5 % less noise would break the budget
    assert _google_rdp(0.95 * p.noise_multiplier, p.sample_rate, p.steps, p.delta) > target


def test_dp_zo_guarantee_against_each_party_and_the_released_output():
    terms = DisclosureTerms.of(
        [
            (Revealable.FINAL_PARAMETERS, (Role.DATA_OWNER,)),
            (Revealable.EVAL_ACCURACY, (Role.DATA_OWNER, Role.MODEL_OWNER)),
            (Revealable.RANGE_CHECK, (Role.DATA_OWNER, Role.MODEL_OWNER)),
        ]
    )
    p = plan(
        DPSection(enabled=True, target_epsilon=3.0, delta=1e-3),
        n_train=128,
        batch_size=32,
        steps=100,
    )
    g = guarantee(p, terms)
    # each party knows its own noise: the other party's N(0, (sigma C)^2) is what protects the data
    assert g["epsilon_against_each_party"] == pytest.approx(
        _google_rdp(p.noise_multiplier, 0.25, 100, 1e-3), rel=0.02
    )
    # the released result carries both parties' noise: multiplier sigma * sqrt(2)
    assert g["epsilon_released_output"] == pytest.approx(
        _google_rdp(p.noise_multiplier * math.sqrt(2), 0.25, 100, 1e-3), rel=0.02
    )
    assert g["epsilon_released_output"] < g["epsilon_against_each_party"] <= 3.0 * 1.001
    assert any("eval_accuracy" in s for s in g["not_covered_releases"])
    # the range checks' bits on training rows are not under the DP guarantee either
    assert any(s.startswith("range_check -> ") for s in g["not_covered_releases"])
    assert g["covered_releases"] == ["final_parameters -> data_owner"]


@pytest.mark.parametrize(
    "dp,n,batch,steps,match",
    [
        (DPSection(target_epsilon=3.0, delta=0.01), 100, 10, 10, "dp.delta"),
        (DPSection(target_epsilon=3.0, delta=1e-5), 100, 150, 10, "zo.batch_size"),
        (DPSection(target_epsilon=3.0, delta=1e-5, sample_rate=1.5), 100, 10, 10, "dp.sample_rate"),
        (
            DPSection(target_epsilon=1.0, noise_multiplier=0.5, delta=1e-5),
            100,
            10,
            100,
            "over the budget",
        ),
        (DPSection(delta=1e-5), 100, 10, 10, "dp.target_epsilon"),
    ],
)
def test_impossible_plans_are_refused_with_the_field_named(dp, n, batch, steps, match):
    with pytest.raises(ConfigError, match=match):
        plan(dp, n_train=n, batch_size=batch, steps=steps)


def test_budget_error_says_how_many_steps_fit():
    with pytest.raises(ConfigError) as exc:
        plan(
            DPSection(target_epsilon=3.0, noise_multiplier=1.0, delta=1e-5),
            n_train=1000,
            batch_size=10,
            steps=100000,
        )
    fit = int(str(exc.value).split("at most ")[1].split(",")[0])
    assert (
        epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=fit, delta=1e-5)
        <= 3.0
        < epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=fit + 1, delta=1e-5)
    )
