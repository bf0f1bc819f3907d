"""Products with a matrix that one computing party holds in the clear: the model owner's weights.

The model owner knows its frozen weights ``W``; secret-sharing them and multiplying with
Beaver's protocol treats ``W`` as unknown to everyone. Knowing that one party holds ``W``, the
product with a secret-shared ``x = x_o + x_p`` (owner's and other party's shares) needs only the
cross term ``x_p W``, a one-sided product (the dealer-aided form of the secure matrix products of
SecureML, Mohassel and Zhang, S&P 2017, with the trusted dealer of CrypTen's TTP provider):

* the dealer gives the other party a random ``A`` (shape of ``x``), the owner a random ``B``
  (shape of ``W``), and both additive shares of ``C = A B``;
* the other party sends ``e = x_p - A``, the owner sends ``d = W - B`` (one exchange);
* the owner's share is ``(x_o + e) W + C_o``, the other party's ``A d + C_p``, since
  ``x_p W = e W + A (d + B)``.

``e`` is masked by ``A`` (unknown to the owner) and ``d`` by ``B`` (unknown to the other
party), so each party learns nothing new, exactly as in Beaver's protocol. Per product each
party computes ONE ring matmul instead of two, the owner's with ``W`` itself, whose fixed-point
values are narrow (:func:`secfwt.mpc.ring.ring_matmul_narrow`: half a full limb ring matmul,
used where it measured faster than torch's int64 matmul, :mod:`secfwt.mpc.ring_tuning`), and
only the owner sends a weight-sized message (Beaver: both parties).

**Frozen weights: the mask opened once.** A weight that stays the same for the whole session
(every frozen weight of a job) gets a session key (``OwnedMatrix.share(..., fixed_mask=True)``).
Its first product draws ``B`` as above, the owner sends ``d = W - B`` once, the other party
keeps ``d`` and the dealer keeps ``B``; every later product with it reuses ``B`` with fresh
``A`` and fresh shares of ``C = A B``, so a product costs one message (``e``, x-sized, other
party to owner) and the owner sends nothing. ``d`` is a one-time pad of ``W`` that is sent once,
and each ``e`` is masked by its own fresh ``A``: the views are those of one product per call,
with the weight mask shared among them (as SecureML's preprocessing reuses the mask of a
matrix that appears in several products).

**Work ahead.** With the mask fixed, the other party's product ``A d`` and the dealer's
``A B`` depend on nothing the next product brings but ``A``'s shape. Each fixed mask therefore
has its own random stream for ``A`` and rank 1's share of ``C``, seeded by the other party and
the dealer in common (one draw from their shared generator at the first product), and both
compute the next product's ``A d + C_1`` and ``A B - C_1`` in a background thread at lowered
CPU priority as soon as the current one is served (same shape assumed; on another shape both
discard it alike and compute in line); both keep their fixed operand (``d``, ``B``) split into
limbs (:class:`~secfwt.mpc.ring.PreparedRight`, within :data:`PREPARED_BUDGET_BYTES`) where
the limbs measured faster than torch's int64 matmul. The
other party then only sends ``e`` and the dealer answers at once; the ring matmuls run while
the processes would otherwise wait (on the network or on each other). :func:`drain` waits
for that work (benchmarks call it inside the measured time, so the work ahead is paid by the
forward that starts it). Under ``insecure_fixed_seed`` (bit-identical test reruns) nothing is
computed ahead: ``A`` comes from the shared generators in protocol order.

Only values the owner put in unchanged may be :class:`OwnedMatrix`: anything computed in MPC
(updated or perturbed trainable weights) is unknown to the owner and must stay an MPCTensor.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ProtocolError
from secfwt.mpc import beaver, ring_tuning
from secfwt.mpc.ring import (
    NARROW_BOUND,
    PreparedRight,
    fixed_on_device,
    on_device,
    ring_matmul,
    ring_matmul_narrow,
    ring_matmul_prepared,
)
from secfwt.mpc.ring_tuning import Kind, Method

#: Fractional bits of CrypTen's fixed point, which the owner's values are encoded with.
_FRAC_BITS = 16

#: Session keys of fixed-mask matrices, drawn in the same order by both parties (every party
#: shares the same weights in the same order; a party process lives for one MPC session).
_keys = itertools.count()
#: This party's state of each fixed mask, by (key, transposed): on the owner True once it has
#: sent ``d``; on the other party ``d``, or its :class:`_Ahead` when working ahead.
_masks: dict[tuple[int, bool], Any] = {}
#: The dealer's ``B`` of each fixed mask and its work ahead (None under a fixed seed), by
#: (key, transposed).
_dealer_masks: dict[tuple[int, bool], tuple[torch.Tensor, _Ahead | None]] = {}
_pool: ThreadPoolExecutor | None = None


def _lower_priority() -> None:
    try:  # a nice value for this thread only (Linux threads are tasks): online work runs first
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):
        pass


def _background() -> ThreadPoolExecutor:
    """One worker thread per process for the work ahead (ordered: one product after another)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="secfwt-owned-ahead", initializer=_lower_priority
        )
    return _pool


