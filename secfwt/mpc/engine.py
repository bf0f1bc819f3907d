"""secfwt's engine on CrypTen: one idempotent :func:`install` when a party process starts.

What it installs, and why:

* Ring matmul: CrypTen multiplies int64 shares with ``torch.matmul``. The Beaver protocol's and
  the TTP dealer's int64 matmuls go through :func:`secfwt.mpc.ring.ring_matmul` instead, which
  runs each shape class either as torch's int64 matmul or as exact float64 limb GEMMs,
  whichever :mod:`secfwt.mpc.ring_tuning` measured faster on this machine (bit-identical).
* Beaver products: ``beaver.mul``/``.matmul``/``.AND`` become :mod:`secfwt.mpc.beaver`'s (two
  local products per party, the dealer working alongside; same messages, draws and openings).
* Dealer functions: the TTP dealer (``TTPServer``) learns secfwt's correlations (one-sided
  matmuls of :mod:`secfwt.mpc.owned`, bit triples and mask products of
  :mod:`secfwt.mpc.beaver`, the test-only reseed of :mod:`secfwt.mpc.seeding`), requested by
  rank 0 in CrypTen's own message format.
* Attribute access: ``CrypTensor.__getattribute__`` is wrapped by CrypTen's validation hook,
  which reads the omegaconf config on every attribute access; secfwt never enables validation
  mode, so the unwrapped method comes back.
* :mod:`secfwt.mpc.collectives` (two-party collectives), :mod:`secfwt.mpc.keystream` (AES-CTR
  ring elements) and the TTP provider's transport stand-in
  (:mod:`secfwt.mpc.transport.selection`).
* CrypTen's exact fixed-point decode (:func:`secfwt.crypten_compat.install_exact_decode`).
* glibc's allocator kept from returning share-sized blocks to the kernel between ops
  (:mod:`secfwt.mpc.allocator`; not in the vanilla baseline, which runs as CrypTen ships).

``SECFWT_RING_MATMUL`` in the environment of every process of a session (the dealer is started
by CrypTen's loop, so the environment is the only switch that reaches it), read once when
:func:`install` runs (every process must agree): ``0`` gives the vanilla CrypTen baseline: int64
matmuls and Beaver products stay CrypTen's (switchable at run time with :func:`set_ring_matmul`),
and attribute access, collectives and keystream draws are not installed; ``1`` (the default)
measures each product class (:mod:`secfwt.mpc.ring_tuning`); ``torch`` or ``limbs`` forces one
way for every class, with everything else installed (the same bits either way); ``device``
forces the limbs on the job's ``run.device`` (:mod:`secfwt.mpc.device`).
``SECFWT_RING_TUNING_CACHE=FILE`` keeps the measured choices on disk for later processes.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch

from secfwt import crypten_compat
from secfwt.crypten_compat import crypten
from secfwt.mpc import allocator, beaver, collectives, keystream, owned, ring_tuning, seeding
from secfwt.mpc.ring import ring_matmul
from secfwt.mpc.transport import selection

log = logging.getLogger(__name__)

_ring_matmul_enabled = os.environ.get(ring_tuning.RING_MATMUL_ENV, "1").strip() != "0"
_installed = False


def set_ring_matmul(enabled: bool) -> None:
    """Route CrypTen's int64 matmuls through :func:`ring_matmul` (measured choice between
    torch's int64 matmul and the float64 limbs) and use secfwt's Beaver products, or not, in
    this process. Both settings give bit-identical shares; off runs CrypTen's original code.
    """
    global _ring_matmul_enabled
    _ring_matmul_enabled = bool(enabled)
    log.debug("ring matmul %s", "enabled" if _ring_matmul_enabled else "disabled")


def ring_matmul_enabled() -> bool:
    """Whether CrypTen's int64 matmuls currently go through :func:`ring_matmul` here."""
    return _ring_matmul_enabled


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed


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


def _use_secfwt_beaver(x: Any) -> bool:
    """CrypTen's own protocol when switched off, for active security (which secfwt never
    enables) and for non-CPU tensors."""
    if not _ring_matmul_enabled or crypten.cfg.mpc.active_security:
        return False
    return x.device.type == "cpu"


