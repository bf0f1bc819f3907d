"""The Chebyshev fits behind exp, GELU and SiLU, in plaintext float64."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secfwt.mpc.nonlinear import activations, exponential


@pytest.mark.parametrize(
    ("coefficients", "half_square", "function", "fit_tol"),
    [
        (
            activations._gelu_coefficients,
            8,
            lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
            1e-4,
        ),
        (activations._gelu_tanh_coefficients, 8, lambda x: F.gelu(x, approximate="tanh"), 1e-4),
        (activations._silu_coefficients, 48, F.silu, 5e-4),
    ],
)
def test_even_part_fits(coefficients: Any, half_square: int, function: Any, fit_tol: float) -> None:
    cut = math.sqrt(2 * half_square)
    x = torch.linspace(-cut, cut, 20001, dtype=torch.float64)
    series = np.polynomial.chebyshev.chebval((x**2 / half_square - 1).numpy(), coefficients())
    assert float((torch.from_numpy(series) + x / 2 - function(x)).abs().max()) <= fit_tol


def test_exp_fit() -> None:
    x = torch.linspace(-15.5, 0.5, 20001, dtype=torch.float64)
    base = np.polynomial.chebyshev.chebval(
        (x / 8 + 0.9375).numpy(), exponential._exp_coefficients()
    )
    approx = torch.from_numpy(base) ** 4
    assert float((approx - torch.exp(x)).abs().max()) <= 1e-5  # measured 6.0e-6
    assert float((approx / torch.exp(x) - 1).abs().max()) <= 2e-4  # 1.6e-4 at -15.5, 1e-5 above -4


def test_wide_exp_fit() -> None:
    """The log-sum-exp's exp: (e^(x/8))^8 on [-23.5, 0.5]."""
    fit = exponential._WIDE_EXP
    x = torch.linspace(-23.5, 0.5, 20001, dtype=torch.float64)
    base = np.polynomial.chebyshev.chebval(
        (x / 12 + 11.5 / 12).numpy(), exponential._exp_coefficients(fit)
    )
    approx = torch.from_numpy(base) ** 8
    assert float((approx / torch.exp(x) - 1).abs().max()) <= 3e-5  # measured 1.5e-5
