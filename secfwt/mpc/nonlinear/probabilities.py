"""Softmax and cross-entropy on MPCTensors: scores to probabilities, logits to a loss.

CrypTen's ``softmax`` breaks from sequence length ~256 or with a -1e4 additive mask: its exp is
garbage below -256 and its reciprocal above ~300. :func:`softmax` subtracts the row max
(a comparison tree), uses the clamped :func:`~.exponential.exp` and inverts the row sum by
:mod:`.inverse`'s normalise-then-Newton method. :func:`cross_entropy` is the log-sum-exp form
of the loss with a Chebyshev log on the sum's known range ``[1, C]``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from secfwt.errors import FixedPointRangeError
from secfwt.mpc import beaver
from secfwt.mpc.nonlinear.compare import _max_last_dim
from secfwt.mpc.nonlinear.exponential import _exp_ring, exp
from secfwt.mpc.nonlinear.fixed_point import (
    _MPC,
    _ONE,
    FRAC_BITS,
    MPCTensor,
    _divide,
    _fixed,
    _mul,
    _normalise_dim,
    _plus,
    _share_of,
)
from secfwt.mpc.nonlinear.inverse import _reciprocal_parts, _scale_by_pow2
from secfwt.mpc.nonlinear.polynomial import _clenshaw

#: Offset subtracted from masked scores before the max (public; keeps them from being the max).
SOFTMAX_MASK_OFFSET = 4096


def softmax(
    x: MPCTensor, *, dim: int = -1, mask: torch.Tensor | MPCTensor | None = None
) -> MPCTensor:
    """Softmax along ``dim`` with an optional 0/1 key mask (1 = keep), broadcastable to ``x``.

    Steps: masked scores get ``-SOFTMAX_MASK_OFFSET`` (linear, also for a secret mask); the row
    max is a halving tree of comparisons (``n - 1`` per row, one call per level; CrypTen's
    log-reduction max without its one-hot argmax and tie-breaking); ``e = exp(x - max)`` with
    :func:`exp` (exactly 0 below -15.5); ``e`` times the mask (masked keys are exactly 0); the row
    sum ``S in [0.75, 1.35 n]`` is inverted by :func:`reciprocal`'s normalise-then-Newton method,
    kept as mantissa ``y in [1, 4)`` and power of two so that ``e * y`` is formed at full precision
    before the final rescale. Max subtraction is the standard stable softmax; PUMA
    (Dong et al., arXiv:2307.12533, 2023) uses the same max-subtract and bounded exp in MPC.

    Accuracy: max absolute error ~1e-4 (1e-3 asserted in the tests) for any scores with
    ``max - min + SOFTMAX_MASK_OFFSET < CMP_RANGE`` (e.g. scores in [-14000, 14000]) and any
    length; rows sum to 1 within the same error. A fully masked row returns all zeros. Scores
    may also carry a Hugging Face style additive -1e4 mask instead of ``mask``.
    Cost per element: ~2 comparisons (max tree and exp clamp), ~8 products (6 of them
    in exp); per row ``ceil(log4(2n))`` exact comparisons and 6 products for the reciprocal.
    """
    s = _share_of(x, "x")
    dim = _normalise_dim(dim, x.dim())
    s = s.transpose(dim, -1)  # (..., n)
    keep_public, keep_secret = _mask_parts(mask, tuple(x.size()), dim)
    if keep_public is not None:
        s = _plus(s, (keep_public - 1) * (SOFTMAX_MASK_OFFSET * _ONE))
    if keep_secret is not None:  # 0 or 2^16
        s = _plus(s + keep_secret * SOFTMAX_MASK_OFFSET, -SOFTMAX_MASK_OFFSET * _ONE)
    n = s.size(-1)
    e = _exp_ring(s - _max_last_dim(s))  # x - max <= 0 up to the comparison resolution
    if keep_public is not None:
        e = e * keep_public
    if keep_secret is not None:
        e = _divide(_mul(e, keep_secret), _ONE)
    total = e.sum(-1, keepdim=True)  # (..., 1)
    y, where = _reciprocal_parts(total, frac_bits=FRAC_BITS, lo=0.5, hi=max(2.0, 2.0 * n))
    p = _divide(_mul(e, y), _ONE)  # (..., n), in [0, 4)
    p = _scale_by_pow2(p, where.onehot, [-e_ for e_ in where.exps], out_bits=1)
    return _fixed(p.transpose(dim, -1))


def _mask_parts(
    mask: torch.Tensor | MPCTensor | None, shape: tuple[int, ...], dim: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A 0/1 key mask as (public 0/1 int64 tensor, None) or (None, secret share of 0 or 2^16),
    expanded to ``shape`` and with ``dim`` moved last."""
    if mask is None:
        return None, None
    if not (torch.is_tensor(mask) or isinstance(mask, _MPC)):
        raise TypeError(f"mask must be a torch tensor or an MPCTensor, got {type(mask).__name__}")
    try:
        target = beaver.broadcast_shapes(tuple(mask.size()), shape)
    except RuntimeError as exc:
        raise ValueError(
            f"mask of shape {tuple(mask.size())} does not broadcast to {shape}"
        ) from exc
    if target != shape:
        raise ValueError(f"mask of shape {tuple(mask.size())} would enlarge x of shape {shape}")
    if isinstance(mask, _MPC):
        scale = mask.encoder.scale
        if scale not in (1, _ONE):
            raise FixedPointRangeError(
                f"a secret mask must have scale 1 or 2^{FRAC_BITS}, has {scale}"
            )
        return None, (mask.share * (_ONE // scale)).expand(*shape).transpose(dim, -1)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 (drop) and 1 (keep)")
    return mask.to(torch.long).expand(*shape).transpose(dim, -1), None


#: Target accuracy of the Chebyshev fit of log on [1, C] (well below the 2^-16 resolution).
_LOG_FIT_TOL = 2e-7
_LOG_MAX_DEGREE = 40


def cross_entropy(logits: Any, onehot: Any) -> Any:
    """Per-example -log softmax(logits)[y] = m + log(sum exp(z - m)) - z_y, m = max over classes.

    The max is a tree of C - 1 comparisons per row; exp(z - m) <= 1 uses secfwt's range-safe
    exp; the sum lies in [1, C] where the Chebyshev log above is accurate to the fixed point.
    """
    c = logits.shape[-1]
    m = logits.max(dim=-1, keepdim=True)[0]  # CrypTen returns (max, one-hot argmax) with dim
    e = exp(logits - m).sum(-1)  # (B,) in [1, C]
    return log_on_class_range(e, c) + m.squeeze(-1) - (logits * onehot).sum(-1)


def log_on_class_range(s: Any, num_classes: int) -> Any:
    """log(s) for s in [1, num_classes] (the sum of exp(z - max z) over classes)."""
    c = float(max(num_classes, 2))
    t = (s * 2.0 - (c + 1)) * (1.0 / (c - 1))
    return _clenshaw(t, _log_chebyshev(int(c)))


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
