"""CrypTen 0.4.1 (PyPI, 2022) on torch 2.13: what it needs to import and to compute correctly.

Import ``crypten`` from here (``from secfwt.crypten_compat import crypten``). secfwt's own
protocols on top of CrypTen live in :mod:`secfwt.mpc` (:func:`secfwt.mpc.engine.install`).

1. ``import crypten`` fails (``No module named 'torch.onnx._internal.registration'``, gone after
   torch 2.5); secfwt never uses CrypTen's ONNX converter, so an empty stub stands in.
2. ``crypten.load`` fails: ``torch.load`` now defaults to ``weights_only=True`` and refuses
   CrypTen's pickles; :func:`load_closure` passes ``weights_only=False`` (own files only).
3. ``FixedPointEncoder.decode`` floors negatives by ``scale - 1``: a revealed negative x comes back
   as x - 1 with probability ~|x| / 2^16; :func:`install_exact_decode` divides exactly.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

_STUB_NAME = "torch.onnx._internal.registration"


def _install_onnx_stub() -> None:
    try:
        __import__(_STUB_NAME)
        return
    except ImportError:
        pass
    stub = types.ModuleType(_STUB_NAME)
    stub.registry = None  # type: ignore[attr-defined]  # the only name crypten imports from it
    sys.modules[_STUB_NAME] = stub


# The one thing done at import: without it the import below fails.
_install_onnx_stub()

import crypten  # noqa: E402
import crypten.mpc  # noqa: E402,F401


def load_closure(f: Any) -> Any:
    """``torch.load`` for files written by ``crypten.save`` on this party (adaptation 2)."""
    return torch.load(f, weights_only=False)


def _fixed_decode(self: Any, tensor: Any) -> Any:
    if tensor is None:
        return None
    if self._scale > 1:
        whole = tensor.div(self._scale, rounding_mode="floor")  # exact floor for negatives too
        frac = tensor - whole * self._scale  # in [0, scale)
        return (whole.float() + frac.float() / self._scale).data
    return tensor.data


def install_exact_decode() -> None:
    """Adaptation 3: ``FixedPointEncoder.decode`` as an exact floor division. Idempotent."""
    from crypten.encoder import FixedPointEncoder

    FixedPointEncoder.decode = _fixed_decode  # type: ignore[method-assign]


def exact_decode_installed() -> bool:
    """Whether :func:`install_exact_decode` has run in this process."""
    from crypten.encoder import FixedPointEncoder

    return FixedPointEncoder.__dict__.get("decode") is _fixed_decode


__all__ = ["crypten", "exact_decode_installed", "install_exact_decode", "load_closure"]
