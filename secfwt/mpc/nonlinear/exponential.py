"""``e^x`` on MPCTensors: range-safe for softmax inputs, and on a public bound without comparisons.

CrypTen's ``exp`` is garbage below -256. :func:`exp` clamps with one comparison and evaluates a
Chebyshev series on the bounded rest; :func:`exp_bounded` serves inputs whose range the caller
knows by construction (Random Feature Attention) and needs no comparison at all. Both use the
range reduction ``e^x = (e^(x/2^k))^(2^k)`` of CrypTen's exp (Knott et al., NeurIPS 2021).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import torch

from secfwt.mpc.nonlinear.compare import _negative_words, _not, _select
from secfwt.mpc.nonlinear.fixed_point import _ONE, MPCTensor, _divide, _fixed, _plus, _share_of
from secfwt.mpc.nonlinear.polynomial import _chebyshev_fit, _chebyshev_series, _square


@dataclasses.dataclass(frozen=True)
class _ExpRange:
    """``e^x`` on ``[lower, upper]`` as ``(e^(x / 2^squarings))^(2^squarings)``, the inner
    exponential a Chebyshev series of ``degree`` in ``u = (x - mid) / half`` (``half`` an
    integer, so ``x / half`` is one truncation); exactly 0 below ``lower``."""

    lower: float
    upper: float
    squarings: int
    degree: int

    @property
    def half(self) -> int:
        return round((self.upper - self.lower) / 2)

    @property
    def mid(self) -> float:
        return (self.upper + self.lower) / 2


#: Softmax: below -15.5 the output is exactly 0 (e^-15.5 = 1.9e-7); x - max <= (comparison
#: resolution) * log2(n) <= 0.3 for the lengths softmax serves.
_SOFTMAX_EXP = _ExpRange(lower=-15.5, upper=0.5, squarings=2, degree=8)
#: Log-sum-exp over a vocabulary: terms below -23.5 (e^-23.5 = 6e-11) dropped, so V = 2^17 of
#: them lose at most 8e-6 of a sum >= 1/2; one squaring more for the wider range.
_WIDE_EXP = _ExpRange(lower=-23.5, upper=0.5, squarings=3, degree=8)


def exp(x: MPCTensor) -> MPCTensor:
    """``e^x`` for ``x <= 0`` (softmax inputs after max subtraction); exactly 0 below -15.5.

    Method: one comparison ``x < -15.5`` zeroes the output there (e^-15.5 = 1.9e-7, so the
    absolute error stays below 2e-7 for any ``x`` down to -CMP_RANGE, where CrypTen's limit
    approximation returns garbage). On [-15.5, 0.5], ``e^(x/4)`` is a degree-8 Chebyshev series
    in ``u = x/8 + 15/16`` (least squares at Chebyshev nodes, i.e. near-minimax: Trefethen,
    *Approximation Theory and Approximation Practice*, 2013), then squared twice: the range
    reduction ``e^x = (e^(x/2^k))^(2^k)`` of CrypTen's exp (Knott et al., NeurIPS 2021), with the
    bounded clamp of PUMA's softmax exp (Dong et al., arXiv:2307.12533, 2023).

    Accuracy: on [-15.5, 0.5] absolute error std ~3e-5, max ~2.5e-4 over 4e4 samples (fit error
    6e-6; the 3 bits lost in ``x/8``, amplified 4x by the squarings, dominate); 0 below -15.5 (true
    value < 2e-7). Inputs above 0.5 are outside the fitted range.
    Cost per element: 1 comparison, 4 products, 1 bit product, 2 squares.
    """
    s = _share_of(x, "x")
    return _fixed(_exp_ring(s))


def _exp_ring(
    s: torch.Tensor, fit: _ExpRange = _SOFTMAX_EXP, *, extra_bits: int = 0
) -> torch.Tensor:
    """:func:`exp` on shares with 16 fractional bits (``fit``: the range and its series); the
    result keeps ``16 + extra_bits`` (the last square is truncated by ``2^(16 - extra_bits)``),
    for sums of many small terms whose 2^-16 roundings would add up."""
    below = _negative_words(_plus(s, round(-fit.lower * _ONE)))  # [x < lower]
    u = _plus(_divide(s, fit.half), round(-fit.mid / fit.half * _ONE))  # [-1, 1] on the range
    y = _chebyshev_series(u, _exp_coefficients(fit))  # e^(x / 2^squarings)
    y = _select(_not(below), y)  # exact 0 below the range (garbage there times an integer 0)
    for i in range(fit.squarings):
        last = i == fit.squarings - 1
        y = _divide(_square(y), _ONE >> extra_bits if last else _ONE)
    return y


@functools.cache
def _exp_coefficients(fit: _ExpRange = _SOFTMAX_EXP) -> tuple[float, ...]:
    # u = (x - mid) / half maps [lower, upper] onto [-1, 1]; fit e^(x / 2^squarings).
    scale = 2.0**fit.squarings
    return _chebyshev_fit(lambda u: np.exp((fit.half * u + fit.mid) / scale), fit.degree)


#: Taylor degree for exp on [-1/2, 1/2]: truncation error 0.5^7/7! < 1.6e-6 relative.
_EXP_TAYLOR_DEGREE = 6
#: The argument is scaled into [-1/2, 1/2] before the Taylor step.
_EXP_REDUCED_BOUND = 0.5


def exp_squarings(bound: float) -> int:
    """Squarings r such that bound / 2^r <= 1/2."""
    return max(0, math.ceil(math.log2(max(bound, 1e-9) / _EXP_REDUCED_BOUND)))


def exp_bounded(x: Any, *, bound: float) -> Any:
    """exp(x) for |x| <= bound, as (Taylor_6(x / 2^r))^(2^r) (argument reduction by squaring).

    Cost: 6 multiplications (Horner) + r squarings, r = ceil(log2(2 * bound)); no comparisons.
    Error: each squaring doubles the relative error, so the result carries about
    2^r * (2^-16 fixed-point resolution + Taylor error) relative error; with bound = 8 that is
    about 5e-4 relative. The caller guarantees the bound (e.g. Cauchy-Schwarz on unit vectors in
    Random Feature Attention); outside it the error grows without warning.
    """
    r = exp_squarings(bound)
    y = x / float(2**r) if r else x
    # Horner: 1 + y(1 + y/2(1 + y/3(...)))
    acc = 1.0 + y / float(_EXP_TAYLOR_DEGREE)
    for k in range(_EXP_TAYLOR_DEGREE - 1, 0, -1):
        acc = 1.0 + (y * acc) / float(k)
    for _ in range(r):
        acc = acc * acc
    return acc
