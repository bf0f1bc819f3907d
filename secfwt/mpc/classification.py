"""MPC pieces of classification heads: range-safe tanh (poolers) and cross-entropy (tuning loss)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: tanh is evaluated on inputs clipped to [-TANH_CLIP, TANH_CLIP]; |tanh(8) - 1| < 2.3e-7.
TANH_CLIP = 8.0
#: Target accuracy of the Chebyshev fit of log on [1, C] (well below the 2^-16 resolution).
_LOG_FIT_TOL = 2e-7
_LOG_MAX_DEGREE = 40


def clip(x: Any, lo: float, hi: float) -> Any:
    """min(max(x, lo), hi) with both comparisons in one batched call (one set of rounds)."""
    from secfwt.crypten_compat import crypten

    both = crypten.stack([x - lo, hi - x])  # (2, ...) both must be >= 0 inside the range
    neg = both.lt(0)  # 1 where outside
    below, above = neg[0], neg[1]
    return x + (lo - x) * below + (hi - x) * above


def tanh(x: Any) -> Any:
    """tanh on any input: clip to [-8, 8], then CrypTen's tanh (2 sigmoid(2x) - 1, where the
    sigmoid evaluates exp(-|2x|) in [e^-16, 1] and a reciprocal on [1, 2], both in range)."""
    return clip(x, -TANH_CLIP, TANH_CLIP).tanh()


@functools.cache
def _log_chebyshev(num_classes: int) -> tuple[float, ...]:
    """Chebyshev coefficients of log(s) for s in [1, C], in t = (2s - C - 1) / (C - 1) in [-1, 1].

    log is analytic on [1, C], so the series converges geometrically; the degree is the
    smallest that meets _LOG_FIT_TOL on a dense grid (e.g. 11 for C = 2).
    """
    c = float(num_classes)
    t = np.cos(np.linspace(0, np.pi, 4001))
    s = ((c - 1) * t + c + 1) / 2
    for deg in range(4, _LOG_MAX_DEGREE + 1):
        coef = np.polynomial.chebyshev.chebfit(t, np.log(s), deg)
        if np.abs(np.polynomial.chebyshev.chebval(t, coef) - np.log(s)).max() < _LOG_FIT_TOL:
            return tuple(float(a) for a in coef)
    return tuple(float(a) for a in coef)


def _clenshaw(t: Any, coef: tuple[float, ...]) -> Any:
    """sum_k coef[k] T_k(t) by Clenshaw's recurrence: one secret product per degree, all
    intermediate values bounded by sum |coef| (no growth of monomial coefficients)."""
    b1 = b2 = None
    for a in reversed(coef[1:]):
        acc = (t * b1) * 2.0 if b1 is not None else None
        b0 = a if acc is None else acc + a
        if b2 is not None:
            b0 = b0 - b2
        b1, b2 = b0, b1
    if b1 is None:
        return t * 0.0 + coef[0]
    out = t * b1 + coef[0]
    return out - b2 if b2 is not None else out


def log_on_class_range(s: Any, num_classes: int) -> Any:
    """log(s) for s in [1, num_classes] (the sum of exp(z - max z) over classes)."""
    c = float(max(num_classes, 2))
    t = (s * 2.0 - (c + 1)) * (1.0 / (c - 1))
    return _clenshaw(t, _log_chebyshev(int(c)))


def cross_entropy(logits: Any, onehot: Any) -> Any:
    """Per-example -log softmax(logits)[y] = m + log(sum exp(z - m)) - z_y, m = max over classes.

    The max is a tree of C - 1 comparisons per row; exp(z - m) <= 1 uses secfwt's range-safe
    exp; the sum lies in [1, C] where the Chebyshev log above is accurate to the fixed point.
    """
    from secfwt.mpc import nonlinear

    c = logits.shape[-1]
    m = logits.max(dim=-1, keepdim=True)[0]  # CrypTen returns (max, one-hot argmax) with dim
    e = nonlinear.exp(logits - m).sum(-1)  # (B,) in [1, C]
    return log_on_class_range(e, c) + m.squeeze(-1) - (logits * onehot).sum(-1)