@dataclasses.dataclass
class _Ahead:
    """A fixed mask's stream of ``(A, C_1)`` draws and ``compute(A, C_1)`` done one product
    ahead."""

    generator: torch.Generator
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    size_w: torch.Size
    pending: Future[tuple[torch.Tensor, torch.Tensor]] | None = None
    pending_size: torch.Size | None = None

    def _next(self, size_x: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        from crypten.common.rng import generate_random_ring_element

        a = generate_random_ring_element(size_x, generator=self.generator)
        c1 = generate_random_ring_element(
            _product_size(size_x, self.size_w), generator=self.generator
        )
        return a, self.compute(a, c1)

    def take(self, size_x: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``compute(A, C_1)`` for this product; the next one's starts in the
        background."""
        got = self.pending.result() if self.pending is not None else None
        if got is None or self.pending_size != size_x:
            got = self._next(size_x)  # another shape: the spent draws are spent on both sides
        self.pending, self.pending_size = _background().submit(self._next, size_x), size_x
        return got

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()


#: Bytes of fixed masks this process keeps split into limbs (``PreparedRight``, 24 bytes per
#: element: a BERT-base layer's weights take 170 MB); beyond it a product splits its mask anew.
PREPARED_BUDGET_BYTES = 2 * 2**30
_prepared_bytes = 0


class _FixedRight:
    """``a -> a @ b`` in the ring for a mask ``b`` fixed for the session: torch's int64 matmul,
    or ``b`` split into limbs once (:class:`~secfwt.mpc.ring.PreparedRight`: close to half the
    work of a full ring matmul), whichever :mod:`~secfwt.mpc.ring_tuning` measured faster for
    ``a``'s shape class; with ``run.device`` set, the split is made on that device instead and
    the limbs run there. The split is made before the first timing (so it is not charged to
    the limbs) and dropped again when torch wins, within :data:`PREPARED_BUDGET_BYTES` on the
    host."""

    def __init__(self, b: torch.Tensor) -> None:
        self.b = b
        self.prepared: PreparedRight | None = None
        self.on_device: PreparedRight | None = None  # split on run.device, when one is set
        self.limb_classes = 0  # shape classes of ``a`` that chose the limbs
        self.device_classes = 0  # ... and the limbs on the device

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        before = ring_tuning.decided(Kind.PREPARED, a.shape, self.b.shape)
        if before is None:  # split before the timing, so that it is not charged to the limbs
            dev = ring_tuning.current_device()
            if dev is None:
                self._prepare()
            else:
                self._split_on(dev)
        z = ring_tuning.run(
            Kind.PREPARED,
            a.shape,
            self.b.shape,
            torch_fn=lambda: torch.matmul(a, self.b),
            limbs_fn=lambda: self._limbs(a),
            device_fn=lambda dev: on_device(ring_matmul_prepared, a, self._split_on(dev), dev),
        )
        if before is None:
            method = ring_tuning.decided(Kind.PREPARED, a.shape, self.b.shape)
            if method is Method.LIMBS:
                self.limb_classes += 1
            elif not self.limb_classes:
                self._release()
            if method is Method.DEVICE:
                self.device_classes += 1
            elif not self.device_classes:
                self.on_device = None
        return z

    def _limbs(self, a: torch.Tensor) -> torch.Tensor:
        if self.prepared is None:
            self._prepare()
        if self.prepared is None:  # over the budget: split each time
            return ring_matmul(a, self.b)
        return ring_matmul_prepared(a, self.prepared)

    def _split_on(self, dev: torch.device) -> PreparedRight:
        """The mask split on ``dev`` once (device memory is not counted in the host budget)."""
        if self.on_device is None:
            self.on_device = PreparedRight(self.b.to(device=dev))
        return self.on_device

    def _prepare(self) -> None:
        global _prepared_bytes
        need = 3 * self.b.numel() * 8
        if self.prepared is None and _prepared_bytes + need <= PREPARED_BUDGET_BYTES:
            _prepared_bytes += need
            self.prepared = PreparedRight(self.b)

    def _release(self) -> None:
        global _prepared_bytes
        if self.prepared is not None:
            _prepared_bytes -= self.prepared.nbytes
            self.prepared = None


def _work_ahead() -> bool:
    """False under ``insecure_fixed_seed``: then every draw follows the protocol's order."""
    from secfwt.mpc.seeding import insecure_fixed_bytes

    return insecure_fixed_bytes("owned-work-ahead", 1) is None


def _product_size(size_x: torch.Size, size_w: torch.Size) -> torch.Size:
    return torch.Size((*beaver.broadcast_shapes(size_x[:-2], size_w[:-2]), size_x[-2], size_w[-1]))


def _stream_seed(shared: torch.Generator) -> int:
    from crypten.common.rng import generate_random_ring_element

    return int(generate_random_ring_element((), generator=shared)) % 2**63


@dataclasses.dataclass(frozen=True)
class OwnedMatrix:
    """A matrix (or a batch, leading dims) known in the clear to the computing party ``owner``.

    ``encoded`` is the owner's fixed-point value (CrypTen's encoding, int64) and None on the
    other party, which knows only ``shape``. ``narrow`` (owner only) says every encoded value is
    below :data:`~secfwt.mpc.ring.NARROW_BOUND` in magnitude; it is never sent anywhere.
    """

    owner: int
    shape: torch.Size
    encoded: torch.Tensor | None
    narrow: bool = False
    #: session key of the fixed mask (None: a fresh mask per product); ``transposed`` says which
    #: orientation of the shared matrix this is (each has its own mask).
    key: int | None = None
    transposed: bool = False

    @classmethod
    def share(
        cls,
        value: torch.Tensor | None,
        *,
        owner: int,
        shape: tuple[int, ...],
        fixed_mask: bool = False,
    ) -> OwnedMatrix:
        """Both parties call this; the owner passes its float matrix, the other None.

        Nothing is communicated: the other party only learns the (public) shape. ``fixed_mask``:
        the value is the same for the whole session, so its mask is opened once (module doc);
        both parties must share their fixed-mask matrices in the same order.
        """
        if len(shape) < 2:
            raise ValueError(f"an owned matrix needs at least 2 dims, got shape {tuple(shape)}")
        key = next(_keys) if fixed_mask else None
        if crypten.communicator.get().get_rank() != owner:
            return cls(owner=owner, shape=torch.Size(shape), encoded=None, key=key)
        if value is None or tuple(value.shape) != tuple(shape):
            got = None if value is None else tuple(value.shape)
            raise ProtocolError(
                f"owned matrix: owner's value has shape {got}, agreed shape is {tuple(shape)}"
            )
        from crypten.encoder import FixedPointEncoder

        # float32 first, as PartySession.share does: the same fixed-point values as a sharing
        encoded = FixedPointEncoder(precision_bits=_FRAC_BITS).encode(value.to(torch.float32))
        narrow = bool(encoded.abs().max() < NARROW_BOUND) if encoded.numel() else True
        return cls(owner=owner, shape=torch.Size(shape), encoded=encoded, narrow=narrow, key=key)

    def dim(self) -> int:
        return len(self.shape)

    def size(self) -> torch.Size:
        return self.shape

    def transpose(self, dim0: int, dim1: int) -> OwnedMatrix:
        n = len(self.shape)
        shape = list(self.shape)
        shape[dim0], shape[dim1] = shape[dim1], shape[dim0]
        encoded = None if self.encoded is None else self.encoded.transpose(dim0, dim1)
        last_two = {dim0 % n, dim1 % n} == {n - 2, n - 1}
        # a fixed mask belongs to one orientation; other transpositions get fresh masks
        key = self.key if last_two else None
        return dataclasses.replace(
            self,
            shape=torch.Size(shape),
            encoded=encoded,
            key=key,
            transposed=self.transposed != last_two,
        )

    def t(self) -> OwnedMatrix:
        return self.transpose(-2, -1)

    def to_mpc(self) -> Any:
        """An ordinary secret sharing (CrypTen's, from the owner) of the same fixed-point values."""
        value = None if self.encoded is None else self.encoded.double() / 2**_FRAC_BITS  # exact
        return crypten.cryptensor(
            torch.zeros(self.shape) if value is None else value, src=self.owner
        )


def matmul(x: Any, w: OwnedMatrix, *, headroom_bits: int = 0) -> Any:
    """``x @ w`` for an MPCTensor ``x`` (16 fractional bits, ``(..., M, K)``) and an owned
    ``w`` (``(..., K, N)``), truncated back to 16 fractional bits like CrypTen's matmul.

    ``headroom_bits`` h: ``x`` is first truncated to 16 - h fractional bits, so the product is
    truncated by 2^(16 - h) from values 2^h times smaller: its local truncation, which fails
    with probability |value| / 2^64 (SecureML), fails 2^h times less often, for h bits of x's
    resolution.

    TTP provider only; with any other provider ``w`` is shared the ordinary way and multiplied
    with Beaver's protocol (same result up to the truncation's last bit).
    """
    if beaver.dealer_generator() is None:
        return x.matmul(w.to_mpc())
    if x.encoder.scale != 2**_FRAC_BITS:
        raise ProtocolError(
            f"owned matmul expects {_FRAC_BITS} fractional bits, x has scale {x.encoder.scale}"
        )
    if not 0 <= headroom_bits < _FRAC_BITS:
        raise ValueError(f"headroom_bits must be in [0, {_FRAC_BITS}), got {headroom_bits}")
    share = x.share if not headroom_bits else x.share.div(2**headroom_bits, rounding_mode="trunc")
    z = product(share, w)
    # CrypTen's 2-party truncation of the product's extra fractional bits (local, SecureML)
    return crypten.mpc.MPCTensor.from_shares(
        z.div_(2 ** (_FRAC_BITS - headroom_bits), rounding_mode="trunc"), precision=_FRAC_BITS
    )


def product(x_share: torch.Tensor, w: OwnedMatrix) -> torch.Tensor:
    """This party's share of the exact ring product ``x @ encoded(w)`` (not truncated)."""
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.provider.ttp_provider import TTPClient

    comm = crypten.communicator.get()
    rank = comm.get_rank()
    if comm.get_world_size() != 2:
        raise ProtocolError("owned matmul needs exactly 2 computing parties")
    size_x, size_w = x_share.size(), w.shape
    generator = TTPClient.get().get_generator()
    other = 1 - rank
    fixed = None if w.key is None else (w.key, w.transposed)
    first = fixed is None or fixed not in _masks  # the same on both parties
    ahead = fixed is not None and w.owner == 0 and _work_ahead()  # the dealer decides alike
    # Draw order matches the dealer's (dealer_one_sided_matmul): A from the other party's
    # generator, B (fresh, or a fixed mask's first use) from the owner's, then rank 1's C share.
    if rank == 0:
        if fixed is None:
            reply = beaver.dealer_request("secfwt_one_sided_matmul", size_x, size_w, w.owner)
        else:
            reply = beaver.dealer_request(
                "secfwt_fixed_one_sided_matmul", fixed, first, size_x, size_w, w.owner
            )
    if rank == w.owner:
        assert w.encoded is not None
        sending = None
        if first:
            b = generate_random_ring_element(
                size_w, generator=generator if fixed is None else _mask_generator(fixed, generator)
            )
            sending = comm.isend((w.encoded - b).contiguous(), other)  # d = W - B
            if fixed is not None:
                _masks[fixed] = True
        e = comm.recv(torch.empty(size_x, dtype=torch.long), other)  # e = x_p - A
        if sending is not None:
            sending.wait()
        z = _owner_product(x_share + e, w.encoded, narrow=w.narrow)
    elif ahead:
        assert fixed is not None
        return _other_ahead(x_share, fixed, first, size_w, generator, comm)  # holds C_1 already
    else:
        a = generate_random_ring_element(size_x, generator=generator)
        sending = comm.isend((x_share - a).contiguous(), other)
        if first:
            d = comm.recv(torch.empty(size_w, dtype=torch.long), other)
            if fixed is not None:
                _masks[fixed] = d
        else:
            d = _masks[fixed]
        sending.wait()
        z = ring_matmul(a, d)
    if rank == 0:
        assert reply is not None
        return z.add_(reply())
    return z.add_(generate_random_ring_element(_product_size(size_x, size_w), generator=generator))


def _owner_product(mine: torch.Tensor, w: torch.Tensor, *, narrow: bool) -> torch.Tensor:
    """The owner's ``(x_o + e) @ W``: with narrow weights torch's int64 matmul or
    :func:`~secfwt.mpc.ring.ring_matmul_narrow` (one GEMM of the limbs against ``W``), whichever
    was measured faster for the shape class; otherwise :func:`~secfwt.mpc.ring.ring_matmul`."""
    if not narrow:
        return ring_matmul(mine, w)
    return ring_tuning.run(
        Kind.NARROW,
        mine.shape,
        w.shape,
        torch_fn=lambda: torch.matmul(mine, w),
        limbs_fn=lambda: ring_matmul_narrow(mine, w.double()),
        device_fn=lambda dev: on_device(
            ring_matmul_narrow, mine, fixed_on_device(w, dev, torch.float64), dev
        ),
    )


def _other_ahead(
    x_share: torch.Tensor,
    fixed: tuple[int, bool],
    first: bool,
    size_w: torch.Size,
    generator: torch.Generator,
    comm: Any,
) -> torch.Tensor:
    """The other party's (rank 1's) side of a fixed-mask product with its work done ahead."""
    if first:
        d = comm.recv(torch.empty(size_w, dtype=torch.long), 0)
        times_d = _FixedRight(d)
        _masks[fixed] = _Ahead(
            torch.Generator().manual_seed(_stream_seed(generator)),
            lambda a, c1: times_d(a).add_(c1),
            size_w,
        )
    a, z = _masks[fixed].take(x_share.size())  # z = A d + C_1
    comm.send((x_share - a).contiguous(), 0)  # e = x_p - A
    return z


def drain() -> None:
    """Wait until this party's work ahead, and (rank 0 asks) the dealer's, is done. Both
    computing parties call it at the same point; a no-op where nothing is computed ahead."""
    if beaver.dealer_generator() is None or not _masks or not _work_ahead():
        return
    if crypten.communicator.get().get_rank() == 0:
        beaver.dealer_request("secfwt_owned_drain")()
    for state in _masks.values():
        if isinstance(state, _Ahead):
            state.wait()


def dealer_drain() -> torch.Tensor:
    """The dealer's side of :func:`drain` (``TTPServer.secfwt_owned_drain``)."""
    for _b, ahead in _dealer_masks.values():
        if ahead is not None:
            ahead.wait()
    return torch.zeros(0, dtype=torch.long)


def _mask_generator(key: tuple[int, bool], shared: torch.Generator) -> torch.Generator:
    """The generator of a fixed mask ``B``, seeded by one draw from the owner's generator shared
    with the dealer; under ``insecure_fixed_seed`` (tests) by a value derived from the key
    instead, so that a resumed session (whose masks are set up again at other points of the
    streams) draws the same ``B`` without moving the shared streams."""
    from secfwt.mpc.seeding import insecure_fixed_bytes

    fixed = insecure_fixed_bytes(f"owned-fixed-mask/{key[0]}/{int(key[1])}", 8)
    seed = int.from_bytes(fixed, "little") % 2**63 if fixed is not None else _stream_seed(shared)
    return torch.Generator().manual_seed(seed)


def dealer_one_sided_matmul(
    generators: list[torch.Generator], size_x: torch.Size, size_w: torch.Size, owner: int
) -> torch.Tensor:
    """The dealer's side of :func:`product`: rank 0's share ``A B - C_1`` of ``C = A B``.

    ``generators`` are the dealer's per-party generators (``TTPServer``'s, seeded in common with
    each party's ``TTPClient``); installed as ``TTPServer.secfwt_one_sided_matmul`` by
    :func:`secfwt.mpc.engine.install`.
    """
    from crypten.common.rng import generate_random_ring_element

    a = generate_random_ring_element(size_x, generator=generators[1 - owner])
    b = generate_random_ring_element(size_w, generator=generators[owner])
    c = ring_matmul(a, b)
    return c.sub_(generate_random_ring_element(c.size(), generator=generators[1]))


def dealer_fixed_one_sided_matmul(
    generators: list[torch.Generator],
    key: tuple[int, bool],
    first: bool,
    size_x: torch.Size,
    size_w: torch.Size,
    owner: int,
) -> torch.Tensor:
    """As :func:`dealer_one_sided_matmul` for a fixed-mask matrix: ``B`` is drawn at the key's
    first product and kept for the session (installed as
    ``TTPServer.secfwt_fixed_one_sided_matmul``)."""
    from crypten.common.rng import generate_random_ring_element

    ahead = owner == 0 and _work_ahead()  # as the parties decide in product()
    a = None if ahead else generate_random_ring_element(size_x, generator=generators[1 - owner])
    if first:
        if key in _dealer_masks:
            raise ProtocolError(f"owned matmul: fixed mask {key} set up twice")
        b = generate_random_ring_element(size_w, generator=_mask_generator(key, generators[owner]))
        stream = None
        if ahead:
            times_b = _FixedRight(b)
            stream = _Ahead(
                torch.Generator().manual_seed(_stream_seed(generators[1])),
                lambda a, c1: times_b(a).sub_(c1),
                torch.Size(size_w),
            )
        _dealer_masks[key] = (b, stream)
    if key not in _dealer_masks or _dealer_masks[key][0].size() != torch.Size(size_w):
        raise ProtocolError(
            f"owned matmul: no fixed mask {key} of shape {tuple(size_w)} at the dealer"
        )
    b, stream = _dealer_masks[key]
    if stream is not None:
        return stream.take(torch.Size(size_x))[1]  # A B - C_1, computed ahead
    c = ring_matmul(a, b)
    return c.sub_(generate_random_ring_element(c.size(), generator=generators[1]))


__all__ = [
    "OwnedMatrix",
    "dealer_drain",
    "dealer_fixed_one_sided_matmul",
    "dealer_one_sided_matmul",
    "drain",
    "matmul",
    "product",
]
