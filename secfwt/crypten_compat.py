"""The one place that adapts CrypTen 0.4.1 (PyPI, 2022) to torch 2.13.

Nothing else in secfwt imports ``crypten`` before this module has run, patches CrypTen or
touches its global config. Every adaptation says what breaks without it.

1. ``torch.onnx._internal.registration`` no longer exists in torch 2.x releases after 2.5;
   ``crypten.nn.onnx_converter`` imports it at import time, so ``import crypten`` fails with
   ``No module named 'torch.onnx._internal.registration'``. We never use CrypTen's ONNX
   converter (BERT blocks do not convert, see NOTES.md; secfwt builds its layers on CrypTen
   tensors directly), so an empty stub module is registered in ``sys.modules``.
2. ``crypten.load`` calls ``torch.load`` which now defaults to ``weights_only=True`` and
   refuses CrypTen's pickled objects. :func:`load_closure` passes ``weights_only=False``;
   use it only on files this party wrote itself.
3. CrypTen's config singleton accepts any key and defaults to the TFP provider, in which
   rank 0 generates every Beaver triple and so learns the other party's inputs (CrypTen
   issues #450, #505). :func:`configure` sets the provider explicitly from a typed enum and
   is the only writer of ``crypten.cfg``.
4. CrypTen multiplies int64 shares with ``torch.matmul``, which has no BLAS kernel for
   integers: a private x private ``[7424x384] @ [384x384]`` took about 12 s under TTP.
   :func:`_install_ring_matmul` routes the int64 matmuls of the Beaver protocol and of the
   TTP dealer through :func:`secfwt.mpc.ring.ring_matmul` (exact, bit-identical, float64
   GEMMs), and lets the TTP client compute the triple's output size from shapes instead of
   a full matmul. :func:`set_ring_matmul` (or ``SECFWT_RING_MATMUL=0`` in the environment of
   every party, the dealer included) switches back to CrypTen's own code for benchmarks.
5. ``FixedPointEncoder.decode`` floors negative values by ``scale - 1`` instead of ``scale``,
   so a revealed negative x comes back as x - 1 with probability about |x| / 2^16 (found in
   the ring-matmul benchmark: 80 of 2.85 M outputs off by exactly 1.0). :func:`_fixed_decode`
   replaces it with an exact floor division by the scale.
6. ``CrypTensor.__getattribute__`` is wrapped by ``crypten.debug.register_validation``, which
   reads ``cfg.debug.validation_mode`` from the omegaconf config on every attribute access of
   every encrypted tensor (0.17 ms each under load; about 40% of LayerNorm's time).
   secfwt never enables validation mode, so :func:`_install_fast_getattribute` restores the
   unwrapped method.
"""

from __future__ import annotations

import enum
import logging
import sys
import types
from typing import Any

import torch

log = logging.getLogger(__name__)

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


_install_onnx_stub()

import crypten
import crypten.communicator as crypten_comm  # noqa: F401
import crypten.mpc

# ----------------------------------------------------------------------------------------------
# Adaptation 4: int64 ring matmul through float64 GEMMs (see module docstring).
# ----------------------------------------------------------------------------------------------
#: ``SECFWT_RING_MATMUL=0`` starts every process with the patch off. The dealer runs no secfwt
#: code after start-up, so the environment is the only switch that reaches it.
_RING_MATMUL_ENV = "SECFWT_RING_MATMUL"

import functools
import os
from collections.abc import Callable

from crypten.common.rng import generate_random_ring_element
from crypten.mpc.primitives import beaver as _beaver
from crypten.mpc.provider import ttp_provider as _ttp_provider

from secfwt.mpc.ring import ring_matmul

_ring_matmul_enabled = os.environ.get(_RING_MATMUL_ENV, "1").strip() != "0"


