"""Approximations on inputs whose range is known by construction (no comparisons needed)."""

from __future__ import annotations

import math
from typing import Any

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
