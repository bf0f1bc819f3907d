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
   GEMMs). :func:`set_ring_matmul` (or ``SECFWT_RING_MATMUL=0`` in the environment of
   every party, the dealer included) switches back to CrypTen's own code for benchmarks;
   the same switch turns adaptation 8 on and off.
5. ``FixedPointEncoder.decode`` floors negative values by ``scale - 1`` instead of ``scale``,
   so a revealed negative x comes back as x - 1 with probability about |x| / 2^16 (found in
   the ring-matmul benchmark: 80 of 2.85 M outputs off by exactly 1.0). :func:`_fixed_decode`
   replaces it with an exact floor division by the scale.
6. ``CrypTensor.__getattribute__`` is wrapped by ``crypten.debug.register_validation``, which
   reads ``cfg.debug.validation_mode`` from the omegaconf config on every attribute access of
   every encrypted tensor (0.17 ms each under load; about 40% of LayerNorm's time).
   secfwt never enables validation mode, so :func:`_install_fast_getattribute` restores the
   unwrapped method; not with ``SECFWT_RING_MATMUL=0`` (adaptation 4's switch, read at
   start-up), under which the vanilla baseline runs CrypTen as it ships.
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
8. CrypTen's Beaver protocol computes three local products on rank 0 (two elsewhere) and, under
   TTP, both parties idle while the dealer computes ``c = a b``: for a BERT-base layer's
   matmuls that is a third more ring-matmul work on rank 0 and the dealer's matmuls in series
   with the parties'; every AND gate of a comparison's adder waits for a dealer round trip
   before its own opening. ``beaver.mul`` and ``beaver.matmul`` are replaced by
   :func:`secfwt.mpc.beaver.product` (two local products per party, same openings; rank 0
   reads the dealer's reply only after its own products, so the dealer works alongside; ranks
   other than 0 size ``c`` from shapes, CrypTen's TODO), ``beaver.AND`` by
   :func:`secfwt.mpc.beaver.binary_and` (the same for XOR shares). Same messages, random draws
   and openings as CrypTen's; under the switch of adaptation 4.
9. The TTP dealer (``TTPServer``) only knows CrypTen's correlations. :func:`_install_dealer_functions`
   adds ``TTPServer.secfwt_one_sided_matmul`` (:func:`secfwt.mpc.owned.dealer_one_sided_matmul`)
   and ``secfwt_fixed_one_sided_matmul`` (the same with a mask kept for the session), the
   triples of the product with a matrix one party holds in the clear
   (:mod:`secfwt.mpc.owned`), and ``secfwt_bit_triple`` (:func:`secfwt.mpc.beaver.dealer_bit_triple`),
   a random bit with a product ``r a`` for the one-opening bit select of the comparisons, and
   ``secfwt_mask_products`` (:func:`secfwt.mpc.beaver.dealer_mask_products`), products of masks
   so that each factor of a polynomial's products is opened once; rank 0
   requests them with CrypTen's own message format. Nothing CrypTen calls changes.
10. gloo runs CrypTen's collectives as its general algorithms: on this machine a two-party
   ``all_reduce`` of 128 int64 took 1.7 ms where a send/recv ping-pong took 0.36 ms, and every
   opening of a Beaver product, comparison round and reveal is one; the dealer's replies are a
   ``broadcast`` in a two-member group. :func:`_install_two_party_collectives` runs
   ``DistributedCommunicator.all_reduce`` (SUM or BXOR) and ``broadcast`` in a group of two as
   one direct exchange (each side sends its tensor and combines the other's; int64 SUM wraps
   mod 2^64 as gloo's does), the same bytes and results bit for bit; any other group or op
   runs CrypTen's code. Read once from ``SECFWT_RING_MATMUL`` at start-up (all processes of a
   session must agree, and the dealer runs no secfwt code after it), so ``=0`` gives CrypTen's
   own collectives too.
11. CrypTen draws every random ring element (triples, masks, zero sharings) with
   ``torch.randint`` from a ``torch.Generator``: Mersenne Twister, which is not a cryptographic
   generator (its state follows from 624 outputs), and whose range stops one short of the
   ring's top value (CrypTen's own TODO). :func:`_install_keystream_ring_elements` makes
   ``generate_random_ring_element`` (full 64-bit ring, CPU) read an AES-128-CTR keystream
   (``cryptography``; key = SHA-256 of the generator's seed) per generator instead: uniform over
   the whole ring, cryptographically pseudorandom, and about twice as fast here (393k elements:
   1.0 ms against 2.2 ms). Both holders of a seed draw the same stream, as with torch; a
   ``manual_seed`` to a new value restarts it. Other ring sizes and bits keep torch's
   generator. Under the switch of adaptation 10 (read at start-up, every process must agree).
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
# Adaptations 4, 8, 9, 10 and 11: int64 ring matmul through float64 GEMMs, secfwt's Beaver
# protocols, the dealer's extra correlations, two-party collectives, keystream ring elements.
# ----------------------------------------------------------------------------------------------
#: ``SECFWT_RING_MATMUL=0`` starts every process with the patch off. The dealer runs no secfwt
#: code after start-up, so the environment is the only switch that reaches it.
_RING_MATMUL_ENV = "SECFWT_RING_MATMUL"

import functools
import os
from collections.abc import Callable

from crypten.mpc.primitives import beaver as _beaver
from crypten.mpc.provider import ttp_provider as _ttp_provider

from secfwt.mpc import beaver as _secfwt_beaver
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


def _beaver_product(op: str, local: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """CrypTen's ``beaver.<op>`` replaced by :func:`secfwt.mpc.beaver.product` (adaptation 8)
    while the switch of :func:`set_ring_matmul` is on; CrypTen's own protocol otherwise, and
    always for active security (which secfwt never enables) or non-CPU tensors."""
    original = getattr(_beaver, op)

    @functools.wraps(original)
    def protocol(x: Any, y: Any) -> Any:
        if not _ring_matmul_enabled or crypten.cfg.mpc.active_security or x.device.type != "cpu":
            return original(x, y)
        return _secfwt_beaver.product(x, y, op=op, local=local)

    protocol._secfwt_beaver = True  # type: ignore[attr-defined]
    return protocol


def _beaver_and(original: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """CrypTen's ``beaver.AND`` replaced by :func:`secfwt.mpc.beaver.binary_and` (adaptation
    8), under the same conditions as :func:`_beaver_product`."""

    @functools.wraps(original)
    def protocol(x: Any, y: Any) -> Any:
        if not _ring_matmul_enabled or crypten.cfg.mpc.active_security or x.device.type != "cpu":
            return original(x, y)
        return _secfwt_beaver.binary_and(x, y)

    protocol._secfwt_beaver = True  # type: ignore[attr-defined]
    return protocol


def _install_ring_matmul() -> None:
    """Route CrypTen's int64 matmuls through :func:`ring_matmul` (adaptation 4). Idempotent.

    Patches, and nothing else:

    * ``crypten.mpc.primitives.beaver.torch``: the Beaver protocol calls
      ``getattr(torch, op)(...)`` three times per private x private product (``epsilon @ b``,
      ``a @ delta``, ``epsilon @ delta``); a :class:`_RingMatmulTorch` there makes ``op ==
      "matmul"`` exact float64 GEMMs.
    * ``crypten.mpc.provider.ttp_provider.torch``: the same stand-in, so the dealer's
      ``TTPServer.additive`` computes ``c = a @ b`` with :func:`ring_matmul`.
    * ``crypten.mpc.primitives.beaver.mul``, ``.matmul`` and ``.AND``: :func:`_beaver_product`
      and :func:`_beaver_and` (adaptation 8), whose matmuls are :func:`ring_matmul` too.

    The disabled state (:func:`set_ring_matmul`) runs CrypTen's original code in all of them.
    """
    for module in (_beaver, _ttp_provider):
        if not isinstance(module.torch, _RingMatmulTorch):
            module.torch = _RingMatmulTorch()  # type: ignore[attr-defined]
    for op, local in (("mul", torch.mul), ("matmul", _RingMatmulTorch.matmul)):
        if not getattr(getattr(_beaver, op), "_secfwt_beaver", False):
            setattr(_beaver, op, _beaver_product(op, local))
    if not getattr(_beaver.AND, "_secfwt_beaver", False):
        _beaver.AND = _beaver_and(_beaver.AND)


_install_ring_matmul()


def _install_dealer_functions() -> None:
    """Adaptation 9: secfwt's own correlations, served by CrypTen's dealer loop. Idempotent."""

    def secfwt_one_sided_matmul(self: Any, size_x: Any, size_w: Any, owner: int) -> Any:
        from secfwt.mpc.owned import dealer_one_sided_matmul

        return dealer_one_sided_matmul(self._get_generators(device=self.device), size_x, size_w, owner)

    def secfwt_fixed_one_sided_matmul(self: Any, key: Any, first: bool, size_x: Any, size_w: Any, owner: int) -> Any:
        from secfwt.mpc.owned import dealer_fixed_one_sided_matmul

        return dealer_fixed_one_sided_matmul(self._get_generators(device=self.device), tuple(key), first, size_x, size_w, owner)

    def secfwt_bit_triple(self: Any, size: Any) -> Any:
        from secfwt.mpc.beaver import dealer_bit_triple

        return dealer_bit_triple(self._get_generators(device=self.device), size)

    def secfwt_mask_products(self: Any, size: Any, masks: int, pairs: Any) -> Any:
        from secfwt.mpc.beaver import dealer_mask_products

        return dealer_mask_products(self._get_generators(device=self.device), size, masks, tuple(pairs))

    def secfwt_owned_drain(self: Any) -> Any:
        from secfwt.mpc.owned import dealer_drain

        return dealer_drain()

    _ttp_provider.TTPServer.secfwt_one_sided_matmul = secfwt_one_sided_matmul  # type: ignore[attr-defined]
    _ttp_provider.TTPServer.secfwt_owned_drain = secfwt_owned_drain  # type: ignore[attr-defined]
    _ttp_provider.TTPServer.secfwt_bit_triple = secfwt_bit_triple  # type: ignore[attr-defined]
    _ttp_provider.TTPServer.secfwt_mask_products = secfwt_mask_products  # type: ignore[attr-defined]
    _ttp_provider.TTPServer.secfwt_fixed_one_sided_matmul = secfwt_fixed_one_sided_matmul  # type: ignore[attr-defined]


_install_dealer_functions()


def _install_two_party_collectives() -> None:
    """Adaptation 10: collectives of two parties as one direct exchange over gloo. Idempotent."""
    from crypten.communicator.communicator import _logging
    from torch.distributed import ReduceOp

    cls = crypten_comm.DistributedCommunicator
    if getattr(cls.all_reduce, "_secfwt_two_party", False):
        return
    dist = torch.distributed
    crypten_all_reduce = cls.all_reduce.__wrapped__  # CrypTen's, without its accounting wrapper
    crypten_broadcast = cls.broadcast.__wrapped__
    combine = {ReduceOp.SUM: torch.add, ReduceOp.BXOR: torch.bitwise_xor}

    def peer_in(comm: Any, group: Any) -> int | None:
        ranks = dist.get_process_group_ranks(group)
        return next(r for r in ranks if r != comm.rank) if len(ranks) == 2 and comm.rank in ranks else None

    def all_reduce(self: Any, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        peer = peer_in(self, self.main_group)
        if peer is None or op not in combine:
            return crypten_all_reduce(self, input, op=op, batched=batched)
        mine = [t.data.contiguous() for t in (input if batched else [input])]
        theirs = [torch.empty_like(t) for t in mine]
        sends = [dist.isend(t, peer, group=self.main_group) for t in mine]
        for buf in theirs:
            dist.irecv(buf, peer, group=self.main_group).wait()
        for req in sends:
            req.wait()
        out = [combine[op](m, t) for m, t in zip(mine, theirs)]  # a new tensor, as CrypTen's clone
        return out if batched else out[0]

    def broadcast(self: Any, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        group = self.main_group if group is None else group
        peer = peer_in(self, group)
        if peer is None:
            return crypten_broadcast(self, input, src, group=group, batched=batched)
        tensors = input if batched else [input]
        if self.rank == src:
            for req in [dist.isend(t.data.contiguous(), peer, group=group) for t in tensors]:
                req.wait()
        else:
            for t in tensors:
                buf = t.data if t.data.is_contiguous() else torch.empty_like(t.data, memory_format=torch.contiguous_format)
                dist.irecv(buf, src, group=group).wait()
                if buf is not t.data:
                    t.data.copy_(buf)
        return input

    for fn in (all_reduce, broadcast):
        wrapped = _logging(fn)
        wrapped._secfwt_two_party = True  # type: ignore[attr-defined]
        setattr(cls, fn.__name__, wrapped)


def _install_keystream_ring_elements() -> None:
    """Adaptation 11: full-ring random elements from AES-128-CTR keystreams. Idempotent."""
    import math

    import crypten.common.rng as rng
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from crypten.mpc.primitives import arithmetic as _arithmetic
    from crypten.mpc.provider import tfp_provider as _tfp_provider

    if getattr(rng.generate_random_ring_element, "_secfwt_keystream", False):
        return
    crypten_draw = rng.generate_random_ring_element
    streams: dict[int, tuple[torch.Generator, int, Any]] = {}
    zeros = [b""]  # plaintext of the keystream, grown as needed (AES-CTR of zeros = keystream)

    def keystream(generator: torch.Generator, n: int) -> torch.Tensor:
        seed = generator.initial_seed()
        entry = streams.get(id(generator))
        if entry is None or entry[0] is not generator or entry[1] != seed:
            key = hashlib.sha256(b"secfwt/ring-elements/aes-128-ctr/" + seed.to_bytes(8, "little")).digest()[:16]
            entry = (generator, seed, Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor())
            streams[id(generator)] = entry  # holds the generator: its id is never reused meanwhile
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        nbytes = 8 * n
        if len(zeros[0]) < nbytes:
            zeros[0] = bytes(nbytes)
        out = bytearray(nbytes + 15)  # update_into wants room for a block
        entry[2].update_into(memoryview(zeros[0])[:nbytes], out)
        return torch.frombuffer(out, dtype=torch.int64, count=n)

    def generate_random_ring_element(size: Any, ring_size: int = 2**64, generator: Any = None, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if ring_size != 2**64 or set(kwargs) - {"device"} or (device is not None and torch.device(device).type != "cpu"):
            return crypten_draw(size, ring_size=ring_size, generator=generator, **kwargs)
        if generator is None:
            generator = crypten.generators["local"][torch.device("cpu")]
        shape = torch.Size([size] if isinstance(size, int) else size)
        return keystream(generator, math.prod(shape)).reshape(shape)

    generate_random_ring_element._secfwt_keystream = True  # type: ignore[attr-defined]
    for module in (rng, _arithmetic, _ttp_provider, _tfp_provider):
        module.generate_random_ring_element = generate_random_ring_element  # type: ignore[attr-defined]


if _ring_matmul_enabled:
    _install_two_party_collectives()
    _install_keystream_ring_elements()
# ---------------------------------------------------------------------------------------------
# End of adaptations 4, 8, 9, 10 and 11.
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


if _ring_matmul_enabled:
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


def _fix_seeds(rank: int, world_size: int, *, label: str = "") -> None:
    """Replace the random PRG seeds of this party by ones derived from the test seed.

    Computing parties: CrypTen's pairwise prev/next, local and global generators (consistent
    across parties exactly as ``crypten._setup_prng`` makes them). Dealer: torch's default
    generator, from which ``TTPServer`` draws the per-party seeds it then sends.
    """
    if rank >= world_size:
        torch.manual_seed(_derived_seed("dealer") & (2**63 - 1))
        return
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    at = f"{label}/" if label else ""  # "" keeps the seeds of runs without reseeds unchanged
    for device in crypten.generators["prev"]:
        crypten.generators["prev"][device].manual_seed(_derived_seed(f"{at}pair/{prv}/{rank}"))
        crypten.generators["next"][device].manual_seed(_derived_seed(f"{at}pair/{rank}/{nxt}"))
        crypten.generators["local"][device].manual_seed(_derived_seed(f"{at}local/{rank}"))
        crypten.generators["global"][device].manual_seed(_derived_seed(f"{at}global"))


def insecure_reseed(label: str) -> bool:
    """Tests only: reseed every PRG of the session, the dealer's included, from (test seed, label).

    Called by the computing parties at the same protocol point (a checkpoint at step k), it
    makes the randomness after that point independent of what ran before, so a run resumed
    from that checkpoint draws exactly what the uninterrupted run drew (bit-identical shares).
    Does nothing and returns False unless the party was started with ``insecure_fixed_seed``;
    the dealer refuses the request in that case too (:func:`_dealer_reseed`).
    """
    if _insecure_fixed_seed is None:
        return False
    comm = crypten.communicator.get()
    rank, world_size = comm.get_rank(), comm.get_world_size()
    _fix_seeds(rank, world_size, label=label)
    _secfwt_beaver.reset_pools()  # pooled triples were drawn before this point
    if crypten.cfg.mpc.provider == Provider.TTP.value:
        client = _ttp_provider.TTPClient.get()
        client.generator.manual_seed(_derived_seed(f"ttp/{rank}/{label}"))
        if rank == 0:
            client.ttp_request("secfwt_insecure_reseed", None, label)
    return True


def _dealer_reseed(self: Any, label: str) -> torch.Tensor:
    """The dealer's half of :func:`insecure_reseed` (a ``TTPServer`` request from rank 0)."""
    if _insecure_fixed_seed is None:
        # RuntimeError is what TTPServer's loop catches: the dealer stops instead of serving
        # predictable randomness to a party that asks for it outside a fixed-seed test.
        raise RuntimeError("refused secfwt_insecure_reseed: the dealer was not started with insecure_fixed_seed")
    for i, g in enumerate(self.generators):
        g.manual_seed(_derived_seed(f"ttp/{i}/{label}"))
    return torch.zeros(1, dtype=torch.long)


_ttp_provider.TTPServer.secfwt_insecure_reseed = _dealer_reseed  # type: ignore[attr-defined]


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
    "insecure_reseed",
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
        try:
            crypten.mpc.provider.TTPServer()
        except BaseException:
            close_after_failure()
            raise
    if _active_transport is Transport.TLS:
        # Close the dealer's streams in order, so the computing parties' shutdown need not wait
        # for them to time out (gloo needs nothing: the process just exits).
        crypten.uninit()


def close_after_failure() -> None:
    """Best effort, once this party failed: close its TLS streams in order instead of dying with
    them open, so a peer blocked on us learns which party was lost first (the mesh's CLOSE
    carries it) rather than blaming us. gloo has nothing to say: the process just exits."""
    if _active_transport is not Transport.TLS or not crypten.communicator.is_initialized():
        return
    try:
        crypten.uninit()
    except Exception as exc:  # noqa: BLE001  (the session is already broken)
        log.debug("closing the MPC session after a failure: %s", exc)


def communication_stats() -> dict[str, int]:
    stats = crypten.communicator.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}


def reset_communication_stats() -> None:
    crypten.communicator.get().reset_communication_stats()


def shutdown_party() -> None:
    crypten.uninit()
