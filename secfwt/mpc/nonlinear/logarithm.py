"""``log x`` on MPCTensors over wide ranges: powers of four, then a Chebyshev series on (1/4, 1].

The log-sum-exp of a vocabulary-wide cross-entropy takes ``log`` of a sum in ``[1, V]`` with
``V`` up to ~150,000. One Chebyshev series on all of ``[1, V]`` cannot serve: ``log``'s
singularity at 0 sits ``2/V`` outside the interval, so the series converges like
``(1 + 2/sqrt(V))^-n`` (fit error 0.05 at V = 1,000 and 1.5 at V = 49,152 with degree 40), and
the input, scaled by ``1/V`` into [-1, 1], loses ``log2 V`` bits of its 16. Here the input is
normalised first, the standard range reduction of ``log`` (``x = u 2^E``,
``log x = log u + E ln 2``: Muller, *Elementary Functions*, 3rd ed. 2016, ch. 11) done in MPC
as in Aly and Smart (ACNS 2019) by the secret power-of-four region of :mod:`.inverse`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from secfwt.mpc.nonlinear.fixed_point import _ONE, FRAC_BITS, MPCTensor, _fixed, _share_of
from secfwt.mpc.nonlinear.inverse import _check_range, _locate_pow4, _scale_by_pow2
from secfwt.mpc.nonlinear.polynomial import _affine_public, _chebyshev_fit, _chebyshev_series

#: Degree of the series of log u on (1/4, 1]: fit error 1.4e-7 (degree 10: 1.5e-6), far below
#: the 2^-14 that u's own 16-bit resolution carries into log u at u = 1/4.
_LOG_DEGREE = 12


def log(x: MPCTensor, *, lo: float, hi: float) -> MPCTensor:
    """``log x`` for ``x`` in ``[lo, hi]`` with ``2^-16 <= lo < hi <= 2^30``.

    Method: one exact comparison call against the powers of four spanning ``[lo, hi]`` gives the
    secret region ``x in (2^(E-2), 2^E]`` as one-hot bits (:func:`.inverse._locate_pow4`), one
    product by a small secret integer rescales ``u = x 2^-E in (1/4, 1]``
    (:func:`.inverse._scale_by_pow2`), a degree-12 Chebyshev series in ``t = (8u - 5)/3``
    gives ``log u`` (``log``'s singularity at ``t = -5/3`` makes the series converge like
    ``3^-n``), and ``E ln 2`` is a public combination of the region bits (local).

    Accuracy on ``[lo, hi]``: absolute error up to ``2^-16 / u <= 6e-5`` from ``u``'s
    resolution, plus the rounding of ``t`` and of the series (fit error 1.4e-7): measured max
    1.0e-4 over 4,000 log-uniform points on [1/2, 2^17]. Outside the range the series is
    extrapolated from the first or last region and degrades.
    Cost per element: ``ceil(log4(hi/lo))`` exact comparisons in one call, 1 product for the
    rescale, 6 products in 4 rounds for the series.
    """
    s = _share_of(x, "x")
    _check_range(lo, hi, frac_bits=FRAC_BITS)
    return _fixed(_log_ring(s, lo=lo, hi=hi))


def _log_ring(s: torch.Tensor, *, lo: float, hi: float) -> torch.Tensor:
    """:func:`log` on shares with 16 fractional bits."""
    where = _locate_pow4(s, frac_bits=FRAC_BITS, lo=lo, hi=hi)
    u = _scale_by_pow2(s, where.onehot, [-e for e in where.exps], out_bits=1)  # (1/4, 1]
    t = _affine_public(u, (-5.0 / 3.0, 8.0 / 3.0))  # (8u - 5) / 3 in (-1, 1]
    log_u = _chebyshev_series(t, _log_coefficients())
    e_ln2 = torch.tensor([round(e * math.log(2.0) * _ONE) for e in where.exps], dtype=torch.long)
    # region bits are integers (scale 1): their combination with public ring constants is exact
    return log_u + (where.onehot * e_ln2.view(-1, *([1] * s.dim()))).sum(0)


@functools.cache
def _log_coefficients() -> tuple[float, ...]:
    # t = (8u - 5)/3 maps [1/4, 1] onto [-1, 1]; fit log u = log((3t + 5)/8).
    return _chebyshev_fit(lambda t: np.log((3.0 * t + 5.0) / 8.0), _LOG_DEGREE)
