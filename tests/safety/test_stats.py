"""Wilson intervals and Cohen's kappa against published values."""

from __future__ import annotations

import pytest

from secfwt.errors import DataError
from secfwt.safety.stats import accuracy, cohen_kappa, wilson_rate


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # Newcombe (1998), Stat. Med. 17:857-872, Table I, method 3 (Wilson score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe(k: int, n: int, low: float, high: float) -> None:
    r = wilson_rate(k, n)
    assert r.rate == pytest.approx(k / n)
    assert r.low == pytest.approx(low, abs=5e-5)
    assert r.high == pytest.approx(high, abs=5e-5)


def test_wilson_closed_form_at_other_confidence() -> None:
    # Wilson (1927): centre (k + z^2/2) / (n + z^2), half-width z/(n + z^2) sqrt(k(n-k)/n + z^2/4)
    k, n, z = 7, 40, 1.6448536269514722  # z of a two-sided 90% interval
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * ((k * (n - k) / n + z * z / 4) ** 0.5)
    r = wilson_rate(k, n, confidence=0.90)
    assert (r.low, r.high) == pytest.approx((centre - half, centre + half), abs=1e-12)


def test_wilson_edge_cases() -> None:
    empty = wilson_rate(0, 0)
    assert empty.rate is None and empty.low is None and empty.high is None
    with pytest.raises(DataError):
        wilson_rate(3, 2)


def test_cohen_kappa_textbook_example() -> None:
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15 -> p_o 0.7, p_e 0.5
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(a, [not x for x in a]) == pytest.approx(-1.0)


def test_cohen_kappa_undefined_and_mismatched() -> None:
    assert cohen_kappa([], []) is None
    assert cohen_kappa([True, True], [True, True]) is None  # chance agreement is 1
    with pytest.raises(DataError):
        cohen_kappa([True], [True, False])


def test_accuracy_is_a_rate() -> None:
    r = accuracy([True, False, True, True], [True, True, True, False])
    assert (r.k, r.n, r.rate) == (2, 4, 0.5)


def test_mean_interval_is_students_t() -> None:
    from secfwt.safety.stats import mean_interval

    # mean 2.5, s = sqrt(5/3), t_{0.975, 3} = 3.182446305 (Student's t table)
    got = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * (5 / 3) ** 0.5 / 2
    assert (got.mean, got.low, got.high) == pytest.approx((2.5, 2.5 - half, 2.5 + half), abs=1e-9)
    with pytest.raises(DataError, match="at least 2 values"):
        mean_interval([1.0])


def test_spearman_without_ties_is_the_rank_difference_formula() -> None:
    from secfwt.safety.stats import spearman

    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    ranks = [2.0, 1.0, 4.0, 3.0, 8.0, 5.0, 7.0, 6.0]
    y = [3.0**r for r in ranks]  # the same ranks, far from linear in x
    n = len(x)
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(x, ranks, strict=True)) / (n * (n * n - 1))
    got = spearman(x, y, seed=1)
    assert got.rho == pytest.approx(rho, abs=1e-12)
    assert -1 <= got.low < got.rho < got.high <= 1
    assert spearman(x, y, seed=1) == got  # the bootstrap draws are the seed's


def test_rank_correlations_are_spearmanr_row_by_row() -> None:
    """The batched rho the bootstrap uses against scipy's spearmanr, one resample at a time:
    rows with ties, a row whose ranks are all tied (NaN from both) and random rows."""
    import numpy as np
    from scipy.stats import spearmanr

    from secfwt.safety.stats import rank_correlations

    rng = np.random.default_rng(0)
    u = rng.integers(0, 5, size=(200, 9)).astype(np.float64)  # many ties
    v = rng.normal(size=(200, 9))
    v[:50] = np.round(v[:50])  # ties on both sides
    u[7] = 3.0  # all tied: no rho
    got = rank_correlations(u, v)
    with np.errstate(invalid="ignore", divide="ignore"), pytest.warns(Warning):
        want = np.array([spearmanr(a, b).statistic for a, b in zip(u, v, strict=True)])
    assert np.isnan(got[7]) and np.isnan(want[7])
    assert np.allclose(np.delete(got, 7), np.delete(want, 7), rtol=0, atol=1e-12)
    assert np.allclose(rank_correlations(u.T, v.T, axis=0), got, rtol=0, atol=1e-12, equal_nan=True)
