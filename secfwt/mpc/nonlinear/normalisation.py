"""LayerNorm and RMSNorm on MPCTensors, accurate for row variances from 6e-5 to 2.6e5.

CrypTen's ``inv_sqrt`` (so a LayerNorm built on it) fails for variances above ~500, and small
variances lose their precision at 16 fractional bits. :func:`_divide_by_rms` forms the mean
square at two scales and 24 fractional bits, and applies the inverse square root of
:mod:`.inverse` as mantissa and power of two.
"""

from __future__ import annotations

import math

import torch

from secfwt.mpc.nonlinear.compare import _greater_than_exact
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
from secfwt.mpc.nonlinear.inverse import (
    _inv_sqrt_mantissa,
    _onehot_regions,
    _pow4_exponents,
    _Pow4Regions,
    _scale_by_pow2,
)
from secfwt.mpc.nonlinear.polynomial import _square

_VAR_FRAC_BITS = 24  # fractional bits of the mean of squares (small variances need them)
_VAR_COARSE_SHIFT = 8  # high-range path squares x / 2^8, so big rows form no product above 2^33
_VAR_SPLIT = 0.25  # rows with coarse mean square above this use the high-range path
#: Mean squares (variances) on which layer_norm / rms_norm are accurate.
NORM_VAR_RANGE = (2.0**-14, 2.0**18)


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


def rms_norm(
    x: MPCTensor,
    *,
    weight: torch.Tensor | MPCTensor | None,
    eps: float,
    mean_square_range: tuple[float, float] = NORM_VAR_RANGE,
) -> MPCTensor:
    """RMSNorm (Zhang and Sennrich, NeurIPS 2019) over the last dim: ``x / rms(x) * weight``.

    ``rms(x) = sqrt(mean(x^2) + eps)``.

    Same method, accuracy and cost as :func:`layer_norm` (without centring), for row mean squares
    in ``mean_square_range`` (default :data:`NORM_VAR_RANGE`; measured 3.8e-4 on the LayerNorm
    test rows). Decoders with massive activations (a few residual channels of 1e4, mean squares
    of 1e6: Sun et al., "Massive activations in LLMs", 2024) pass a wider range, at most
    :data:`MAX_MEAN_SQUARE`; every factor of 4 of range adds one exact comparison per row, and a
    range wider than about 2^32 (rows of 576) one more product per element (the rescaling
    groups of :func:`~.inverse._scale_by_pow2`).
    """
    s = _share_of(x, "x")
    _check_eps(eps)
    _check_mean_square_range(mean_square_range)
    z = _fixed(_divide_by_rms(s, eps=eps, var_range=mean_square_range))
    return _affine(z, weight=weight, bias=None)


#: Largest mean square :func:`rms_norm` accepts: the coarse squares (x / 2^8)^2 of a row with this
#: mean square sum to d 2^(26 + 16) in the ring, truncated with failure probability d 2^-22 per
#: row (2^-12 for d = 1024; 2^-19 at the mean square of 1.1e6 measured on SmolLM2, d = 576).
MAX_MEAN_SQUARE = 2.0**26


def _check_mean_square_range(r: tuple[float, float]) -> None:
    lo, hi = r
    if not (math.isfinite(lo) and math.isfinite(hi)) or not 2.0**-_VAR_FRAC_BITS <= lo < hi:
        raise ValueError(f"mean_square_range must satisfy 2^-24 <= lo < hi, got {r}")
    if hi > MAX_MEAN_SQUARE:
        raise ValueError(f"mean_square_range upper end {hi} is above 2^26, beyond the ring's room")


def _check_eps(eps: float) -> None:
    if not math.isfinite(eps) or eps < 0 or eps > NORM_VAR_RANGE[1]:
        raise ValueError(f"eps must be finite and in [0, {NORM_VAR_RANGE[1]}], got {eps}")


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


def _divide_by_rms(
    s: torch.Tensor, *, eps: float, var_range: tuple[float, float] = NORM_VAR_RANGE
) -> torch.Tensor:
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
    exps = _pow4_exponents(*var_range)
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
