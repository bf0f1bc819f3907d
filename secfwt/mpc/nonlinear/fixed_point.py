"""This party's shares of CrypTen fixed-point values, and the local ring arithmetic on them.

The functions of :mod:`secfwt.mpc.nonlinear` take and return MPCTensors in CrypTen's default
fixed point (int64 ring, 16 fractional bits) and are meant for the 2 computing parties of secfwt.
Inside they work on this party's int64 share tensors, not on MPCTensors: CrypTen's
``MPCTensor.__getattribute__`` reads its omegaconf config on every attribute access (0.1-0.7 ms
per local op on the dev VM), so additions, public integer products and truncations are local
torch ops here, and CrypTen is called only for Beaver products (:func:`_mul`) and for the AND
gates and B2A of comparisons (:mod:`.compare`).

Every truncation is written out (:func:`_divide`), so public constants keep 2^-32 precision and
products stay small: CrypTen's 2-party truncation is local and fails with probability
``|v| / 2^64`` for the value ``v`` it truncates (SecureML, Mohassel and Zhang, S&P 2017), and no
result used here truncates a value above ~2^40 on the supported ranges.
"""

from __future__ import annotations

import math
from typing import Any, TypeAlias

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import FixedPointRangeError, ProtocolError
from secfwt.mpc import beaver

#: ``crypten.mpc.MPCTensor`` in annotations (CrypTen ships no type information: Any for mypy).
MPCTensor: TypeAlias = Any
_MPC = crypten.mpc.MPCTensor


#: Fractional bits of CrypTen's fixed point (``cfg.encoder.precision_bits``); inputs must use it.
FRAC_BITS = 16
_ONE = 1 << FRAC_BITS


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


def _fixed(s: torch.Tensor) -> MPCTensor:
    """Shares holding 16 fractional bits, as a CrypTen fixed-point MPCTensor."""
    return _MPC.from_shares(s.contiguous(), precision=FRAC_BITS)


def _normalise_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} out of range for a tensor with {ndim} dimensions")
    return dim % ndim


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
