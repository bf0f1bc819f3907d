"""Beaver products for 2 parties: two local products per party, the dealer working alongside.

CrypTen's Beaver protocol (``crypten.mpc.primitives.beaver``) returns
``[z] = [c] + eps [b] + [a] delta + eps delta`` with ``eps = x - a`` and ``delta = y - b``
opened: three local products on rank 0 and two elsewhere. Since ``sum_i x_i = eps + a``,

    sum_i (eps [b]_i + [x]_i delta) = eps b + eps delta + a delta,

so every party computes ``[z]_i = [c]_i + eps [b]_i + [x]_i delta``: two local products
everywhere, the same openings (so the same security: Beaver, CRYPTO 1991) and the same ring
result (every term is exact in Z/2^64, so the output shares differ from CrypTen's only in how the
two parties split ``z``). For a matmul each local product is a full ring matmul (three float64
GEMMs, :mod:`secfwt.mpc.ring`), so this removes a third of rank 0's matmul work.

With the trusted dealer (CrypTen's TTP provider) rank 0 also sends its request for ``[c]``
*before* the openings and collects the answer only when it needs ``[c]``, at the very end. The
dealer then computes ``c = a b`` (a ring matmul as large as a party's) while the parties open
``eps``/``delta`` and compute their own products, instead of while both parties wait. The
messages, their order and the random draws are exactly those of CrypTen's
``TrustedThirdParty.generate_additive_triple`` and ``TTPClient.ttp_request``; only the time at
which rank 0 reads the reply moves. Ranks other than 0 size their share of ``c`` from the shapes
instead of multiplying their shares of ``a`` and ``b`` (CrypTen's own TODO there).

:func:`binary_and` does the same for CrypTen's ``beaver.AND`` on XOR shares (the AND gates of
the adder circuit inside CrypTen's own comparisons, seven rounds each; secfwt's comparisons use
:func:`and_with_triple` with their triples fetched at once): ``[z]_i = [c]_i ^ (eps & [b]_i) ^
([x]_i & delta)``, with rank 0's request for its share of ``c`` sent before the opening, so the
dealer's answer no longer adds a round trip to every AND round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ProtocolError

#: Element-wise correlations of at most this many elements (the triples of products and AND
#: gates, the random bits of B2A conversions and of bit selects) come from a pool per kind that
#: one dealer request fills with :data:`POOL_SIZE` of them: LayerNorm's and the softmax's per-row
#: steps, the last levels of a max tree and their comparisons would each wait for a dealer
#: round trip otherwise (1.6 ms each on rank 0 on the 2-core bench machine, 5 messages; a
#: BERT-base layer made 57 requests, 21 of them this small). Each correlation is still used once.
POOL_MAX_ELEMENTS = 16384
POOL_SIZE = 2**16


def _poolable(size: torch.Size) -> bool:
    """Whether a correlation of ``size`` comes from a pool (:data:`POOL_MAX_ELEMENTS`)."""
    return math.prod(size) <= POOL_MAX_ELEMENTS


#: Local product of two int64 tensors (``torch.mul``, or an exact ring matmul).
LocalProduct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def product(x: Any, y: Any, *, op: str, local: LocalProduct) -> Any:
    """``[x op y]`` for ArithmeticSharedTensors ``x``, ``y``, at ring scale (not truncated).

    ``op`` is ``"mul"`` or ``"matmul"`` (the name the dealer is asked for); ``local`` computes
    that product on int64 tensors exactly modulo 2^64.
    """
    from crypten.mpc.primitives import ArithmeticSharedTensor

    return ArithmeticSharedTensor.from_shares(
        product_shares(x.share, y.share, op=op, local=local), precision=0
    )


def product_shares(
    x: torch.Tensor, y: torch.Tensor, *, op: str, local: LocalProduct
) -> torch.Tensor:
    """:func:`product` on this party's int64 shares (no CrypTen tensor objects around them).

    A small broadcast product (``op == "mul"``, at most :data:`POOL_MAX_ELEMENTS` outputs, e.g.
    a per-row factor times a few rows) opens its operands at the output's shape, so its triple
    comes from the pool: a few KB more on the wire instead of a dealer round trip."""
    if op == "mul" and x.shape != y.shape and dealer_generator() is not None:
        size = broadcast_shapes(x.shape, y.shape)
        if _poolable(size):
            x, y = x.expand(size), y.expand(size)
    a, b, c_of = triple(x.size(), y.size(), op)
    eps, delta = crypten.communicator.get().all_reduce([x - a, y - b], batched=True)
    z = local(eps, b)
    z += local(x, delta)  # rank 0's eps delta term is inside x_0 delta (see module doc)
    z += c_of()
    return z


def binary_and(x: Any, y: Any) -> Any:
    """``[x & y]`` for BinarySharedTensors (XOR shares), as CrypTen's ``beaver.AND``."""
    from crypten.mpc.primitives import BinarySharedTensor

    a, b, c_of = triple(x.size(), y.size(), "binary")
    return BinarySharedTensor.from_shares(and_with_triple(x.share, y.share, a, b, c_of))


