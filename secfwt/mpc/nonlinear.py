"""Range-safe nonlinear functions on CrypTen MPCTensors, accurate on real transformer activations.

CrypTen's own approximations fail on the ranges a transformer produces (``NOTES.md``): ``exp``
is garbage below -256, ``reciprocal`` above ~300, ``inv_sqrt`` above ~500 (LayerNorm variances),
``erf`` diverges, and ``softmax`` breaks from sequence length ~256 or with a -1e4 additive mask. The
functions here replace them. Every function takes and returns MPCTensors in CrypTen's default fixed
point (int64 ring, 16 fractional bits), states the input range on which it is accurate, and is
meant for the 2 computing parties of secfwt (CrypTen's 2-party local truncation).

How the cost is kept down (a comparison takes 7 rounds here, a product 1):

* **Bit-sliced comparisons.** A sign test needs only the bits of ``x`` between its resolution and
  its range. :func:`_negative_bits` drops the low 11 bits of each party's share and keeps the next
  21 (comparing on a reduced bit width after local truncation follows CrypTFlow2, Rathee et al.,
  CCS 2020). The sign of ``x`` is then bit 20 of the sum of the two parties' 21-bit values, i.e.
  their own top bits XOR the carry out of the low 20 bits, which is a carry-lookahead *reduction*
  tree (generate/propagate, Brent and Kung, IEEE TC 1982) over 20 bit planes. The planes are
  bit-sliced: plane ``j`` packs bit ``j`` of 64 elements into one word, so each tree level is one
  AND call on only its live nodes (53 plane ANDs per 64 elements in all) instead of CrypTen's
  64-bit parallel-prefix adder on whole words (the A2B conversion: 7 AND levels on 2 words each);
  the sign bits are opened packed too in the B2A. About 14 bytes per element and party where
  CrypTen's A2B on three 21-bit lanes per word took about 80, in 7 rounds instead of 8. The sign is
  exact for ``CMP_RESOLUTION <= |x| < CMP_RANGE`` (2^-5 and 2^15). Every element-wise function
  uses these.
* **Comparisons batched**: all thresholds of one function are stacked into one call (shared rounds).
* **Bits select in one opening.** Most comparison bits only choose between values (the max tree,
  the exp clamp, GELU's pieces). :func:`_select` opens the packed bits under the dealer's random
  bit and the value under a mask together, where a B2A and then a Beaver product took two
  openings and 16 bytes per element (8 now).
* **Each factor opened once.** A polynomial's products share factors (``T_2`` enters ``T_3`` and
  ``T_4``). :class:`_OpenedOnce` opens every factor once and the dealer supplies the products of
  their masks, so a degree-8 Chebyshev series opens 4 values per element instead of 7.
* **Bits are integers.** A comparison result has scale 1, so multiplying by it needs no truncation:
  selecting ``bit * garbage`` gives an exact ring 0, which is why the polynomial branches below may
  be evaluated on out-of-range inputs and then discarded.
* **Shares, not MPCTensors, inside.** CrypTen's ``MPCTensor.__getattribute__`` reads its omegaconf
  config on every attribute access (0.1-0.7 ms per local op on the dev VM), so the internals work
  on this party's int64 share tensors: additions, public integer products and truncations are
  local torch ops, and CrypTen is called only for Beaver products (:func:`_mul`, :func:`_square`)
  and the AND gates and B2A of comparisons. Every truncation is written out, so public constants
  keep 2^-32 precision and products stay small: CrypTen's 2-party truncation is local and fails
  with probability |v| / 2^64 for the value ``v`` it truncates (SecureML, Mohassel and Zhang,
  S&P 2017), and no result used here truncates a value above ~2^40 on the supported ranges.

Measured costs (2 parties + dealer, TTP, 2 shared cores) are recorded in
``tests/mpc/test_nonlinear.py`` next to CrypTen's own functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import FixedPointRangeError, ProtocolError
from secfwt.mpc import beaver

#: ``crypten.mpc.MPCTensor`` in annotations (CrypTen ships no type information: Any for mypy).
MPCTensor: TypeAlias = Any
_MPC = crypten.mpc.MPCTensor
_PTYPE = crypten.mpc.ptype

#: Fractional bits of CrypTen's fixed point (``cfg.encoder.precision_bits``); inputs must use it.
FRAC_BITS = 16
_ONE = 1 << FRAC_BITS

# --- bit-sliced comparisons ---------------------------------------------------------------------
_CMP_BITS = 21  # bits 11..31 of each share: a 21-bit two's complement value per party
_CMP_DROP_BITS = 11
_WORD_BITS = 64  # elements per bit-plane word
#: Signs of values closer to 0 than this may come out wrong (they are ties for every use here).
CMP_RESOLUTION = 2.0 ** (_CMP_DROP_BITS - FRAC_BITS)
#: Signs of values at least this large in magnitude are wrong: the supported activation range.
CMP_RANGE = 2.0 ** (_CMP_BITS - 1 + _CMP_DROP_BITS - FRAC_BITS)

# --- polynomial evaluation ----------------------------------------------------------------------
_COEF_BITS = 16  # fractional bits of public polynomial coefficients (on top of the data's 16)
_FIT_NODES = 4000

# --- exp ----------------------------------------------------------------------------------------
_EXP_LOWER = -15.5  # below: output exactly 0 (e^-15.5 = 1.9e-7)
_EXP_UPPER = 0.5  # softmax feeds x - max <= (comparison resolution) * log2(n) <= 0.3
_EXP_SQUARINGS = 2  # e^x = (e^(x/4))^4
_EXP_DEGREE = 8

# --- reciprocal / inverse square root ----------------------------------------------------------
_MAX_HI = 2.0**30
# Products formed before a local truncation stay below 2^38 (failure probability <= 2^-26 each).
_MAX_TRUNCATED_BITS = 38
_NEWTON_STEPS = 3
# Minimax linear starts on [1/4, 1] (max relative error 0.2195 and 0.0860), by Nelder-Mead on the
# equioscillating error: 1/u ~ 3.90244 - 3.12195 u, 1/sqrt(u) ~ 2.13277 - 1.21873 u.
_RECIP_START = (3.9024390243902, -3.1219512195122)
_INV_SQRT_START = (2.1327725504, -1.2187271729)

# --- normalisation layers -----------------------------------------------------------------------
_VAR_FRAC_BITS = 24  # fractional bits of the mean of squares (small variances need them)
_VAR_COARSE_SHIFT = 8  # high-range path squares x / 2^8, so big rows form no product above 2^33
_VAR_SPLIT = 0.25  # rows with coarse mean square above this use the high-range path
#: Mean squares (variances) on which layer_norm / rms_norm are accurate.
NORM_VAR_RANGE = (2.0**-14, 2.0**18)

# --- softmax ------------------------------------------------------------------------------------
#: Offset subtracted from masked scores before the max (public; keeps them from being the max).
SOFTMAX_MASK_OFFSET = 4096


# ================================================================================================
# Public functions
# ================================================================================================


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


def gelu(x: MPCTensor) -> MPCTensor:
    """Exact (erf) GELU, ``x * Phi(x)``, as in BERT; range-safe.

    Method: 3 pieces as in PUMA's GELU (Dong et al., arXiv:2307.12533, 2023, Sec. 4.3; also
    BOLT, Pang et al., S&P 2024): ``x`` above 4, 0 below -4, and between them ``x/2 + h(x)``
    where the even part ``h(x) = x erf(x / sqrt 2) / 2`` is a degree-8 Chebyshev series in
    ``s = x^2/8 - 1`` (least squares at 4000 Chebyshev nodes, computed deterministically on first
    use by :func:`_gelu_coefficients`). Writing ``GELU = x/2 + even`` halves the degree. Both
    thresholds are decided in ONE comparison call.

    Accuracy: max absolute error <= 3e-4 for any ``|x| < CMP_RANGE`` (2^15); measured 1.6e-4 on
    randn*5 with outliers +-50, +-1000 (fit error 4e-5, tail ``4 (1 - Phi(4)) = 1.3e-4`` at the
    cut, fixed-point noise). Cost per element: 2 comparisons (one call), 1 square, 4 products,
    2 bit products.
    """
    s = _share_of(x, "x")
    return _fixed(_gated_identity(s, half_square=8, coefficients=_gelu_coefficients()))


def gelu_tanh(x: MPCTensor) -> MPCTensor:
    """GPT-2's tanh GELU (``gelu_new``), by the same 3-piece method and cost as :func:`gelu`.

    Accuracy: max absolute error <= 3e-4 for any ``|x| < CMP_RANGE`` (fit 5e-5, tail 7e-5;
    measured 1.2e-4).
    """
    s = _share_of(x, "x")
    return _fixed(_gated_identity(s, half_square=8, coefficients=_gelu_tanh_coefficients()))


def silu(x: MPCTensor) -> MPCTensor:
    """SiLU / swish ``x * sigmoid(x)`` (Llama's gated MLP); range-safe.

    Method: as :func:`gelu` with the cut at ``sqrt(96) = 9.80`` and the even part
    ``h(x) = (x/2) tanh(x/2)`` as a degree-14 Chebyshev series in ``s = x^2/48 - 1`` (the
    sigmoid's poles at ``x = +-i pi`` make it converge slower than GELU's). One comparison
    call.

    Accuracy: max absolute error <= 1e-3 for any ``|x| < CMP_RANGE``: fit 2e-4, tail
    ``9.8 e^-9.8 = 5.4e-4`` at the cut, noise (measured 5.7e-4). Cost per element: 2 comparisons
    (one call), 1 square, 7 products, 2 bit products.
    """
    s = _share_of(x, "x")
    return _fixed(_gated_identity(s, half_square=48, coefficients=_silu_coefficients()))


def layer_norm(
    x: MPCTensor,
    *,
    weight: torch.Tensor | MPCTensor | None,
    bias: torch.Tensor | MPCTensor | None,
    eps: float,
    dim: int = -1,
) -> MPCTensor:
    """LayerNorm (Ba et al., 2016) over ``dim``: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    The variance is the mean of squares of the centred row at 24 fractional bits, formed at two
    scales so that a row with variance 1e-4 keeps its precision and a row with outliers of 300
    forms no product above 2^33 (:func:`_divide_by_rms`). Its inverse square root is computed as
    in :func:`inv_sqrt` over :data:`NORM_VAR_RANGE` and applied to the centred row as mantissa and
    power of two, so rows with large variance lose no precision. ``weight``/``bias`` (shape
    ``(d,)``) may be public torch tensors or MPCTensors (e.g. the model owner's).

    Accuracy: for row variances in :data:`NORM_VAR_RANGE` (6e-5 .. 2.6e5; ``eps`` below 2^-24,
    e.g. BERT's 1e-12, has no effect), the normalised output has absolute error about
    ``2^-16 / std(row)`` (the input's own resolution) plus 1e-4 relative: measured max 1.1e-3 for
    variances 1e-4 .. 1e5 with outlier channels of +-50 (at variance 1e-4, where the input's
    resolution alone gives 1.5e-3), below 4e-4 for variances >= 1e-2.
    Cost per element: 2 squares (one call), 2 products (1 more for a secret weight); per row
    ~2 x 16 exact comparisons in one call and 9 products for the inverse square root.
    """
    s = _share_of(x, "x")
    _check_eps(eps)
    dim = _normalise_dim(dim, x.dim())
    s = s.transpose(dim, -1)  # (..., d)
    centred = s - _divide(s.sum(-1, keepdim=True), s.size(-1))
    z = _fixed(_divide_by_rms(centred, eps=eps))
    return _affine(z, weight=weight, bias=bias).transpose(dim, -1)


def rms_norm(x: MPCTensor, *, weight: torch.Tensor | MPCTensor | None, eps: float) -> MPCTensor:
    """RMSNorm (Zhang and Sennrich, NeurIPS 2019) over the last dim: ``x / rms(x) * weight``.

    ``rms(x) = sqrt(mean(x^2) + eps)``.

    Same method, accuracy and cost as :func:`layer_norm` (without centring), for mean squares in
    :data:`NORM_VAR_RANGE` (measured 3.8e-4 on the LayerNorm test rows).
    """
    s = _share_of(x, "x")
    _check_eps(eps)
    z = _fixed(_divide_by_rms(s, eps=eps))
    return _affine(z, weight=weight, bias=None)


# ================================================================================================
# Checks, shares <-> MPCTensor
# ================================================================================================


def _share_of(x: object, name: str) -> torch.Tensor:
    """This party's int64 share of a 16-fractional-bit MPCTensor, after checking it is one."""
    if not isinstance(x, _MPC):
        raise TypeError(f"{name} must be a crypten MPCTensor, got {type(x).__name__}")
    if x.encoder.scale != _ONE:
        raise FixedPointRangeError(
            f"{name} has {int(math.log2(x.encoder.scale))} fractional bits; secfwt.mpc.nonlinear "
            f"expects CrypTen's default of {FRAC_BITS} (encoder.precision_bits)"
        )
    if crypten.communicator.get().get_world_size() != 2:
        raise ProtocolError(
            "secfwt.mpc.nonlinear needs exactly 2 computing parties (local truncation)"
        )
    return x.share


def _check_range(lo: float, hi: float, *, frac_bits: int) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= lo:
        raise ValueError(f"need 0 < lo < hi, both finite; got lo={lo}, hi={hi}")
    if lo < 2.0**-frac_bits:
        raise FixedPointRangeError(f"lo={lo} is below the fixed-point resolution 2^-{frac_bits}")
    if hi > _MAX_HI:
        raise FixedPointRangeError(
            f"hi={hi} is above 2^30; such values do not survive CrypTen's products"
        )


def _check_eps(eps: float) -> None:
    if not math.isfinite(eps) or eps < 0 or eps > NORM_VAR_RANGE[1]:
        raise ValueError(f"eps must be finite and in [0, {NORM_VAR_RANGE[1]}], got {eps}")


def _normalise_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} out of range for a tensor with {ndim} dimensions")
    return dim % ndim


def _fixed(s: torch.Tensor) -> MPCTensor:
    """Shares holding 16 fractional bits, as a CrypTen fixed-point MPCTensor."""
    return _MPC.from_shares(s.contiguous(), precision=FRAC_BITS)


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


def _affine(
    z: MPCTensor, *, weight: torch.Tensor | MPCTensor | None, bias: torch.Tensor | MPCTensor | None
) -> MPCTensor:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not (torch.is_tensor(t) or isinstance(t, _MPC)):
            raise TypeError(
                f"{name} must be a torch tensor, an MPCTensor or None, got {type(t).__name__}"
            )
        if t is not None and tuple(t.size()) != (z.size(-1),):
            raise ValueError(f"{name} must have shape ({z.size(-1)},), got {tuple(t.size())}")
    out = z if weight is None else z * weight
    return out if bias is None else out + bias


# ================================================================================================
# Ring arithmetic on this party's shares
# ================================================================================================


def _plus(s: torch.Tensor, public: int | torch.Tensor) -> torch.Tensor:
    """Share of ``secret + public`` (ring integers): only party 0 adds the public value."""
    return s + public * int(crypten.communicator.get().get_rank() == 0)


def _divide(s: torch.Tensor, divisor: int) -> torch.Tensor:
    """Share of ``secret / divisor`` for a public positive integer: CrypTen's 2-party local
    truncation (SecureML). Unbiased, error within 1 unit, fails (error ~2^64 / divisor) with
    probability ``|secret| / 2^64``."""
    return s if divisor == 1 else s.div(divisor, rounding_mode="trunc")


def _mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Share of the exact ring product (broadcasting; Beaver triple from the dealer, 1 round).
    A broadcast operand is opened only once."""
    return beaver.product_shares(a, b, op="mul", local=torch.mul)


def _square(a: torch.Tensor) -> torch.Tensor:
    """Share of the exact ring square: one opening, as CrypTen's square protocol, with the
    dealer's ``r^2`` requested before the opening instead of awaited before it."""
    once = _OpenedOnce(a.size(), [0], [(0, 0)])
    once.open({0: a})
    return once.product(0, 0)


# ================================================================================================
# Comparisons
# ================================================================================================


def _negative_bits(s: torch.Tensor) -> torch.Tensor:
    """Shares of bits ``[x < 0]`` (integers) of ring values with 16 fractional bits.

    Each party keeps bits 11..31 of its own share (``u_i``, 21 bits); the two add up, mod 2^21,
    to ``floor(x / 2^11) + {-1, 0}`` (the shares' high bits cancel mod 2^64, so unlike a
    truncation no wrap-around failure is possible), whose top bit is the sign of ``x`` whenever
    ``2^-5 <= |x| < 2^15``. :func:`_top_bit_of_sum` computes that bit.
    """
    return _top_bit_of_sum(s >> _CMP_DROP_BITS, bits=_CMP_BITS)


def _negative_words(s: torch.Tensor, *, rows: int = 1) -> torch.Tensor:
    """:func:`_negative_bits` left as packed XOR shares, ``(rows, words)`` (:func:`_top_bit_words`),
    for :func:`_select`."""
    return _top_bit_words(s >> _CMP_DROP_BITS, bits=_CMP_BITS, rows=rows)


def _not(words: torch.Tensor) -> torch.Tensor:
    """XOR shares of the complement of XOR-shared bits (rank 0 flips every bit)."""
    return ~words if crypten.communicator.get().get_rank() == 0 else words


def _top_bit_of_sum(u: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Arithmetic shares (integers) of bit ``bits - 1`` of ``u_0 + u_1``, where ``u_i`` is the
    low ``bits`` bits of party i's own ``u`` (ring values of any scale).

    The bit is ``top(u_0) ^ top(u_1) ^ carry``, where ``carry`` is the carry out of the low
    ``bits - 1`` bits of the sum: with party 0's bits ``a`` and party 1's bits ``b`` as XOR shares
    ``(a, 0)`` and ``(0, b)``, generate ``a & b`` takes one AND call and propagate ``a ^ b`` is each
    party's own bits; :func:`_carry_out` reduces them. Security is that of the Beaver AND gates:
    each party only inputs bits of its own value, and only XOR-shared bits leave the circuit, as
    in CrypTen's A2B.
    """
    if u.numel() == 0:
        return torch.zeros_like(u)
    return _b2a_packed(_top_bit_words(u, bits=bits), u.shape)


def _top_bit_words(u: torch.Tensor, *, bits: int, rows: int = 1) -> torch.Tensor:
    """:func:`_top_bit_of_sum` left as XOR shares, packed per row: ``u`` is taken as ``rows``
    equal rows (its flattened elements in order), each padded to whole 64-bit words, and the
    result is ``(rows, words per row)``. Row-aligned words let the bits of different rows be
    combined with XOR (e.g. ``1 ^ above ^ below``)."""
    mine = _bit_planes(u, bits=bits, rows=rows)
    low, top = mine[:-1], mine[-1]  # (bits - 1, words), (words,)
    none = torch.zeros_like(low)
    rank = crypten.communicator.get().get_rank()
    and_ = _AndGates(planes=low.shape[0] + _carry_and_planes(low.shape[0]), words=low.shape[1])
    generate = and_(low if rank == 0 else none, none if rank == 0 else low)
    sign = top ^ _carry_out(generate, low, and_)  # XOR shares of the sign bits, packed
    return sign.reshape(rows, -1)


class _AndGates:
    """AND of XOR-shared words (one Beaver opening per call) with the binary triples of ALL
    calls of one comparison fetched by a single dealer request, sliced along dim 0 in order
    (instead of one dealer round trip per call, as CrypTen's ``beaver.AND``)."""

    def __init__(self, *, planes: int, words: int) -> None:
        size = torch.Size([planes, words])
        self._a, self._b, self._c_of = beaver.triple(size, size, "binary")
        self._c: torch.Tensor | None = None
        self._used = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._c is None:
            self._c = self._c_of()
        part = slice(self._used, self._used + x.shape[0])
        self._used = part.stop
        c = self._c[part]
        return beaver.and_with_triple(x, y, self._a[part], self._b[part], lambda: c)


def _carry_and_planes(planes: int) -> int:
    """Plane ANDs :func:`_carry_out` makes for ``planes`` planes (2 per pair but the lowest's 1)."""
    total = 0
    while planes > 1:
        pairs = planes // 2
        total += 2 * pairs - 1
        planes -= pairs
    return total


def _carry_out(
    generate: torch.Tensor, propagate: torch.Tensor, and_: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Carry out of the top of a sum from its bit planes' generate and propagate (dim 0, LSB first).

    A reduction tree (not a parallel prefix: only the final carry is needed): adjacent nodes
    combine as ``G = G_hi ^ (P_hi & G_lo)``, ``P = P_hi & P_lo``, all pairs of a level in one
    ``and_`` call, an odd node passing through. The lowest node's ``P`` is never needed (no carry
    enters bit 0), so it is not formed: 53 ANDs in 5 levels for 20 planes. ``and_`` is the AND of
    XOR-shared words (the MPC gate; plain ``&`` in the plaintext tests); XOR is local.
    """
    gs = list(generate)
    ps: list[torch.Tensor | None] = [None, *list(propagate)[1:]]
    while len(gs) > 1:
        pairs = len(gs) // 2
        lefts = [ps[2 * k + 1] for k in range(pairs)] + [ps[2 * k + 1] for k in range(1, pairs)]
        rights = [gs[2 * k] for k in range(pairs)] + [ps[2 * k] for k in range(1, pairs)]
        products = and_(torch.stack(lefts), torch.stack(rights))  # type: ignore[arg-type]
        next_g = [gs[2 * k + 1] ^ products[k] for k in range(pairs)]
        next_p = [None] + [products[pairs + k - 1] for k in range(1, pairs)]
        if len(gs) % 2:
            next_g.append(gs[-1])
            next_p.append(ps[-1])
        gs, ps = next_g, next_p
    return gs[0]


def _bit_planes(u: torch.Tensor, *, bits: int, rows: int = 1) -> torch.Tensor:
    """``(bits, words)`` int64 words: bit ``k`` of word ``w`` of plane ``j`` is bit ``j``
    of element ``64 w + k`` of ``u`` (flattened, zero-padded), for the low ``bits`` bits.
    With ``rows > 1`` the flattened ``u`` is cut into ``rows`` equal rows, each zero-padded to
    whole words (``words = rows * ceil(n / rows / 64)``).

    Local: the low bytes of the elements are laid out as one contiguous byte row each, and each
    plane is one shift, mask and ``np.packbits`` over a byte row (little-endian bit and byte
    order on every host). 4.7 ms for 786k elements and 21 planes here, where unpacking every
    element's bits and packing the transposed bit matrix took 52 ms.
    """
    flat = _padded_rows(u, rows).reshape(-1)
    byte_rows = flat.numpy().astype("<i8", copy=False).view(np.uint8).reshape(-1, 8)[:, : math.ceil(bits / 8)]
    byte_rows = np.ascontiguousarray(byte_rows.T)  # (bytes, n): byte i of every element
    planes = np.empty((bits, byte_rows.shape[1] // 8), np.uint8)
    scratch = np.empty(byte_rows.shape[1], np.uint8)
    for j in range(bits):
        np.right_shift(byte_rows[j // 8], j % 8, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)
        planes[j] = np.packbits(scratch, bitorder="little")
    return torch.from_numpy(planes.view("<i8").astype(np.int64, copy=False))


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` flattened into ``(rows, m)``, each row zero-padded to a multiple of 64 elements."""
    flat = t.reshape(rows, -1)
    pad = (-flat.shape[1]) % _WORD_BITS
    return torch.nn.functional.pad(flat, (0, pad)) if pad else flat


def _b2a_packed(words: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Arithmetic shares of single bits given as packed XOR shares, ``(rows, words)`` as from
    :func:`_top_bit_words` (CrypTen's B2A of one bit with the opening packed: 1/64 of a word per
    element instead of a word).

    The dealer's pair ``(r_A, r_B)`` shares one random bit ``r`` both ways; ``z = x ^ r`` is
    opened and ``x = z + r - 2 z r`` is linear in ``r_A`` (as ``beaver.B2A_single_bit``).
    """
    rows = words.shape[0]
    r_bits, r_arith_of = beaver.bit_masks(torch.Size(shape))
    masked = words ^ _pack_rows(r_bits, rows)
    z = _unpack_rows(crypten.communicator.get().all_reduce(masked, op=torch.distributed.ReduceOp.BXOR), shape)
    return _plus(r_arith_of() * (1 - 2 * z), z)


def _select(words: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Shares of ``b * v`` for bits ``b`` given as packed XOR shares ``(rows, words)``
    (:func:`_top_bit_words` with ``rows = values.size(0)``, or ``rows = 1``) and ring values ``v``
    of any scale: exact, no truncation. One opening where a B2A followed by a Beaver product
    (:func:`_b2a_packed`, :func:`_mul`) takes two.

    With the dealer's random bit ``r`` (XOR and additive shares), random ``a`` and shares of
    ``r a`` (``beaver.bit_triple``), ``z = b ^ r`` and ``e = v - a`` are opened together. Then
    ``b = z + (1 - 2 z) r`` and ``r v = e r + r a``, so ``b v = z v + (1 - 2 z)(e [r] + [r a])``
    is local. ``z`` is ``b`` under a one-time pad and ``e`` is ``v`` under a uniform mask: what
    the B2A and the Beaver product open, in one message. The XOR of the two parties' packed
    words travels in the same SUM exchange as ``e``: with two parties each recovers the
    other's words as ``sum - mine``. Without the TTP dealer: B2A, then a Beaver product.
    """
    comm = crypten.communicator.get()
    if comm.get_world_size() != 2:
        raise ProtocolError(f"the fused bit select is for 2 computing parties, not {comm.get_world_size()}")
    triple = beaver.bit_triple(values.size())
    if triple is None:
        return _mul(_b2a_packed(words, values.size()), values)
    r_bits, a, r_and_ra_of = triple
    mine = words ^ _pack_rows(r_bits, words.shape[0])
    total, e = comm.all_reduce([mine, values - a], batched=True)
    z = _unpack_rows(mine ^ (total - mine), values.size())
    r, ra = r_and_ra_of()
    return z * values + (1 - 2 * z) * (e * r + ra)


def _pack_rows(bits: torch.Tensor, rows: int) -> torch.Tensor:
    """0/1 int64 tensor -> ``(rows, words)`` packed words, the layout of :func:`_top_bit_words`."""
    flat = _padded_rows(bits, rows).numpy().astype(np.uint8)
    return torch.from_numpy(np.packbits(flat, axis=1, bitorder="little").view("<i8").astype(np.int64, copy=False))


def _unpack_rows(words: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(rows, words)`` packed bits -> 0/1 int64 tensor of ``shape`` (each row's padding dropped)."""
    rows = words.shape[0]
    raw = words.contiguous().numpy().astype("<i8", copy=False).view(np.uint8)
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, : math.prod(shape) // rows]
    return torch.from_numpy(bits.astype(np.int64)).reshape(shape)


def _greater_than_exact(s: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    """Shares of bits ``[x > t]`` for public ring thresholds, stacked on a new dim 0: one exact
    64-bit comparison call (the sign bit of ``t - x`` in the whole ring, as CrypTen's ``_ltz``)
    for values of any magnitude."""
    return _top_bit_of_sum(torch.stack([_plus(-s, t) for t in thresholds]), bits=64)


def _max_last_dim(s: torch.Tensor) -> torch.Tensor:
    """Row max over the last dim (keepdim): a halving tree, one comparison call per level.

    ``n - 1`` comparisons per row, ``ceil(log2 n)`` levels. A comparison may pick the smaller of
    two values closer than ``CMP_RESOLUTION``, so the result is within ``log2(n) * 2^-5`` of the
    max (0.28 for n = 512), which softmax absorbs.
    """
    while s.size(-1) > 1:
        n = s.size(-1)
        half = n // 2
        a, b = s[..., :half], s[..., half : 2 * half]
        diff = a - b
        larger = a - _select(_negative_words(diff), diff)
        s = larger if n % 2 == 0 else torch.cat([larger, s[..., 2 * half :]], dim=-1)
    return s


# ================================================================================================
# Polynomials
# ================================================================================================


class _OpenedOnce:
    """Products among a fixed set of values (same shape) in which each value is opened only once,
    however many products it enters: Beaver's protocol with a value's mask reused across its
    products (the dealer supplies ``a_i a_j`` for every pair, :func:`beaver.mask_products`).

    Value ``k`` is opened as ``d_k = x_k - a_k`` with its own uniform mask ``a_k``, so every opening
    is a one-time pad as in Beaver's protocol, and ``x_i x_j = d_i d_j + d_i a_j + d_j a_i + a_i a_j``
    is local given the openings. Without the TTP dealer each product is an ordinary Beaver product.
    """

    def __init__(self, size: torch.Size, keys: Sequence[int], pairs: Sequence[tuple[int, int]]) -> None:
        self._index = {k: i for i, k in enumerate(keys)}
        self._pair = {p: i for i, p in enumerate(pairs)}
        dealt = beaver.mask_products(size, len(keys), tuple((self._index[i], self._index[j]) for i, j in pairs))
        self._a, self._c_of = dealt if dealt is not None else (None, None)
        self._c: torch.Tensor | None = None
        self._known: dict[int, torch.Tensor] = {}  # d_k (opened), or x_k itself without the dealer
        self._rank0 = crypten.communicator.get().get_rank() == 0

    def open(self, values: dict[int, torch.Tensor]) -> None:
        """Open those of ``values`` not opened yet, in one exchange."""
        fresh = [k for k in values if k not in self._known]
        if self._a is None:
            self._known.update({k: values[k] for k in fresh})
        elif fresh:
            masked = torch.stack([values[k] - self._a[self._index[k]] for k in fresh])
            self._known.update(zip(fresh, crypten.communicator.get().all_reduce(masked)))

    def product(self, i: int, j: int) -> torch.Tensor:
        """Share of ``x_i x_j`` (exact ring product) for opened ``i``, ``j``."""
        if self._a is None:
            return _mul(self._known[i], self._known[j])
        if self._c is None:
            self._c = self._c_of()
        d_i, d_j = self._known[i], self._known[j]
        z = d_i * self._a[self._index[j]] + d_j * self._a[self._index[i]] + self._c[self._pair[(i, j)]]
        return z + d_i * d_j if self._rank0 else z


def _basis_schedule(degree: int) -> list[tuple[int, list[int]]]:
    """The doubling levels of :func:`_chebyshev_basis`: ``(p, js)`` forms ``T_(p+j)`` for ``j`` in ``js``."""
    levels, p = [], 1
    while p < degree:
        levels.append((p, [j for j in range(1, p + 1) if p + j <= degree]))
        p *= 2
    return levels


def _chebyshev_basis(u: torch.Tensor, degree: int, products: _OpenedOnce) -> dict[int, torch.Tensor]:
    """Shares of ``T_1 .. T_degree`` of ``u`` (16 frac bits), one opening per doubling level.

    Uses ``T_(p+j) = 2 T_p T_j - T_(p-j)`` with ``p`` doubling, so all ``T_(p+1) .. T_(2p)`` come
    from one round; ``products`` opens each ``T_j`` once, at the first level that needs it.
    """
    basis = {1: u}
    for p, js in _basis_schedule(degree):
        products.open({k: basis[k] for k in (p, *js)})
        for j in js:
            twice = _divide(products.product(p, j), _ONE // 2)
            basis[p + j] = twice - basis[p - j] if p > j else _plus(twice, -_ONE)
    return basis


_B = -1  # key of the series' inner combination among _OpenedOnce's values


def _chebyshev_series(u: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_j c_j T_j(u)`` (16 frac bits) for ``u`` in [-1, 1], with ``ceil(n/2)`` products.

    With ``m = ceil(n/2)`` and ``T_(m+i) = 2 T_m T_i - T_(m-i)``, the series of degree ``n`` is
    ``A + 2 T_m B`` where ``A`` and ``B`` are public combinations of ``T_0 .. T_m`` (a baby-step /
    giant-step split as in Paterson and Stockmeyer, SIAM J. Comput. 1973): ``m - 1`` products
    for the basis plus one, instead of ``n - 1``; ``ceil(log2 m) + 1`` rounds. Every factor is
    opened once (:class:`_OpenedOnce`): for degree 8, ``T_1``, ``T_2``, ``T_4`` and ``B``, 32 bytes
    per element where a fresh Beaver triple per product opened 56.
    """
    n = len(coefficients) - 1
    m = max(1, math.ceil(n / 2))
    schedule = _basis_schedule(m)
    pairs = [(p, j) for p, js in schedule for j in js] + ([(m, _B)] if n > m else [])
    keys = sorted({k for pair in pairs for k in pair})
    products = _OpenedOnce(u.size(), keys, pairs)
    basis = _chebyshev_basis(u, m, products)
    outer = list(coefficients[: m + 1])  # A
    inner = [0.0] * (m + 1)  # B
    for i in range(1, n - m + 1):
        outer[m - i] -= coefficients[m + i]
        inner[i] = coefficients[m + i]
    total = _chebyshev_combination(basis, outer)
    if n > m:
        products.open({m: basis[m], _B: _chebyshev_combination(basis, inner)})
        total = total + _divide(products.product(m, _B), _ONE // 2)
    return total


def _chebyshev_combination(
    basis: dict[int, torch.Tensor], coefficients: Sequence[float]
) -> torch.Tensor:
    """``sum_j c_j T_j`` for public ``c`` (kept to 2^-32, one truncation), ``T_0 = 1``."""
    terms = torch.stack([basis[j] for j in range(1, len(coefficients))])
    weights = torch.tensor([round(c * 2**_COEF_BITS) for c in coefficients[1:]], dtype=torch.long)
    weights = weights.view(-1, *([1] * (terms.dim() - 1)))
    acc = _divide((terms * weights).sum(0), 1 << _COEF_BITS)
    return _plus(acc, round(coefficients[0] * _ONE))


def _chebyshev_fit(fn: Callable[[np.ndarray], np.ndarray], degree: int) -> tuple[float, ...]:
    """Least-squares Chebyshev coefficients of ``fn`` on [-1, 1] at 4000 Chebyshev nodes.

    Deterministic (no randomness, numpy only), so every party derives the same coefficients."""
    k = np.arange(_FIT_NODES)
    t = np.cos(np.pi * (k + 0.5) / _FIT_NODES)
    return tuple(float(c) for c in np.polynomial.chebyshev.chebfit(t, fn(t), degree))


@functools.cache
def _exp_coefficients() -> tuple[float, ...]:
    # u = x/8 + 15/16 maps [-15.5, 0.5] onto [-1, 1]; fit e^(x/4) = e^(2u - 15/8).
    return _chebyshev_fit(lambda u: np.exp(2.0 * u - 1.875), _EXP_DEGREE)


def _even_part_fit(
    fn: Callable[[np.ndarray], np.ndarray], half_square: int, degree: int
) -> tuple[float, ...]:
    """Coefficients of the even ``h(x) = fn(x) - x/2`` as a series in ``x^2 / half_square - 1``."""

    def even_part(s: np.ndarray) -> np.ndarray:
        x = np.sqrt(half_square * (s + 1.0))
        return fn(x) - x / 2.0

    return _chebyshev_fit(even_part, degree)


_erf = np.vectorize(math.erf)


@functools.cache
def _gelu_coefficients() -> tuple[float, ...]:
    return _even_part_fit(lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))), 8, 8)


@functools.cache
def _gelu_tanh_coefficients() -> tuple[float, ...]:
    c = math.sqrt(2.0 / math.pi)
    return _even_part_fit(lambda x: 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3))), 8, 8)


@functools.cache
def _silu_coefficients() -> tuple[float, ...]:
    return _even_part_fit(lambda x: x / (1.0 + np.exp(-x)), 48, 14)


# ================================================================================================
# Element-wise pieces (shares)
# ================================================================================================


def _exp_ring(s: torch.Tensor) -> torch.Tensor:
    """:func:`exp` on shares with 16 fractional bits."""
    below = _negative_words(_plus(s, round(-_EXP_LOWER * _ONE)))  # [x < -15.5]
    u = _plus(_divide(s, 8), round(0.9375 * _ONE))  # x/8 + 15/16, in [-1, 1] on the fitted range
    y = _chebyshev_series(u, _exp_coefficients())  # e^(x/4)
    y = _select(_not(below), y)  # exact 0 below the range (garbage there times an integer 0)
    for _ in range(_EXP_SQUARINGS):
        y = _divide(_square(y), _ONE)
    return y


def _gated_identity(
    s: torch.Tensor, *, half_square: int, coefficients: Sequence[float]
) -> torch.Tensor:
    """``f(x)`` with ``f = x`` above ``c``, ``0`` below ``-c`` and ``x/2 + h(x)`` between, where
    ``c = sqrt(2 half_square)`` and ``h`` is a Chebyshev series in ``x^2 / half_square - 1``."""
    cut = round((math.sqrt(2.0 * half_square) - CMP_RESOLUTION) * _ONE)
    words = _negative_words(torch.stack([_plus(-s, cut), _plus(s, cut)]), rows=2)  # [x > c], [x < -c]
    above, between = words[:1], _not(words[:1] ^ words[1:])  # the two never hold together
    scaled_square = _plus(_divide(_square(s), _ONE * half_square), -_ONE)  # garbage beyond c
    inner = _divide(s, 2) + _chebyshev_series(scaled_square, coefficients)
    picked = _select(torch.cat([above, between]), torch.stack([s, inner]))
    return picked.sum(0)


# ================================================================================================
# Powers of two, reciprocal, inverse square root (shares)
# ================================================================================================


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


def _affine_public(u: torch.Tensor, coefficients: tuple[float, float]) -> torch.Tensor:
    """``c0 + c1 u`` with public constants kept to 2^-32 (16 frac bits)."""
    c0, c1 = coefficients
    return _plus(_divide(u * round(c1 * 2**_COEF_BITS), 1 << _COEF_BITS), round(c0 * _ONE))


# ================================================================================================
# Normalisation layers (shares)
# ================================================================================================


def _divide_by_rms(s: torch.Tensor, *, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim (shares in and out, 16 frac bits).

    The mean square is formed at two scales in one batched square: ``(x / 2^8)^2`` (products
    <= 2^33 for ``|x| <= 300``) serves rows whose mean square exceeds 1/4, ``x^2`` truncated to 24
    fractional bits serves the others (a variance of 1e-4 keeps 11 significant bits). ONE exact
    comparison call decides the split and the power-of-four region of both candidates; one batched
    bit product then selects the variance and its region, and the unused candidate (garbage for
    big rows) cancels exactly in the ring.
    """
    d = s.size(-1)
    eps_ring = round(eps * 2**_VAR_FRAC_BITS)
    squares = _square(torch.stack([_divide(s, 1 << _VAR_COARSE_SHIFT), s]))  # 16 and 32 frac bits
    high = _plus(
        _divide(squares[0].sum(-1, keepdim=True), d) << (_VAR_FRAC_BITS - FRAC_BITS), eps_ring
    )
    low = _divide(
        _divide(squares[1], 1 << (2 * FRAC_BITS - _VAR_FRAC_BITS)).sum(-1, keepdim=True), d
    )
    low = _plus(low, eps_ring)
    exps = _pow4_exponents(*NORM_VAR_RANGE)
    thresholds = [1 << (e + _VAR_FRAC_BITS) for e in exps[:-1]]
    split = round(_VAR_SPLIT * 2**_VAR_FRAC_BITS)
    above = _greater_than_exact(torch.stack([high, low]), [*thresholds, split])  # (m+1, 2, ..., 1)
    use_high = above[-1, 0]
    onehot_high, onehot_low = _onehot_regions(above[:-1, 0]), _onehot_regions(above[:-1, 1])
    picked = _mul(torch.cat([(high - low).unsqueeze(0), onehot_high - onehot_low]), use_high)
    mean_square = low + picked[0]  # 24 frac bits
    where = _Pow4Regions(onehot=onehot_low + picked[1:], exps=exps)
    y = _inv_sqrt_mantissa(mean_square, where, frac_bits=_VAR_FRAC_BITS)
    # |x| / sqrt(mean(x^2)) <= sqrt(d), and scaled = that * sqrt(u) with u <= 1
    out_bits = math.ceil(0.5 * math.log2(d)) + 1
    scaled = _scale_by_pow2(s, where.onehot, [-e // 2 for e in exps], out_bits=out_bits)
    return _divide(_mul(scaled, y), _ONE)


__all__ = [
    "CMP_RANGE",
    "CMP_RESOLUTION",
    "FRAC_BITS",
    "NORM_VAR_RANGE",
    "SOFTMAX_MASK_OFFSET",
    "exp",
    "gelu",
    "gelu_tanh",
    "inv_sqrt",
    "layer_norm",
    "reciprocal",
    "rms_norm",
    "silu",
    "softmax",
]
