"""CrypTen 0.4.1 (PyPI, 2022) on torch 2.13: what it needs to import and to compute correctly.

Import ``crypten`` from here (``from secfwt.crypten_compat import crypten``). secfwt's own
protocols on top of CrypTen live in :mod:`secfwt.mpc` (:func:`secfwt.mpc.engine.install`).

1. ``import crypten`` fails (``No module named 'torch.onnx._internal.registration'``, gone after
   torch 2.5); secfwt never uses CrypTen's ONNX converter, so an empty stub stands in. The
   converter's own ``import onnx`` (the only one in CrypTen) also costs every party process
   ~1 s of CPU (0.9-1.2 s measured on an AMD EPYC without AVX-512: onnx loads ``ml_dtypes``,
   whose extension alone took 1.1 s), three processes per job start; so while CrypTen imports,
   ``onnx`` is a placeholder that the converter keeps, and a later ``import onnx`` gets the
   real package.
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


class _ConverterOnly(types.ModuleType):
    """``onnx`` as CrypTen's ONNX converter sees it when secfwt imported CrypTen: secfwt never
    calls the converter, and a call says why it fails instead of failing on a missing name."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{self.__name__}.{name}: secfwt imports CrypTen without onnx (its ONNX converter, "
            "crypten.nn.from_onnx / from_pytorch, is not available in a process that imported "
            "secfwt.crypten_compat first)"
        )


def _import_crypten_without_onnx() -> None:
    """Import CrypTen with ``onnx`` (and ``onnx.numpy_helper``) standing in as placeholders,
    then take them out of ``sys.modules``: only the converter's module keeps them."""
    if "onnx" in sys.modules:  # already loaded by someone else: nothing to save
        import crypten.mpc  # noqa: F401

        return
    placeholders = {
        "onnx": _ConverterOnly("onnx"),
        "onnx.numpy_helper": _ConverterOnly("onnx.numpy_helper"),
    }
    placeholders["onnx"].numpy_helper = placeholders["onnx.numpy_helper"]  # type: ignore[attr-defined]
    sys.modules.update(placeholders)
    try:
        import crypten.mpc  # noqa: F401
    finally:
        for name, module in placeholders.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


# Done at import: without the stub the import below fails; without the placeholders it is slow.
_install_onnx_stub()
_import_crypten_without_onnx()

import crypten  # noqa: E402


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