def and_with_triple(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c_of: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """XOR share of ``x & y`` from XOR shares of words and a binary triple (one opening)."""
    xor = torch.distributed.ReduceOp.BXOR
    eps, delta = crypten.communicator.get().all_reduce([x ^ a, y ^ b], op=xor, batched=True)
    z = eps & b
    z ^= x & delta  # holds rank 0's eps & delta term, as in product()
    z ^= c_of()
    return z


def dealer_generator() -> torch.Generator | None:
    """The generator this party shares with the TTP dealer (CrypTen's ``TTPClient``), or None
    under another provider."""
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty, TTPClient

    if not isinstance(crypten.mpc.get_default_provider(), TrustedThirdParty):
        return None
    return TTPClient.get().get_generator()


def bit_masks(size: torch.Size) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """The dealer's random bits ``r`` for a B2A of ``size`` single bits: this party's XOR share
    of ``r`` and a function returning its additive share of ``r`` (CrypTen's ``B2A_rng``, with
    rank 0's request sent now, as in :func:`triple`)."""
    generator = dealer_generator()
    if generator is None:
        r_arith, r_bits = crypten.mpc.get_default_provider().B2A_rng(size)
        # XOR shares of a bit may carry random high bits that cancel (TFP shares 64-bit words)
        return r_bits.share & 1, lambda: r_arith.share
    if _poolable(size):
        (r_bits,), r_arith_of = _pools["B2A"].take(size)
        return r_bits, r_arith_of
    return _fresh_bit_masks(size, generator)


def _fresh_bit_masks(
    size: torch.Size, generator: torch.Generator
) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """:func:`bit_masks` from one dealer request of its own (TTP)."""
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element

    r_bits = generate_kbit_random_tensor(size, bitlength=1, generator=generator)
    if crypten.communicator.get().get_rank() == 0:
        return r_bits, dealer_request("B2A", size)
    r_arith = generate_random_ring_element(size, generator=generator)
    return r_bits, lambda: r_arith


def bit_triple(
    size: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], tuple[torch.Tensor, torch.Tensor]]] | None:
    """The dealer's correlation for a bit select (``secfwt.mpc.nonlinear.compare._select``):
    this party's XOR share of random bits ``r`` (0/1), its share of a random ring element ``a``, and
    a function returning its additive shares of ``r`` and of ``r a``, each of ``size``. TTP dealer
    only (``None`` otherwise). Rank 0 sends its request now and reads the reply when the function
    is called; everything else is drawn from the generator each party shares with the dealer, as
    in CrypTen's own correlations (:func:`dealer_bit_triple` is the dealer's side)."""
    generator = dealer_generator()
    if generator is None:
        return None
    if _poolable(size):
        (r_bits, a), r_and_ra_of = _pools["secfwt_bit_triple"].take(size)
    else:
        r_bits, a, r_and_ra_of = _fresh_bit_triple(size, generator)

    def rest() -> tuple[torch.Tensor, torch.Tensor]:
        r_and_ra = r_and_ra_of()
        return r_and_ra[0], r_and_ra[1]

    return r_bits, a, rest


def _fresh_bit_triple(
    size: torch.Size, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]:
    """:func:`bit_triple` from one dealer request of its own (TTP); the shares of ``r`` and
    ``r a`` come stacked, ``(2, *size)``."""
    return _select_bits(("secfwt_bit_triple", size), size, size, generator)


