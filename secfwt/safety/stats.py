"""Rates with confidence intervals, and agreement between two judges: pure functions.

* Wilson score interval (Wilson 1927, "Probable inference, the law of succession, and
  statistical inference", JASA 22:209-212), through ``scipy.stats.binomtest(...).proportion_ci(
  method="wilson")``. Chosen over the normal (Wald) interval because refusal rates sit near 0 or
  1 on small suites, where Wald's interval collapses to a point or leaves [0, 1]; Newcombe (1998,
  Stat. Med. 17:857-872) compares the methods and tabulates the examples the tests check.
* Cohen's kappa (Cohen 1960, "A coefficient of agreement for nominal scales", Educ. Psychol.
  Meas. 20:37-46): kappa = (p_o - p_e) / (1 - p_e), observed agreement p_o against the agreement
  p_e two independent judges with the same marginal rates would reach by chance. Written out
  because scikit-learn (``cohen_kappa_score``) is not a dependency for one formula.
* Student's t interval of a mean (``scipy.stats.t``): mean +- t_{n-1} s / sqrt(n), for the
  refusal-margin score, a mean of per-prompt margins.
* Spearman's rank correlation (``scipy.stats.spearmanr``) with a percentile bootstrap interval
  over the paired items (``scipy.stats.bootstrap``, Efron & Tibshirani 1993, Ch. 13).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from secfwt.errors import DataError

BOOTSTRAP_RESAMPLES = 10_000

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its point estimate and two-sided Wilson interval (``None`` if n = 0)."""

    k: int
    n: int
    rate: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "k": self.k,
            "n": self.n,
            "rate": self.rate,
            "ci_low": self.low,
            "ci_high": self.high,
            "confidence": self.confidence,
        }


def wilson_rate(k: int, n: int, *, confidence: float = CONFIDENCE) -> Rate:
    """``k`` successes of ``n`` trials with the Wilson score interval at ``confidence``."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise DataError(f"a rate needs 0 <= k <= n, got k = {k}, n = {n}")
    if n == 0:
        return Rate(k=0, n=0, rate=None, low=None, high=None, confidence=confidence)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Rate(k=k, n=n, rate=k / n, low=float(ci.low), high=float(ci.high), confidence=confidence)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary judgements of the same items; ``None`` when undefined (no
    items, or both judges constant and equal, so that chance agreement is 1)."""
    if len(a) != len(b):
        raise DataError(f"kappa needs two judgements of the same items: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    if p_e == 1.0:
        return None
    return (p_o - p_e) / (1 - p_e)


def accuracy(predicted: Sequence[bool], truth: Sequence[bool]) -> Rate:
    """Share of ``predicted`` equal to ``truth``, as a :class:`Rate` with its interval."""
    if len(predicted) != len(truth):
        raise DataError(f"accuracy needs equal lengths: {len(predicted)} vs {len(truth)}")
    return wilson_rate(sum(p == t for p, t in zip(predicted, truth, strict=True)), len(truth))


@dataclass(frozen=True)
class MeanInterval:
    """A mean of ``n`` values with its two-sided Student's t interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict[str, float | int]:
        return {
            "ci_low": self.low,
            "ci_high": self.high,
            "n": self.n,
            "confidence": self.confidence,
        }


def mean_interval(values: Sequence[float], *, confidence: float = CONFIDENCE) -> MeanInterval:
    """The mean of ``values`` (at least 2) and its t interval at ``confidence``."""
    import numpy as np
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise DataError(f"a t interval needs at least 2 values, got {x.size}")
    mean, sem = float(x.mean()), float(x.std(ddof=1)) / float(np.sqrt(x.size))
    half = float(t.ppf(0.5 + confidence / 2, df=x.size - 1)) * sem
    return MeanInterval(mean=mean, low=mean - half, high=mean + half, n=int(x.size))


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho of paired values, its percentile bootstrap interval over the pairs, and
    scipy's two-sided p-value (t approximation)."""

    rho: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rho": self.rho,
            "ci_low": self.low,
            "ci_high": self.high,
            "p_value": self.p_value,
            "n": self.n,
            "confidence": self.confidence,
            "resamples": BOOTSTRAP_RESAMPLES,
        }


def rank_correlations(u: Any, v: Any, axis: int = -1) -> Any:
    """Spearman's rho of each pair of rows of ``u`` and ``v`` along ``axis``: Pearson's r of the
    average ranks, which is what ``scipy.stats.spearmanr`` computes for one pair, here for a
    whole batch of bootstrap resamples at once (one ``spearmanr`` call per resample took
    ~0.5 ms, 3-6 s for :data:`BOOTSTRAP_RESAMPLES`). A row whose ranks are all tied gives
    0 / 0 = NaN, as ``spearmanr`` does."""
    import numpy as np
    from scipy.stats import rankdata

    ru, rv = rankdata(u, axis=axis), rankdata(v, axis=axis)
    ru = ru - ru.mean(axis=axis, keepdims=True)
    rv = rv - rv.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ru * rv).sum(axis=axis) / np.sqrt(
            (ru * ru).sum(axis=axis) * (rv * rv).sum(axis=axis)
        )


def spearman(
    x: Sequence[float], y: Sequence[float], *, seed: int = 0, confidence: float = CONFIDENCE
) -> RankCorrelation:
    """Spearman's rho of ``x`` and ``y`` (ties get average ranks) with a bootstrap interval
    resampling the pairs (``seed`` fixes the draws). A resample whose ranks are all tied has no
    rho; scipy leaves it NaN, and those resamples are dropped from the percentiles."""
    import numpy as np
    from scipy.stats import bootstrap, spearmanr

    if len(x) != len(y) or len(x) < 3:
        raise DataError(f"a rank correlation needs 3 or more pairs, got {len(x)} and {len(y)}")
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    res = spearmanr(a, b)

    draws = bootstrap(
        (a, b),
        rank_correlations,
        paired=True,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).bootstrap_distribution
    low, high = np.nanquantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return RankCorrelation(
        rho=float(res.statistic),
        low=float(low),
        high=float(high),
        p_value=float(res.pvalue),
        n=len(a),
        confidence=confidence,
    )
