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
7. CrypTen's communicator is torch.distributed/gloo, plaintext on the wire in this torch build
   (no gloo TLS; seeds and triple shares cross it in the clear, NOTES.md). The class is
   hard-wired: ``crypten.communicator``'s ``get``/``_init``/``uninit``/``is_initialized``
   look up the module-level name ``DistributedCommunicator``, and the TTP provider calls
   ``torch.distributed`` directly (``isend``/``irecv``/``barrier`` when it hands out the
   dealer's PRG seeds). :func:`init_party` with ``transport=Transport.TLS`` binds that name to
   :class:`secfwt.mpc.transport.communicator.MeshCommunicator` (mutually authenticated TLS
   gRPC streams) and :func:`_install_ttp_transport` replaces ``ttp_provider.dist`` with a
   stand-in that sends those three calls over the mesh when their group is a mesh group and
   to ``torch.distributed`` otherwise, so gloo runs execute exactly CrypTen's code.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import sys
import types
from typing import Any

import torch

from secfwt.errors import ConfigError

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


# ---------------------------------------------------------------------------------------------
# Adaptation 7: selectable MPC transport; the TTP's direct torch.distributed calls follow it.
# ---------------------------------------------------------------------------------------------
from secfwt.mpc.transport import TlsSettings, Transport  # noqa: E402

_GLOO_COMMUNICATOR = crypten_comm.DistributedCommunicator
_active_transport = Transport.GLOO


class _TransportDist(types.ModuleType):
    """Stands in for ``torch.distributed`` inside ``crypten.mpc.provider.ttp_provider``.

    ``isend``/``irecv``/``barrier`` on a mesh group (TLS transport) go through the active
    :class:`MeshCommunicator` without CrypTen's accounting (gloo's direct calls are not
    counted either); every other call and every gloo group reach ``torch.distributed``.
    """

    def __init__(self) -> None:
        super().__init__("secfwt_ttp_dist", "torch.distributed, or the TLS mesh for mesh groups")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.distributed, name)

    @staticmethod
    def _mesh(group: Any) -> Any:
        if _active_transport is Transport.TLS:
            from secfwt.mpc.transport.communicator import MeshGroup

            if isinstance(group, MeshGroup):
                return crypten.communicator.get()
        return None

    def isend(self, tensor: Any, dst: int, group: Any = None, tag: int = 0) -> Any:
        mesh = self._mesh(group)
        if mesh is None:
            return torch.distributed.isend(tensor, dst, group=group, tag=tag)
        return mesh.p2p_isend(tensor, dst, group)

    def irecv(self, tensor: Any, src: int | None = None, group: Any = None, tag: int = 0) -> Any:
        mesh = self._mesh(group)
        if mesh is None:
            return torch.distributed.irecv(tensor, src=src, group=group, tag=tag)
        return mesh.p2p_irecv(tensor, src, group)

    def barrier(self, group: Any = None, **kwargs: Any) -> Any:
        mesh = self._mesh(group)
        if mesh is None:
            return torch.distributed.barrier(group=group, **kwargs)
        return mesh.group_barrier(group)


def _install_ttp_transport() -> None:
    if not isinstance(_ttp_provider.dist, _TransportDist):
        _ttp_provider.dist = _TransportDist()  # type: ignore[attr-defined]


def _select_transport(transport: Transport, *, rank: int, world_size: int, tls: TlsSettings | None) -> None:
    """Make the next ``crypten.init()`` build the communicator of ``transport`` (adaptation 7)."""
    global _active_transport
    if transport is Transport.TLS:
        if tls is None:
            raise ConfigError("transport 'tls' needs TLS settings (certificates, peers); see secfwt.mpc.transport.tls_settings")
        from secfwt.mpc.transport.communicator import MeshCommunicator

        MeshCommunicator.prepare(rank=rank, world_size=world_size, settings=tls)
        crypten_comm.DistributedCommunicator = MeshCommunicator  # type: ignore[misc]
    else:
        crypten_comm.DistributedCommunicator = _GLOO_COMMUNICATOR  # type: ignore[misc]
    _active_transport = transport


def active_transport() -> Transport:
    """The transport this process's CrypTen session uses (or will use at ``crypten.init``)."""
    return _active_transport


_install_ttp_transport()
# ---------------------------------------------------------------------------------------------
# End of adaptation 7.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Fixed seeds for reproducibility tests only (not an adaptation: CrypTen's own manual_seed needs
# its debug mode). Production never sets them: seeds then come from os.urandom (CrypTen), secrets
# (joint seed) and torch's default generator, which torch seeds from the OS (the dealer's seeds).
# ---------------------------------------------------------------------------------------------
_insecure_fixed_seed: int | None = None
_fixed_draws: dict[str, int] = {}


def _derived_seed(label: str) -> int:
    digest = hashlib.sha256(f"secfwt-test-seed/{_insecure_fixed_seed}/{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def insecure_fixed_bytes(label: str, n: int = 32) -> bytes | None:
    """Test-only deterministic stand-in for ``secrets.token_bytes(n)``; None in production.

    Returns None unless this party was started with ``insecure_fixed_seed``; each call with the
    same label gives the next value of a deterministic stream, so repeated draws still differ.
    """
    if _insecure_fixed_seed is None:
        return None
    k = _fixed_draws.get(label, 0)
    _fixed_draws[label] = k + 1
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"secfwt-test-bytes/{_insecure_fixed_seed}/{label}/{k}/{i}".encode()).digest()
        i += 1
    return out[:n]