def set_ring_matmul(enabled: bool) -> None:
    """Turn the float64-GEMM int64 matmul on or off in this process (for benchmarks and tests).

    Both settings give bit-identical shares; off runs CrypTen's original code paths.
    """
    global _ring_matmul_enabled
    _ring_matmul_enabled = bool(enabled)
    log.debug("ring matmul %s", "enabled" if _ring_matmul_enabled else "disabled")


def ring_matmul_enabled() -> bool:
    """Whether CrypTen's int64 matmuls currently go through :func:`ring_matmul` in this process."""
    return _ring_matmul_enabled


class _RingMatmulTorch(types.ModuleType):
    """Stands in for ``torch`` inside two CrypTen modules: ``matmul`` is :func:`ring_matmul`.

    Every other attribute is ``torch``'s own, looked up on each access, so no other op changes.
    ``ring_matmul`` itself falls back to ``torch.matmul`` unless both operands are int64.
    """

    def __init__(self) -> None:
        super().__init__("secfwt_ring_torch", "torch with an exact float64-GEMM int64 matmul")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def matmul(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        if _ring_matmul_enabled and tensors and not args and not kwargs:
            return ring_matmul(a, b)
        return torch.matmul(a, b, *args, **kwargs)


def _matmul_size(size0: torch.Size, size1: torch.Size) -> torch.Size:
    """Output size of ``matmul`` for operands of these sizes, computed on meta tensors (no data)."""
    return torch.matmul(torch.empty(size0, device="meta"), torch.empty(size1, device="meta")).size()


def _shape_only_triple(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``TrustedThirdParty.generate_additive_triple``: on ranks other than 0, a matmul
    triple sizes its share of ``c`` from the shapes instead of computing ``a @ b``.

    CrypTen's own code (kept for every other case) multiplies the party's random shares only to
    read ``.size()`` of the result. The random draws and their order are unchanged.
    """

    @functools.wraps(original)
    def generate_additive_triple(
        self: Any, size0: Any, size1: Any, op: str, device: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        plain_matmul = op == "matmul" and not args and not kwargs
        rank = crypten.communicator.get().get_rank()
        if not (_ring_matmul_enabled and plain_matmul) or rank == 0:
            return original(self, size0, size1, op, device, *args, **kwargs)
        generator = _ttp_provider.TTPClient.get().get_generator(device=device)
        a = generate_random_ring_element(size0, generator=generator, device=device)
        b = generate_random_ring_element(size1, generator=generator, device=device)
        size2 = _matmul_size(size0, size1)
        c = generate_random_ring_element(size2, generator=generator, device=device)
        from_shares = _ttp_provider.ArithmeticSharedTensor.from_shares
        return from_shares(a, precision=0), from_shares(b, precision=0), from_shares(c, precision=0)

    generate_additive_triple._secfwt_ring_matmul = True  # type: ignore[attr-defined]
    return generate_additive_triple


def _install_ring_matmul() -> None:
    """Route CrypTen's int64 matmuls through :func:`ring_matmul` (adaptation 4). Idempotent.

    Patches, and nothing else:

    * ``crypten.mpc.primitives.beaver.torch``: the Beaver protocol calls
      ``getattr(torch, op)(...)`` three times per private x private product (``epsilon @ b``,
      ``a @ delta``, ``epsilon @ delta``); a :class:`_RingMatmulTorch` there makes ``op ==
      "matmul"`` exact float64 GEMMs.
    * ``crypten.mpc.provider.ttp_provider.torch``: the same stand-in, so the dealer's
      ``TTPServer.additive`` computes ``c = a @ b`` with :func:`ring_matmul`.
    * ``TrustedThirdParty.generate_additive_triple``: on ranks other than 0 a matmul triple
      is sized by :func:`_matmul_size` instead of a full int64 product (CrypTen's own TODO).

    The disabled state (:func:`set_ring_matmul`) runs CrypTen's original code in all three.
    """
    for module in (_beaver, _ttp_provider):
        if not isinstance(module.torch, _RingMatmulTorch):
            module.torch = _RingMatmulTorch()  # type: ignore[attr-defined]
    cls = _ttp_provider.TrustedThirdParty
    if not getattr(cls.generate_additive_triple, "_secfwt_ring_matmul", False):
        wrapped = _shape_only_triple(cls.generate_additive_triple)
        cls.generate_additive_triple = wrapped  # type: ignore[method-assign]


_install_ring_matmul()
# ---------------------------------------------------------------------------------------------
# End of adaptation 4.
# ---------------------------------------------------------------------------------------------


class Provider(enum.Enum):
    """Source of Beaver triples and other correlated randomness."""

    #: A dealer process (CrypTen's trusted third party) that holds no input.
    TTP = "TTP"
    #: Rank 0 generates all triples and learns every other party's input: development only.
    TFP = "TFP"


# Adaptation 5: exact fixed-point decoding (see module docstring).
def _fixed_decode(self: Any, tensor: Any) -> Any:
    if tensor is None:
        return None
    if self._scale > 1:
        whole = tensor.div(self._scale, rounding_mode="floor")  # exact floor for negatives too
        frac = tensor - whole * self._scale  # in [0, scale)
        return (whole.float() + frac.float() / self._scale).data
    return tensor.data


def _install_exact_decode() -> None:
    from crypten.encoder import FixedPointEncoder

    FixedPointEncoder.decode = _fixed_decode  # type: ignore[method-assign]


_install_exact_decode()
# End of adaptation 5.


# Adaptation 6: attribute access without a config lookup (see module docstring).
def _install_fast_getattribute() -> None:
    from crypten.cryptensor import CrypTensor

    wrapped = CrypTensor.__dict__["__getattribute__"]
    inner = getattr(wrapped, "__wrapped__", None)
    if inner is not None:
        CrypTensor.__getattribute__ = inner  # type: ignore[method-assign]


_install_fast_getattribute()
# End of adaptation 6.


def configure(*, provider: Provider, comm_stats: bool = True) -> None:
    """Set CrypTen's global options. The only writer of ``crypten.cfg`` in secfwt."""
    crypten.cfg.mpc.provider = provider.value
    # Rounds and bytes are only counted in verbose mode (NOTES.md).
    crypten.cfg.communicator.verbose = comm_stats


def load_closure(f: Any) -> Any:
    """``torch.load`` for files written by ``crypten.save`` on this party (adaptation 2)."""
    return torch.load(f, weights_only=False)


__all__ = ["Provider", "configure", "crypten", "load_closure", "ring_matmul_enabled", "set_ring_matmul"]


def init_party(*, rank: int, world_size: int, rendezvous: str, provider: Provider, comm_stats: bool = True) -> None:
    """Join the MPC session of this process: set CrypTen's config, then ``crypten.init``.

    CrypTen reads its rendezvous from environment variables; they are set here, in the party's
    own process, and nowhere else.
    """
    import os

    os.environ.update(
        {
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "RENDEZVOUS": rendezvous,
            "DISTRIBUTED_BACKEND": "gloo",
        }
    )
    configure(provider=provider, comm_stats=comm_stats)
    if provider is Provider.TFP:
        log.warning(
            "INSECURE: the TFP provider lets the model owner (rank 0) generate every Beaver triple "
            "and so learn the data owner's inputs. Development only."
        )
    crypten.init()


def run_dealer() -> None:
    """Serve correlated randomness until rank 0 shuts the session down (the dealer's loop)."""
    import warnings

    with warnings.catch_warnings():
        # TTPServer calls crypten.init() again on an initialised dealer; harmless, and noisy.
        warnings.filterwarnings("ignore", message="CrypTen is already initialized", category=RuntimeWarning)
        crypten.mpc.provider.TTPServer()


def communication_stats() -> dict[str, int]:
    stats = crypten.communicator.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}


def reset_communication_stats() -> None:
    crypten.communicator.get().reset_communication_stats()


def shutdown_party() -> None:
    crypten.uninit()