def _select_bits(
    request: tuple[Any, ...], bits: torch.Size, masks: torch.Size, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]:
    """The draws of a bit select's correlation (:func:`bit_triple`, :func:`mask_select`): this
    party's XOR shares of random bits ``r`` (``bits``), its shares of the fresh masks (``masks``)
    and a function returning its additive shares of ``r`` and ``r a``, stacked ``(2, *bits)``:
    rank 0's from the dealer's reply to ``request`` (sent now), rank 1's drawn
    (:func:`_dealer_select_bits` is the dealer's side)."""
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element

    rank0 = crypten.communicator.get().get_rank() == 0
    if rank0:
        reply = dealer_request(*request)
    r_bits = generate_kbit_random_tensor(bits, bitlength=1, generator=generator)
    a = generate_random_ring_element(masks, generator=generator)
    if rank0:
        return r_bits, a, reply
    r_and_ra = torch.stack([generate_random_ring_element(bits, generator=generator) for _ in "rr"])
    return r_bits, a, lambda: r_and_ra


def dealer_bit_triple(generators: list[torch.Generator], size: torch.Size) -> torch.Tensor:
    """The dealer's side of :func:`bit_triple` (``TTPServer.secfwt_bit_triple``): rank 0's
    shares of ``r`` and ``r a``, stacked."""
    return _dealer_select_bits(generators, size, size)


