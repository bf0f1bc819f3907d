"""Activations on MPCTensors, range-safe: exact GELU, tanh GELU, SiLU, softplus (3 pieces) and
tanh (clip).

GELU, SiLU and softplus are ``x`` far above 0, 0 far below and ``x/2 + h(x)`` between, with the even
``h`` a Chebyshev series in ``x^2`` (:func:`_gated_identity`): both cuts are decided in one
comparison call, and the series branch, garbage outside the cuts, is discarded exactly
(comparison bits are integers). CrypTen has no usable erf, and its tanh and sigmoid rely on an
exp and a reciprocal that break on large inputs, hence :func:`tanh` clips first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from secfwt.mpc.nonlinear.compare import (
    CMP_RESOLUTION,
    _negative_words,
    _not,
    _select,
    _select_with_opened,
    clip,
)
from secfwt.mpc.nonlinear.fixed_point import _ONE, MPCTensor, _divide, _fixed, _plus, _share_of
from secfwt.mpc.nonlinear.polynomial import _chebyshev_series, _even_part_fit, _OpenedOnce

#: tanh is evaluated on inputs clipped to [-TANH_CLIP, TANH_CLIP]; |tanh(8) - 1| < 2.3e-7.
TANH_CLIP = 8.0


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


def _softplus_ring(s: torch.Tensor) -> torch.Tensor:
    """Shares of ``softplus(x) = log(1 + e^x)`` (16 frac bits) for shares ``s`` of ``x``;
    range-safe (the two-class cross-entropy, :func:`.probabilities.cross_entropy`).

    Method: as :func:`gelu`, since ``softplus(x) = x/2 + log(2 cosh(x/2))`` with an even second
    term: ``x`` above ``sqrt(120) = 10.95``, 0 below ``-10.95`` and ``x/2 + h(x)`` between, ``h`` a
    degree-16 Chebyshev series in ``s = x^2/60 - 1`` (``cosh(x/2)`` vanishes at ``x = +-i pi``, as
    SiLU's poles; degree 16 opens as many values as 14). One comparison call.

    Accuracy: max absolute error <= 3e-4 for any ``|x| < CMP_RANGE``: fit 1.7e-5, tail
    ``log(1 + e^-10.95) = 1.8e-5`` at the cut, fixed-point noise (measured 1.7e-4 as the
    two-class cross-entropy, where the log-sum-exp took 3.6e-4). Cost per element: 2
    comparisons (one call), 1 square, 6 values opened for the series, 2 bit products.
    """
    return _gated_identity(s, half_square=60, coefficients=_softplus_coefficients())


def tanh(x: Any) -> Any:
    """tanh on any input: clip to [-8, 8], then CrypTen's tanh (2 sigmoid(2x) - 1, where the
    sigmoid evaluates exp(-|2x|) in [e^-16, 1] and a reciprocal on [1, 2], both in range)."""
    return clip(x, -TANH_CLIP, TANH_CLIP).tanh()


def _gated_identity(
    s: torch.Tensor, *, half_square: int, coefficients: Sequence[float]
) -> torch.Tensor:
    """``f(x)`` with ``f = x`` above ``c``, ``0`` below ``-c`` and ``x/2 + h(x)`` between, where
    ``c = sqrt(2 half_square)`` and ``h`` is a Chebyshev series in ``x^2 / half_square - 1``."""
    cut = round((math.sqrt(2.0 * half_square) - CMP_RESOLUTION) * _ONE)
    # rows [x > c], [x < -c]
    words = _negative_words(torch.stack([_plus(-s, cut), _plus(s, cut)]), rows=2)
    above, between = words[:1], _not(words[:1] ^ words[1:])  # the two never hold together
    # x is opened once, for its square and for its select (the dealer's bits use its mask)
    square = _OpenedOnce(s.size(), [0], [(0, 0)], select=0)
    square.open({0: s})
    scaled_square = _plus(_divide(square.product(0, 0), _ONE * half_square), -_ONE)  # garbage > c
    inner = _divide(s, 2) + _chebyshev_series(scaled_square, coefficients)
    bits = torch.cat([above, between])
    if square.dealt:
        return _select_with_opened(bits, s, square.select_shares(0), inner)
    return _select(bits, torch.stack([s, inner])).sum(0)


_erf = np.vectorize(math.erf)


@functools.cache
def _gelu_coefficients() -> tuple[float, ...]:
    return _even_part_fit(lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))), 8, 8)


@functools.cache
def _gelu_tanh_coefficients() -> tuple[float, ...]:
    c = math.sqrt(2.0 / math.pi)
    return _even_part_fit(lambda x: 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3))), 8, 8)


@functools.cache
def _softplus_coefficients() -> tuple[float, ...]:
    return _even_part_fit(lambda x: np.logaddexp(0.0, x), 60, 16)


@functools.cache
def _silu_coefficients() -> tuple[float, ...]:
    return _even_part_fit(lambda x: x / (1.0 + np.exp(-x)), 48, 14)