def _fix_seeds(rank: int, world_size: int) -> None:
    """Replace the random PRG seeds of this party by ones derived from the test seed.

    Computing parties: CrypTen's pairwise prev/next, local and global generators (consistent
    across parties exactly as ``crypten._setup_prng`` makes them). Dealer: torch's default
    generator, from which ``TTPServer`` draws the per-party seeds it then sends.
    """
    if rank >= world_size:
        torch.manual_seed(_derived_seed("dealer") & (2**63 - 1))
        return
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    for device in crypten.generators["prev"]:
        crypten.generators["prev"][device].manual_seed(_derived_seed(f"pair/{prv}/{rank}"))
        crypten.generators["next"][device].manual_seed(_derived_seed(f"pair/{rank}/{nxt}"))
        crypten.generators["local"][device].manual_seed(_derived_seed(f"local/{rank}"))
        crypten.generators["global"][device].manual_seed(_derived_seed("global"))


def configure(*, provider: Provider, comm_stats: bool = True) -> None:
    """Set CrypTen's global options. The only writer of ``crypten.cfg`` in secfwt."""
    crypten.cfg.mpc.provider = provider.value
    # Rounds and bytes are only counted in verbose mode (NOTES.md).
    crypten.cfg.communicator.verbose = comm_stats


def load_closure(f: Any) -> Any:
    """``torch.load`` for files written by ``crypten.save`` on this party (adaptation 2)."""
    return torch.load(f, weights_only=False)


__all__ = [
    "Provider",
    "Transport",
    "active_transport",
    "configure",
    "crypten",
    "insecure_fixed_bytes",
    "load_closure",
    "ring_matmul_enabled",
    "set_ring_matmul",
]


def init_party(
    *,
    rank: int,
    world_size: int,
    provider: Provider,
    rendezvous: str = "",
    comm_stats: bool = True,
    transport: Transport = Transport.GLOO,
    tls: TlsSettings | None = None,
    insecure_fixed_seed: int | None = None,
) -> None:
    """Join the MPC session of this process: set CrypTen's config, the transport, then ``crypten.init``.

    ``transport``: :attr:`Transport.GLOO` (``rendezvous`` is its torch.distributed init URL,
    e.g. ``file:///tmp/x``; plaintext, trusted networks only) or :attr:`Transport.TLS`
    (``tls`` from :func:`secfwt.mpc.transport.tls_settings`, or the launcher's local bundle).
    CrypTen reads gloo's rendezvous from environment variables; they are set here, in the
    party's own process, and nowhere else.

    ``insecure_fixed_seed`` is for reproducibility tests only: it replaces every random seed
    of the MPC session (CrypTen's PRGs, the dealer's, secfwt's joint seed) by values derived
    from it, so anyone who knows it can unmask the shares. Never set it on real data.
    """
    import os

    global _insecure_fixed_seed
    if transport is Transport.GLOO:
        if not rendezvous:
            raise ConfigError("transport 'gloo' needs a rendezvous URL (e.g. file:///tmp/secfwt-rdv)")
        os.environ.update({"WORLD_SIZE": str(world_size), "RANK": str(rank), "RENDEZVOUS": rendezvous, "DISTRIBUTED_BACKEND": "gloo"})
        if rank == 0 and not rendezvous.startswith("file://"):
            # A file rendezvous means one machine; anything else may cross a network.
            log.warning("MPC transport gloo: shares and seeds cross the network in plaintext; use transport 'tls' between hosts")
    _select_transport(transport, rank=rank, world_size=world_size, tls=tls)
    configure(provider=provider, comm_stats=comm_stats)
    if provider is Provider.TFP:
        log.warning(
            "INSECURE: the TFP provider lets the model owner (rank 0) generate every Beaver triple "
            "and so learn the data owner's inputs. Development only."
        )
    _insecure_fixed_seed = insecure_fixed_seed
    _fixed_draws.clear()
    if insecure_fixed_seed is not None and rank >= world_size:
        _fix_seeds(rank, world_size)  # before TTPServer draws the seeds it hands out
    crypten.init()
    if insecure_fixed_seed is not None:
        log.warning("INSECURE: fixed test seeds (insecure_fixed_seed); every share is predictable. Tests only.")
        if rank < world_size:
            _fix_seeds(rank, world_size)


def run_dealer() -> None:
    """Serve correlated randomness until rank 0 shuts the session down (the dealer's loop)."""
    import warnings

    with warnings.catch_warnings():
        # TTPServer calls crypten.init() again on an initialised dealer; harmless, and noisy.
        warnings.filterwarnings("ignore", message="CrypTen is already initialized", category=RuntimeWarning)
        crypten.mpc.provider.TTPServer()
    if _active_transport is Transport.TLS:
        # Close the dealer's streams in order, so the computing parties' shutdown need not wait
        # for them to time out (gloo needs nothing: the process just exits).
        crypten.uninit()


def communication_stats() -> dict[str, int]:
    stats = crypten.communicator.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}


def reset_communication_stats() -> None:
    crypten.communicator.get().reset_communication_stats()


def shutdown_party() -> None:
    crypten.uninit()
