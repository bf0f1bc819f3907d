"""Range-safe nonlinear functions on CrypTen MPCTensors, accurate on real transformer activations.

CrypTen's own approximations fail on the ranges a transformer produces: ``exp`` is garbage below
-256, ``reciprocal`` above ~300, ``inv_sqrt`` above ~500 (LayerNorm variances), ``erf``
diverges, and ``softmax`` breaks from sequence length ~256 or with a -1e4 additive mask. The
functions here replace them. Each takes and returns MPCTensors in CrypTen's default fixed point
(int64 ring, 16 fractional bits), states the input range on which it is accurate, and is meant
for the 2 computing parties of secfwt (CrypTen's 2-party local truncation).

One module per primitive, each lower one used by those after it:

* :mod:`.fixed_point`: this party's shares and the local ring arithmetic (why shares, not
  MPCTensors, inside; truncation failure bounds).
* :mod:`.bits`: packed bit planes and rows of words.
* :mod:`.compare`: bit-sliced signs, exact 64-bit comparisons, one-opening bit selects, row max,
  clip.
* :mod:`.polynomial`: Chebyshev series with each factor opened once, deterministic fits.
* :mod:`.exponential`: :func:`exp` (clamped) and :func:`exp_bounded` (public bound).
* :mod:`.activations`: :func:`gelu`, :func:`gelu_tanh`, :func:`silu`, :func:`tanh`.
* :mod:`.inverse`: :func:`reciprocal`, :func:`inv_sqrt` (powers of four, then Newton).
* :mod:`.logarithm`: :func:`log` (powers of four, then a Chebyshev series).
* :mod:`.normalisation`: :func:`layer_norm`, :func:`rms_norm`.
* :mod:`.probabilities`: :func:`softmax`, :func:`cross_entropy`, :func:`token_nll`,
  :func:`target_token_nll`.

Measured costs (2 parties + dealer, TTP, 2 shared cores) are recorded in
``tests/mpc/nonlinear/test_timings.py`` next to CrypTen's own functions.
"""

from __future__ import annotations

from secfwt.mpc.nonlinear.activations import TANH_CLIP, gelu, gelu_tanh, silu, tanh
from secfwt.mpc.nonlinear.compare import (
    CMP_RANGE,
    CMP_RESOLUTION,
    clip,
    greater_than,
    rows_out_of_range,
)
from secfwt.mpc.nonlinear.exponential import exp, exp_bounded, exp_squarings
from secfwt.mpc.nonlinear.fixed_point import FRAC_BITS, MPCTensor
from secfwt.mpc.nonlinear.inverse import inv_sqrt, reciprocal
from secfwt.mpc.nonlinear.logarithm import log
from secfwt.mpc.nonlinear.normalisation import NORM_VAR_RANGE, layer_norm, rms_norm
from secfwt.mpc.nonlinear.probabilities import (
    SOFTMAX_MASK_OFFSET,
    TOKEN_NLL_BOUND,
    cross_entropy,
    log_on_class_range,
    softmax,
    target_token_nll,
    token_nll,
)

__all__ = [
    "CMP_RANGE",
    "CMP_RESOLUTION",
    "FRAC_BITS",
    "MPCTensor",
    "NORM_VAR_RANGE",
    "SOFTMAX_MASK_OFFSET",
    "TANH_CLIP",
    "TOKEN_NLL_BOUND",
    "clip",
    "cross_entropy",
    "exp",
    "exp_bounded",
    "exp_squarings",
    "gelu",
    "gelu_tanh",
    "greater_than",
    "inv_sqrt",
    "layer_norm",
    "log",
    "log_on_class_range",
    "rows_out_of_range",
    "reciprocal",
    "rms_norm",
    "silu",
    "softmax",
    "tanh",
    "target_token_nll",
    "token_nll",
]