def _dealer_select_bits(
    generators: list[torch.Generator],
    bits: torch.Size,
    masks: torch.Size,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dealer's side of :func:`_select_bits`: it draws what each party draws from the
    generator it shares with that party, in the same order, and returns rank 0's shares of ``r``
    and ``r a``, stacked, where ``a`` is the fresh masks, or ``kept`` stacked before them."""
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element

    if len(generators) != 2:
        raise ValueError(f"bit selects are for 2 computing parties, not {len(generators)}")
    r = torch.zeros(bits, dtype=torch.long)
    a = torch.zeros(masks, dtype=torch.long)
    for g in generators:
        r ^= generate_kbit_random_tensor(bits, bitlength=1, generator=g)
        a += generate_random_ring_element(masks, generator=g)
    if kept is not None:
        a = torch.stack([kept, a])
    r1, ra1 = (generate_random_ring_element(bits, generator=generators[1]) for _ in range(2))
    return torch.stack([r - r1, r * a - ra1])


def mask_products(
    size: torch.Size, masks: int, pairs: tuple[tuple[int, int], ...], *, keep_first: bool = False
) -> tuple[torch.Tensor, Callable[[], torch.Tensor]] | None:
    """The dealer's correlation for products among values that are each opened once
    (``secfwt.mpc.nonlinear.polynomial._OpenedOnce``): this party's shares of ``masks`` random
    ring elements ``a_k`` of ``size`` (stacked on a new dim 0) and a function returning its shares
    of ``a_i a_j`` for each ``(i, j)`` of ``pairs`` (stacked). ``keep_first``: the dealer keeps
    ``a_0`` for one later :func:`mask_select`. TTP dealer only (``None`` otherwise); rank 0's
    request is sent now, its reply read when the function is called (:func:`dealer_mask_products`
    is the dealer's side)."""
    from crypten.common.rng import generate_random_ring_element

    generator = dealer_generator()
    if generator is None:
        return None
    if crypten.communicator.get().get_rank() == 0:
        reply = dealer_request("secfwt_mask_products", size, masks, pairs, keep_first)
        return generate_random_ring_element(torch.Size([masks, *size]), generator=generator), reply
    a = generate_random_ring_element(torch.Size([masks, *size]), generator=generator)
    c = generate_random_ring_element(torch.Size([len(pairs), *size]), generator=generator)
    return a, lambda: c


#: The dealer's ``a_0`` of the last :func:`mask_products` with ``keep_first``, until its
#: :func:`mask_select` (the two are requested in that order, with no other kept mask between).
_kept_mask: list[torch.Tensor] = []


def dealer_mask_products(
    generators: list[torch.Generator],
    size: torch.Size,
    masks: int,
    pairs: tuple[tuple[int, int], ...],
    keep_first: bool = False,
) -> torch.Tensor:
    """The dealer's side of :func:`mask_products` (``TTPServer.secfwt_mask_products``): rank 0's
    shares of the ``a_i a_j``."""
    from crypten.common.rng import generate_random_ring_element

    if len(generators) != 2:
        raise ValueError(f"mask products are for 2 computing parties, not {len(generators)}")
    a = sum(
        generate_random_ring_element(torch.Size([masks, *size]), generator=g) for g in generators
    )
    c1 = generate_random_ring_element(torch.Size([len(pairs), *size]), generator=generators[1])
    if keep_first:
        _kept_mask[:] = [a[0]]
    return torch.stack([a[i] * a[j] for i, j in pairs]) - c1


def mask_select(
    size: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]] | None:
    """:func:`bit_triple` for two rows of ``size``, the first with the mask ``a_0`` the dealer
    kept from the last :func:`mask_products` with ``keep_first`` (a select of a value already
    opened under it), the second with a fresh mask: this party's XOR shares of the random bits
    ``r`` (``(2, *size)``), its share of the second row's mask, and a function returning its
    additive shares of ``r`` and ``r a``, stacked (``(2, 2, *size)``). TTP dealer only (``None``
    otherwise); rank 0's request is sent now, its reply read when the function is called
    (:func:`dealer_mask_select` is the dealer's side)."""
    generator = dealer_generator()
    if generator is None:
        return None
    return _select_bits(("secfwt_mask_select", size), torch.Size([2, *size]), size, generator)


def dealer_mask_select(generators: list[torch.Generator], size: torch.Size) -> torch.Tensor:
    """The dealer's side of :func:`mask_select` (``TTPServer.secfwt_mask_select``): rank 0's
    shares of ``r`` and ``r a`` for ``a`` = the kept ``a_0`` and a fresh mask, stacked."""
    if not _kept_mask or tuple(_kept_mask[0].shape) != tuple(size):
        raise ProtocolError("a mask select without the mask products it belongs to")
    return _dealer_select_bits(generators, torch.Size([2, *size]), size, kept=_kept_mask.pop())


def triple(
    size0: torch.Size, size1: torch.Size, op: str
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]:
    """This party's shares of ``a`` and ``b`` and a function returning its share of ``c``.

    ``op``: ``"mul"`` or ``"matmul"`` (an additive triple, ``c = a op b``) or ``"binary"``
    (XOR shares, ``c = a & b``). TTP provider: the draws of CrypTen's
    ``TrustedThirdParty.generate_additive_triple`` / ``generate_binary_triple``, with rank 0's
    request sent now and its reply read when the returned function is called. Other providers:
    their own triple.
    """
    generator = dealer_generator()
    if generator is None:
        provider = crypten.mpc.get_default_provider()
        if op == "binary":
            a, b, c = provider.generate_binary_triple(size0, size1)
        else:
            a, b, c = provider.generate_additive_triple(size0, size1, op)
        return a.share, b.share, lambda: c.share
    if op in ("mul", "binary") and size0 == size1 and _poolable(size0):
        (a, b), c_of = _pools[op].take(torch.Size(size0))
        return a, b, c_of
    return _fresh_triple(size0, size1, op, generator)


def _fresh_triple(
    size0: torch.Size, size1: torch.Size, op: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]:
    """:func:`triple` from one dealer request of its own (TTP)."""
    from crypten.common.rng import generate_random_ring_element

    comm = crypten.communicator.get()
    if comm.get_rank() == 0:
        args = (size0, size1) if op == "binary" else (size0, size1, op)
        c_of = dealer_request("binary" if op == "binary" else "additive", *args)
    # Binary triples draw full 64-bit words (generate_kbit_random_tensor's default bit length
    # calls generate_random_ring_element), so both kinds draw the same way.
    a = generate_random_ring_element(size0, generator=generator)
    b = generate_random_ring_element(size1, generator=generator)
    if comm.get_rank() != 0:
        c = generate_random_ring_element(_output_size(size0, size1, op), generator=generator)

        def c_of() -> torch.Tensor:
            return c

    return a, b, c_of


#: What a pool hands out: the tensors drawn at once (``size`` each) and a function returning the
#: share that rank 0 reads from the dealer's reply (``(*lead, *size)``).
_Drawn = tuple[tuple[torch.Tensor, ...], Callable[[], torch.Tensor]]


class _Batch:
    """One dealer request's worth of one kind; rank 0 reads the reply at first use."""

    def __init__(self, drawn: _Drawn) -> None:
        self.now, self._later_of = drawn
        self._later: torch.Tensor | None = None

    def later(self) -> torch.Tensor:
        if self._later is None:
            self._later = self._later_of()
        return self._later


class _Pool:
    """Element-wise correlations of one kind fetched :data:`POOL_SIZE` at a time, handed out in
    order, each element once.

    Both parties take the same sizes in the same order (the protocol is the same program on
    both), so they refill at the same points and slice the same elements. A refill is one
    ordinary dealer request of ``POOL_SIZE`` elements (``fresh``: the unpooled draw, returning
    the tensors drawn at once and, last, the function reading the dealer's reply), so the
    dealer's side is unchanged. A take larger than what is left spans the rest of one batch
    and the start of the next (``n <= POOL_MAX_ELEMENTS <= POOL_SIZE``), so no part of a batch
    the dealer sent is thrown away.
    """

    def __init__(self, fresh: Callable[[torch.Size, torch.Generator], tuple[Any, ...]]) -> None:
        self._fresh = fresh
        self.reset()

    def reset(self) -> None:
        self._batch: _Batch | None = None
        self._used = 0

    def take(self, size: torch.Size) -> _Drawn:
        parts: list[tuple[_Batch, slice]] = []
        left = math.prod(size)
        while left > 0 or not parts:
            if self._batch is None or self._used == self._batch.now[0].numel():
                self._refill()
            assert self._batch is not None
            k = min(left, self._batch.now[0].numel() - self._used)
            parts.append((self._batch, slice(self._used, self._used + k)))
            self._used += k
            left -= k

        def joined(pieces: list[torch.Tensor]) -> torch.Tensor:
            t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            return t.reshape(*t.shape[:-1], *size)

        def later() -> torch.Tensor:
            return joined([batch.later()[..., part] for batch, part in parts])

        count = len(parts[0][0].now)
        return tuple(joined([b.now[i][part] for b, part in parts]) for i in range(count)), later

    def _refill(self) -> None:
        generator = dealer_generator()
        if generator is None:
            raise RuntimeError("pooled correlations need the TTP dealer")
        if self._batch is not None:
            self._batch.later()  # the dealer's replies are read in order (dealer_request)
        *now, later_of = self._fresh(torch.Size([POOL_SIZE]), generator)
        self._batch = _Batch((tuple(now), later_of))
        self._used = 0


#: One pool per kind of correlation: additive and binary triples, B2A bits, bit-select triples.
_pools = {
    "mul": _Pool(lambda size, g: _fresh_triple(size, size, "mul", g)),
    "binary": _Pool(lambda size, g: _fresh_triple(size, size, "binary", g)),
    "B2A": _Pool(_fresh_bit_masks),
    "secfwt_bit_triple": _Pool(_fresh_bit_triple),
}


def reset_pools() -> None:
    """Drop the unused pooled correlations (both parties at the same point: a reseed for tests)."""
    for pool in _pools.values():
        pool.reset()


def dealer_request(function: str, *args: Any) -> Callable[[], torch.Tensor]:
    """Rank 0 only: send the TTP dealer a request now; the returned function reads its reply.

    The message is that of CrypTen's ``TTPClient.ttp_request`` (``function`` is a method of
    ``TTPServer``, called with ``args``), so the dealer starts on it at once; rank 0 collects the
    reply (its share) only when it needs it. Requests are answered in order, so each reply
    must be read before the next request's.
    """
    from crypten.mpc.provider.ttp_provider import TTPClient

    comm = crypten.communicator.get()
    client = TTPClient.get()
    dealer = comm.get_ttp_rank()
    comm.send_obj(
        {"function": function, "device": None, "args": args, "kwargs": {}}, dealer, client.ttp_group
    )

    def reply() -> torch.Tensor:
        size = comm.recv_obj(dealer, client.ttp_group)
        share = torch.empty(size, dtype=torch.long)
        comm.broadcast(share, dealer, client.comm_group)
        return share

    return reply


def broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` in plain Python: torch's first call imports its reference
    implementations (0.4 s here), which would land inside the first measured MPC product."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, d in enumerate(shape, start=ndim - len(shape)):
            if d != 1 and out[i] not in (1, d):
                raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} are not broadcastable")
            out[i] = d if d != 1 else out[i]
    return torch.Size(out)


def _output_size(size0: torch.Size, size1: torch.Size, op: str) -> torch.Size:
    """Size of ``a op b`` from the sizes alone (``torch.matmul``'s rules for 1-D operands)."""
    if op != "matmul":
        return broadcast_shapes(size0, size1)
    if len(size0) == 1 and len(size1) == 1:
        return torch.Size([])
    if len(size1) == 1:
        return torch.Size(size0[:-1])
    if len(size0) == 1:
        return torch.Size((*size1[:-2], size1[-1]))
    return torch.Size((*broadcast_shapes(size0[:-2], size1[:-2]), size0[-2], size1[-1]))


__all__ = [
    "LocalProduct",
    "and_with_triple",
    "binary_and",
    "bit_masks",
    "bit_triple",
    "dealer_bit_triple",
    "dealer_generator",
    "dealer_mask_products",
    "dealer_mask_select",
    "mask_products",
    "mask_select",
    "broadcast_shapes",
    "dealer_request",
    "product",
    "product_shares",
    "triple",
]
