"""``1/x`` and ``1/sqrt(x)`` on MPCTensors over wide ranges: powers of four, then Newton.

CrypTen's ``reciprocal`` fails above ~300 and its ``inv_sqrt`` above ~500 (LayerNorm variances).
Here one exact comparison call against the powers of four spanning the stated range gives a
one-hot region (:class:`_Pow4Regions`), which rescales ``x`` into ``(1/4, 1]`` with one product
by a small secret integer (:func:`_scale_by_pow2`); Newton-Raphson from a minimax linear start
does the rest (Catrina and Saxena, FC 2010). The softmax denominator and the normalisation
layers reuse the parts (mantissa and regions) to keep full precision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from secfwt.errors import FixedPointRangeError
from secfwt.mpc.nonlinear.compare import _greater_than_exact
from secfwt.mpc.nonlinear.fixed_point import (
    _ONE,
    FRAC_BITS,
    MPCTensor,
    _divide,
    _fixed,
    _mul,
    _plus,
    _share_of,
)
from secfwt.mpc.nonlinear.polynomial import _affine_public

_MAX_HI = 2.0**30
# Products formed before a local truncation stay below 2^38 (failure probability <= 2^-26 each).
_MAX_TRUNCATED_BITS = 38
_NEWTON_STEPS = 3
# Minimax linear starts on [1/4, 1] (max relative error 0.2195 and 0.0860), by Nelder-Mead on the
# equioscillating error: 1/u ~ 3.90244 - 3.12195 u, 1/sqrt(u) ~ 2.13277 - 1.21873 u.
_RECIP_START = (3.9024390243902, -3.1219512195122)
_INV_SQRT_START = (2.1327725504, -1.2187271729)


def reciprocal(x: MPCTensor, *, lo: float, hi: float) -> MPCTensor:
    """``1 / x`` for ``x`` in ``[lo, hi]`` with ``2^-16 <= lo < hi <= 2^30`` (any ratio in that).

    Method (Catrina and Saxena, "Secure computation with fixed-point numbers", FC 2010: normalise,
    then Newton-Raphson): exact comparisons ``x > 4^j`` for the powers of four spanning
    ``[lo, hi]`` run in ONE call; the monotone bits give a one-hot region indicator
    ``b_j - b_(j+1)`` for free, which rescales ``x`` to ``u in (1/4, 1]`` with one product by a
    small secret integer (:func:`_scale_by_pow2`: scales far below the 2^-16 resolution need no
    fractional constant, and every product stays below 2^38). ``1/u`` comes from a minimax linear
    start (relative error 0.22) and 3 Newton-Raphson steps ``y <- y (2 - u y)`` (error
    0.22^8 = 5e-6; Ercegovac and Lang, *Digital Arithmetic*, 2004, ch. 7), and the result is
    rescaled back the same way.

    Accuracy on ``[lo, hi]``: ``|error| <= 1e-4 |1/x| + 2^-15`` (measured: relative 6e-5 where
    ``1/x >= 1/4``, limited by ``u``'s 2^-16 resolution; the output's resolution bounds small
    results). ``x`` below ``lo`` degrades
    gracefully (bounded, too small); ``x > 1.25 * 4^ceil(log4 hi)`` is undefined.
    Cost per element: ``ceil(log4(hi/lo))`` exact 64-bit comparisons in one call, 6 products in
    6 rounds, and one bit product per group of scales in the two rescales (2 for ``[1, 512]``, 5
    for ``[2^-10, 2^20]``, more for tiny ``lo``). Meant for per-row denominators.
    """
    s = _share_of(x, "x")
    _check_range(lo, hi, frac_bits=FRAC_BITS)
    y, where = _reciprocal_parts(s, frac_bits=FRAC_BITS, lo=lo, hi=hi)
    out_bits = math.ceil(math.log2(4.0 / lo))  # y < 4
    return _fixed(_scale_by_pow2(y, where.onehot, [-e for e in where.exps], out_bits=out_bits))


def inv_sqrt(x: MPCTensor, *, lo: float, hi: float) -> MPCTensor:
    """``1 / sqrt(x)`` for ``x`` in ``[lo, hi]`` with ``2^-16 <= lo < hi <= 2^30``.

    Method: as :func:`reciprocal` with powers of four, so that ``x = u * 4^k`` with
    ``u in (1/4, 1]`` and ``1/sqrt(x) = 2^-k / sqrt(u)``; ``1/sqrt(u)`` from a minimax linear start
    (relative error 0.086) and 3 Newton-Raphson steps ``y <- y (3 - u y^2) / 2`` (the iteration
    of CrypTen's ``inv_sqrt`` and of the "fast inverse square root", Lomont 2003), each in 2
    rounds as ``1.5 y - 0.5 (u y) y^2``.

    Accuracy on ``[lo, hi]``: ``|error| <= 1e-4 / sqrt(x) + 2^-15`` (measured relative 6e-5 where
    the result is >= 1/4). Cost per element: ``ceil(log4(hi/lo))`` exact comparisons in one call,
    9 products in 6 rounds, and 2-5 bit products as in :func:`reciprocal`.
    """
    s = _share_of(x, "x")
    _check_range(lo, hi, frac_bits=FRAC_BITS)
    y, where = _inv_sqrt_parts(s, frac_bits=FRAC_BITS, lo=lo, hi=hi)
    out_bits = math.ceil(math.log2(2.0 / math.sqrt(lo)))  # y < 2
    return _fixed(_scale_by_pow2(y, where.onehot, [-e // 2 for e in where.exps], out_bits=out_bits))


def _check_range(lo: float, hi: float, *, frac_bits: int) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= lo:
        raise ValueError(f"need 0 < lo < hi, both finite; got lo={lo}, hi={hi}")
    if lo < 2.0**-frac_bits:
        raise FixedPointRangeError(f"lo={lo} is below the fixed-point resolution 2^-{frac_bits}")
    if hi > _MAX_HI:
        raise FixedPointRangeError(
            f"hi={hi} is above 2^30; such values do not survive CrypTen's products"
        )


@dataclasses.dataclass(frozen=True)
class _Pow4Regions:
    """Secret region of each element among the intervals ``(2^(E-2), 2^E]``.

    ``onehot[i]`` (shares of bits, dim 0 indexes regions) is 1 exactly for the region with upper
    exponent ``exps[i]``; the first region also holds everything smaller, the last everything
    larger.
    """

    onehot: torch.Tensor
    exps: tuple[int, ...]


def _pow4_exponents(lo: float, hi: float) -> tuple[int, ...]:
    """Even exponents ``E`` whose regions ``(2^(E-2), 2^E]`` cover ``[lo, hi]``."""
    e_lo = 2 * math.ceil(math.log2(lo) / 2)
    e_hi = max(2 * math.ceil(math.log2(hi) / 2), e_lo + 2)
    return tuple(range(e_lo, e_hi + 1, 2))


def _onehot_regions(above: torch.Tensor) -> torch.Tensor:
    """Monotone bits ``b_i = [x > 2^E_i]`` (dim 0) -> one-hot regions ``1 - b_0, b_0 - b_1, ..,
    b_(m-1)``: linear, so free."""
    return torch.cat([_plus(-above[:1], 1), above[:-1] - above[1:], above[-1:]])


def _locate_pow4(s: torch.Tensor, *, frac_bits: int, lo: float, hi: float) -> _Pow4Regions:
    """One exact comparison call against the powers of four between ``lo`` and ``hi``."""
    exps = _pow4_exponents(lo, hi)
    above = _greater_than_exact(s, [1 << (e + frac_bits) for e in exps[:-1]])  # b_i = [x > 2^E_i]
    return _Pow4Regions(onehot=_onehot_regions(above), exps=exps)


def _scale_by_pow2(
    t: torch.Tensor, onehot: torch.Tensor, shifts: Sequence[int], *, out_bits: int
) -> torch.Tensor:
    """``sum_i onehot_i * t * 2^shifts_i`` in one batched product by small secret integers.

    Per group of regions, ``t`` is pre-shifted publicly by the group's largest shift and
    multiplied by the secret integer ``sum_i onehot_i 2^(shift_i - min shift)``, then truncated
    by the span of the group's shifts. A product thus exceeds the result (``|result| < 2^out_bits``)
    by the span, and groups are cut so that it stays below 2^38; powers of two far below the 2^-16
    resolution cost nothing extra. One group (one product per element) in every use but the
    public ``reciprocal``/``inv_sqrt`` with wide ranges. ``onehot`` broadcasts against ``t``
    (per-row bits against a whole row) and is then opened only once per group.
    """
    width = _MAX_TRUNCATED_BITS - FRAC_BITS - out_bits
    if width < 0:
        raise FixedPointRangeError(f"results up to 2^{out_bits} leave no room for exact rescaling")
    groups: list[list[int]] = []
    for i, shift in enumerate(shifts):
        if groups and shifts[groups[-1][0]] - shift <= width and shift <= shifts[groups[-1][-1]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    lefts, rights, spans = [], [], []
    for group in groups:
        top = shifts[group[0]]
        span = top - shifts[group[-1]]
        lefts.append(t * (1 << top) if top >= 0 else _divide(t, 1 << -top))
        factors = torch.tensor([1 << (shifts[i] - top + span) for i in group], dtype=torch.long)
        rights.append((onehot[group] * factors.view(-1, *([1] * (onehot.dim() - 1)))).sum(0))
        spans.append(span)
    products = _mul(torch.stack(lefts), torch.stack(rights))
    return torch.stack([_divide(products[g], 1 << span) for g, span in enumerate(spans)]).sum(0)


def _reciprocal_parts(
    s: torch.Tensor, *, frac_bits: int, lo: float, hi: float
) -> tuple[torch.Tensor, _Pow4Regions]:
    """``1/x = y * 2^(-E_i)``: mantissa ``y`` (16 frac bits, in [1, 4)) and the regions."""
    where = _locate_pow4(s, frac_bits=frac_bits, lo=lo, hi=hi)
    u = _scale_by_pow2(s, where.onehot, [FRAC_BITS - frac_bits - e for e in where.exps], out_bits=1)
    return _newton_reciprocal(u), where  # u in (1/4, 1]


def _inv_sqrt_parts(
    s: torch.Tensor, *, frac_bits: int, lo: float, hi: float
) -> tuple[torch.Tensor, _Pow4Regions]:
    """``1/sqrt(x) = y * 2^(-E_i/2)``: mantissa ``y`` (16 frac bits, in [1, 2)) and the regions."""
    where = _locate_pow4(s, frac_bits=frac_bits, lo=lo, hi=hi)
    return _inv_sqrt_mantissa(s, where, frac_bits=frac_bits), where


def _inv_sqrt_mantissa(s: torch.Tensor, where: _Pow4Regions, *, frac_bits: int) -> torch.Tensor:
    u = _scale_by_pow2(s, where.onehot, [FRAC_BITS - frac_bits - e for e in where.exps], out_bits=1)
    return _newton_inv_sqrt(u)  # u in (1/4, 1]


def _newton_reciprocal(u: torch.Tensor) -> torch.Tensor:
    """``1/u`` for ``u`` in (1/4, 1]: linear start, 3 steps ``y <- y (2 - u y)`` (relative
    error 0.2195^8 = 5e-6 plus ~2 units of fixed-point noise)."""
    y = _affine_public(u, _RECIP_START)
    for _ in range(_NEWTON_STEPS):
        uy = _divide(_mul(u, y), _ONE)
        y = _divide(_mul(y, _plus(-uy, 2 * _ONE)), _ONE)
    return y


def _newton_inv_sqrt(u: torch.Tensor) -> torch.Tensor:
    """``1/sqrt(u)`` for ``u`` in (1/4, 1]: linear start, 3 steps ``y <- y (3 - u y^2) / 2``,
    each in 2 rounds as ``1.5 y - 0.5 (u y) y^2`` with ``y^2`` and ``u y`` in one call."""
    y = _affine_public(u, _INV_SQRT_START)
    for _ in range(_NEWTON_STEPS):
        y2_uy = _divide(_mul(torch.stack([y, u]), y.unsqueeze(0)), _ONE)  # y opened once
        uy3 = _divide(_mul(y2_uy[0], y2_uy[1]), _ONE)
        y = _divide(3 * y - uy3, 2)
    return y