def _beaver_product(op: str, local: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """CrypTen's ``beaver.<op>`` replaced by :func:`secfwt.mpc.beaver.product`."""
    from crypten.mpc.primitives import beaver as crypten_beaver

    original = getattr(crypten_beaver, op)

    @functools.wraps(original)
    def protocol(x: Any, y: Any) -> Any:
        if not _use_secfwt_beaver(x):
            return original(x, y)
        return beaver.product(x, y, op=op, local=local)

    protocol._secfwt_beaver = True  # type: ignore[attr-defined]
    return protocol


def _beaver_and(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """CrypTen's ``beaver.AND`` replaced by :func:`secfwt.mpc.beaver.binary_and`."""

    @functools.wraps(original)
    def protocol(x: Any, y: Any) -> Any:
        if not _use_secfwt_beaver(x):
            return original(x, y)
        return beaver.binary_and(x, y)

    protocol._secfwt_beaver = True  # type: ignore[attr-defined]
    return protocol


def _install_ring_matmul() -> None:
    """Patch ``torch`` in CrypTen's beaver and ttp_provider modules (the Beaver protocol's
    ``getattr(torch, op)``, the dealer's ``c = a @ b``) and ``beaver.mul``/``matmul``/``AND``."""
    from crypten.mpc.primitives import beaver as crypten_beaver
    from crypten.mpc.provider import ttp_provider

    for module in (crypten_beaver, ttp_provider):
        if not isinstance(module.torch, _RingMatmulTorch):
            module.torch = _RingMatmulTorch()  # type: ignore[attr-defined]
    for op, local in (("mul", torch.mul), ("matmul", _RingMatmulTorch.matmul)):
        if not getattr(getattr(crypten_beaver, op), "_secfwt_beaver", False):
            setattr(crypten_beaver, op, _beaver_product(op, local))
    if not getattr(crypten_beaver.AND, "_secfwt_beaver", False):
        crypten_beaver.AND = _beaver_and(crypten_beaver.AND)


def _secfwt_one_sided_matmul(self: Any, size_x: Any, size_w: Any, owner: int) -> Any:
    generators = self._get_generators(device=self.device)
    return owned.dealer_one_sided_matmul(generators, size_x, size_w, owner)


def _secfwt_fixed_one_sided_matmul(
    self: Any, key: Any, first: bool, size_x: Any, size_w: Any, owner: int
) -> Any:
    generators = self._get_generators(device=self.device)
    return owned.dealer_fixed_one_sided_matmul(generators, tuple(key), first, size_x, size_w, owner)


def _secfwt_bit_triple(self: Any, size: Any) -> Any:
    return beaver.dealer_bit_triple(self._get_generators(device=self.device), size)


def _secfwt_mask_products(
    self: Any, size: Any, masks: int, pairs: Any, keep_first: bool = False
) -> Any:
    generators = self._get_generators(device=self.device)
    return beaver.dealer_mask_products(generators, size, masks, tuple(pairs), keep_first)


def _secfwt_mask_select(self: Any, size: Any) -> Any:
    return beaver.dealer_mask_select(self._get_generators(device=self.device), size)


def _secfwt_owned_drain(self: Any) -> Any:
    return owned.dealer_drain()


def _secfwt_insecure_reseed(self: Any, label: str) -> Any:
    return seeding.dealer_reseed(self, label)


#: ``TTPServer`` methods that rank 0 requests by name.
_DEALER_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "secfwt_one_sided_matmul": _secfwt_one_sided_matmul,
    "secfwt_fixed_one_sided_matmul": _secfwt_fixed_one_sided_matmul,
    "secfwt_bit_triple": _secfwt_bit_triple,
    "secfwt_mask_products": _secfwt_mask_products,
    "secfwt_mask_select": _secfwt_mask_select,
    "secfwt_owned_drain": _secfwt_owned_drain,
    "secfwt_insecure_reseed": _secfwt_insecure_reseed,
}


def _install_dealer_functions() -> None:
    from crypten.mpc.provider.ttp_provider import TTPServer

    for name, fn in _DEALER_FUNCTIONS.items():
        setattr(TTPServer, name, fn)


def _install_fast_getattribute() -> None:
    from crypten.cryptensor import CrypTensor

    wrapped = CrypTensor.__dict__["__getattribute__"]
    inner = getattr(wrapped, "__wrapped__", None)
    if inner is not None:
        CrypTensor.__getattribute__ = inner  # type: ignore[method-assign]


def install() -> None:
    """Install secfwt's engine into CrypTen in this process. Idempotent.

    Called when a party process starts (:func:`secfwt.mpc.session.init_party`, the dealer's
    included); importing secfwt changes nothing in CrypTen.
    """
    global _installed, _ring_matmul_enabled
    enabled, forced, cache = ring_tuning.settings_from_env(os.environ)
    # read here, not only at import: a party forked from the launcher's fork server imported
    # this module in the server, before the launcher set its environment (the vanilla
    # baseline's SECFWT_RING_MATMUL=0 then ran with secfwt's products)
    _ring_matmul_enabled = enabled
    ring_tuning.configure(forced=forced, cache=cache)
    crypten_compat.install_exact_decode()
    _install_ring_matmul()
    _install_dealer_functions()
    selection.install_ttp_transport()
    if enabled:
        allocator.tune()
        _install_fast_getattribute()
        collectives.install()
        keystream.install()
    _installed = True
