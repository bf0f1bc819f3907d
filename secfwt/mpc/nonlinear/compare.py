"""Comparisons on shares: signs by a bit-sliced carry tree, exact 64-bit tests, bit selects, max.

A comparison takes 7 rounds here, a product 1, so comparisons are the cost to keep down:

* **Bit-sliced signs.** A sign test needs only the bits of ``x`` between its resolution and
  its range. :func:`_negative_bits` drops the low 11 bits of each party's share and keeps the next
  21 (comparing on a reduced bit width after local truncation follows CrypTFlow2, Rathee et al.,
  CCS 2020). The sign of ``x`` is then bit 20 of the sum of the two parties' 21-bit values, i.e.
  their own top bits XOR the carry out of the low 20 bits, which is a carry-lookahead *reduction*
  tree (generate/propagate, Brent and Kung, IEEE TC 1982) over 20 bit planes
  (:mod:`.bits`), each tree level one AND call on only its live nodes (53 plane ANDs per 64
  elements in all) instead of CrypTen's 64-bit parallel-prefix adder on whole words (the A2B
  conversion: 7 AND levels on 2 words each); the sign bits are opened packed too in the B2A.
  About 14 bytes per element and party where CrypTen's A2B on three 21-bit lanes per word took
  about 80, in 7 rounds instead of 8. The sign is exact for
  ``CMP_RESOLUTION <= |x| < CMP_RANGE`` (2^-5 and 2^15).
* **Comparisons batched**: callers stack all thresholds of one function into one call.
* **Bits select in one opening.** Most comparison bits only choose between values (the max tree,
  the exp clamp, GELU's pieces). :func:`_select` opens the packed bits under the dealer's random
  bit and the value under a mask together, where a B2A and then a Beaver product took two
  openings and 16 bytes per element (8 now).
* **Bits are integers.** A comparison result has scale 1, so multiplying by it needs no
  truncation: selecting ``bit * garbage`` gives an exact ring 0, which is why polynomial branches
  may be evaluated on out-of-range inputs and then discarded.

:func:`clip` works on MPCTensors with CrypTen's own comparison, for inputs of any magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ProtocolError
from secfwt.mpc import beaver
from secfwt.mpc.nonlinear.bits import _bit_planes, _pack_rows, _unpack_rows
from secfwt.mpc.nonlinear.fixed_point import FRAC_BITS, _mul, _plus

_CMP_BITS = 21  # bits 11..31 of each share: a 21-bit two's complement value per party
_CMP_DROP_BITS = 11
#: Signs of values closer to 0 than this may come out wrong (they are ties for every use here).
CMP_RESOLUTION = 2.0 ** (_CMP_DROP_BITS - FRAC_BITS)
#: Signs of values at least this large in magnitude are wrong: the supported activation range.
CMP_RANGE = 2.0 ** (_CMP_BITS - 1 + _CMP_DROP_BITS - FRAC_BITS)


def _negative_bits(s: torch.Tensor) -> torch.Tensor:
    """Shares of bits ``[x < 0]`` (integers) of ring values with 16 fractional bits.

    Each party keeps bits 11..31 of its own share (``u_i``, 21 bits); the two add up, mod 2^21,
    to ``floor(x / 2^11) + {-1, 0}`` (the shares' high bits cancel mod 2^64, so unlike a
    truncation no wrap-around failure is possible), whose top bit is the sign of ``x`` whenever
    ``2^-5 <= |x| < 2^15``. :func:`_top_bit_of_sum` computes that bit.
    """
    return _top_bit_of_sum(s >> _CMP_DROP_BITS, bits=_CMP_BITS)


def _negative_words(s: torch.Tensor, *, rows: int = 1) -> torch.Tensor:
    """:func:`_negative_bits` left as packed XOR shares, ``(rows, words)`` (:func:`_top_bit_words`),
    for :func:`_select`."""
    return _top_bit_words(s >> _CMP_DROP_BITS, bits=_CMP_BITS, rows=rows)


def _not(words: torch.Tensor) -> torch.Tensor:
    """XOR shares of the complement of XOR-shared bits (rank 0 flips every bit)."""
    return ~words if crypten.communicator.get().get_rank() == 0 else words


def _top_bit_of_sum(u: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Arithmetic shares (integers) of bit ``bits - 1`` of ``u_0 + u_1``, where ``u_i`` is the
    low ``bits`` bits of party i's own ``u`` (ring values of any scale).

    The bit is ``top(u_0) ^ top(u_1) ^ carry``, where ``carry`` is the carry out of the low
    ``bits - 1`` bits of the sum: with party 0's bits ``a`` and party 1's bits ``b`` as XOR shares
    ``(a, 0)`` and ``(0, b)``, generate ``a & b`` takes one AND call and propagate ``a ^ b`` is each
    party's own bits; :func:`_carry_out` reduces them. Security is that of the Beaver AND gates:
    each party only inputs bits of its own value, and only XOR-shared bits leave the circuit, as
    in CrypTen's A2B.
    """
    if u.numel() == 0:
        return torch.zeros_like(u)
    return _b2a_packed(_top_bit_words(u, bits=bits), u.shape)


def _top_bit_words(u: torch.Tensor, *, bits: int, rows: int = 1) -> torch.Tensor:
    """:func:`_top_bit_of_sum` left as XOR shares, packed per row: ``u`` is taken as ``rows``
    equal rows (its flattened elements in order), each padded to whole 64-bit words, and the
    result is ``(rows, words per row)``. Row-aligned words let the bits of different rows be
    combined with XOR (e.g. ``1 ^ above ^ below``)."""
    mine = _bit_planes(u, bits=bits, rows=rows)
    low, top = mine[:-1], mine[-1]  # (bits - 1, words), (words,)
    none = torch.zeros_like(low)
    rank = crypten.communicator.get().get_rank()
    and_ = _AndGates(planes=low.shape[0] + _carry_and_planes(low.shape[0]), words=low.shape[1])
    generate = and_(low if rank == 0 else none, none if rank == 0 else low)
    sign = top ^ _carry_out(generate, low, and_)  # XOR shares of the sign bits, packed
    return sign.reshape(rows, -1)


class _AndGates:
    """AND of XOR-shared words (one Beaver opening per call) with the binary triples of ALL
    calls of one comparison fetched by a single dealer request, sliced along dim 0 in order
    (instead of one dealer round trip per call, as CrypTen's ``beaver.AND``)."""

    def __init__(self, *, planes: int, words: int) -> None:
        size = torch.Size([planes, words])
        self._a, self._b, self._c_of = beaver.triple(size, size, "binary")
        self._c: torch.Tensor | None = None
        self._used = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._c is None:
            self._c = self._c_of()
        part = slice(self._used, self._used + x.shape[0])
        self._used = part.stop
        c = self._c[part]
        return beaver.and_with_triple(x, y, self._a[part], self._b[part], lambda: c)


def _carry_and_planes(planes: int) -> int:
    """Plane ANDs :func:`_carry_out` makes for ``planes`` planes (2 per pair but the lowest's 1)."""
    total = 0
    while planes > 1:
        pairs = planes // 2
        total += 2 * pairs - 1
        planes -= pairs
    return total


def _carry_out(
    generate: torch.Tensor,
    propagate: torch.Tensor,
    and_: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Carry out of the top of a sum from its bit planes' generate and propagate (dim 0, LSB first).

    A reduction tree (not a parallel prefix: only the final carry is needed): adjacent nodes
    combine as ``G = G_hi ^ (P_hi & G_lo)``, ``P = P_hi & P_lo``, all pairs of a level in one
    ``and_`` call, an odd node passing through. The lowest node's ``P`` is never needed (no carry
    enters bit 0), so it is not formed: 53 ANDs in 5 levels for 20 planes. ``and_`` is the AND of
    XOR-shared words (the MPC gate; plain ``&`` in the plaintext tests); XOR is local.
    """
    gs = list(generate)
    ps: list[torch.Tensor | None] = [None, *list(propagate)[1:]]
    while len(gs) > 1:
        pairs = len(gs) // 2
        lefts = [ps[2 * k + 1] for k in range(pairs)] + [ps[2 * k + 1] for k in range(1, pairs)]
        rights = [gs[2 * k] for k in range(pairs)] + [ps[2 * k] for k in range(1, pairs)]
        products = and_(torch.stack(lefts), torch.stack(rights))  # type: ignore[arg-type]
        next_g = [gs[2 * k + 1] ^ products[k] for k in range(pairs)]
        next_p = [None] + [products[pairs + k - 1] for k in range(1, pairs)]
        if len(gs) % 2:
            next_g.append(gs[-1])
            next_p.append(ps[-1])
        gs, ps = next_g, next_p
    return gs[0]


def _b2a_packed(words: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Arithmetic shares of single bits given as packed XOR shares, ``(rows, words)`` as from
    :func:`_top_bit_words` (CrypTen's B2A of one bit with the opening packed: 1/64 of a word per
    element instead of a word).

    The dealer's pair ``(r_A, r_B)`` shares one random bit ``r`` both ways; ``z = x ^ r`` is
    opened and ``x = z + r - 2 z r`` is linear in ``r_A`` (as ``beaver.B2A_single_bit``).
    """
    rows = words.shape[0]
    r_bits, r_arith_of = beaver.bit_masks(torch.Size(shape))
    masked = words ^ _pack_rows(r_bits, rows)
    opened = crypten.communicator.get().all_reduce(masked, op=torch.distributed.ReduceOp.BXOR)
    z = _unpack_rows(opened, shape)
    return _plus(r_arith_of() * (1 - 2 * z), z)


def _select(words: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Shares of ``b * v`` for bits ``b`` given as packed XOR shares ``(rows, words)``
    (:func:`_top_bit_words` with ``rows = values.size(0)``, or ``rows = 1``) and ring values ``v``
    of any scale: exact, no truncation. One opening where a B2A followed by a Beaver product
    (:func:`_b2a_packed`, :func:`_mul`) takes two.

    With the dealer's random bit ``r`` (XOR and additive shares), random ``a`` and shares of
    ``r a`` (``beaver.bit_triple``), ``z = b ^ r`` and ``e = v - a`` are opened together. Then
    ``b = z + (1 - 2 z) r`` and ``r v = e r + r a``, so ``b v = z v + (1 - 2 z)(e [r] + [r a])``
    is local. ``z`` is ``b`` under a one-time pad and ``e`` is ``v`` under a uniform mask: what
    the B2A and the Beaver product open, in one message. The XOR of the two parties' packed
    words travels in the same SUM exchange as ``e``: with two parties each recovers the
    other's words as ``sum - mine``. Without the TTP dealer: B2A, then a Beaver product.
    """
    _two_parties()
    triple = beaver.bit_triple(values.size())
    if triple is None:
        return _mul(_b2a_packed(words, values.size()), values)
    r_bits, a, r_and_ra_of = triple
    z, e = _open_select(words, r_bits, values - a)
    r, ra = r_and_ra_of()
    return z * values + (1 - 2 * z) * (e * r + ra)


def _two_parties() -> None:
    world = crypten.communicator.get().get_world_size()
    if world != 2:
        raise ProtocolError(f"the fused bit select is for 2 computing parties, not {world}")


def _open_select(
    words: torch.Tensor, r_bits: torch.Tensor, masked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one exchange of a bit select: ``z = b ^ r`` (bits ``words``, packed XOR shares in
    ``words.shape[0]`` rows, under the dealer's ``r_bits``) and ``e`` = the sum of ``masked``
    (a value minus its mask), opened together; ``z`` unpacked to ``r_bits``' shape."""
    mine = words ^ _pack_rows(r_bits, words.shape[0])
    total, e = crypten.communicator.get().all_reduce([mine, masked], batched=True)
    return _unpack_rows(mine ^ (total - mine), r_bits.size()), e


def _select_with_opened(
    words: torch.Tensor,
    x: torch.Tensor,
    x_dealt: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]],
    v: torch.Tensor,
) -> torch.Tensor:
    """Shares of ``b_0 x + b_1 v`` for bits ``words`` (2 rows of packed XOR shares, as
    :func:`_select` takes) where ``x`` was already opened once (``x_dealt``: its opening ``d``
    and the dealer's bits for both rows, ``polynomial._OpenedOnce.select_shares``):
    :func:`_select`'s protocol, with ``x``'s own opening in place of its ``e``, so only ``v`` is
    opened (8 bytes per element less), in the same single exchange."""
    _two_parties()
    d, (r_bits, a, r_and_ra_of) = x_dealt
    z, e = _open_select(words, r_bits, v - a)
    r, ra = r_and_ra_of()  # (2, ...) each: x's row, v's row
    opened = torch.stack([d, e])
    return (z * torch.stack([x, v]) + (1 - 2 * z) * (opened * r + ra)).sum(0)


def _greater_than_exact(s: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    """Shares of bits ``[x > t]`` for public ring thresholds, stacked on a new dim 0: one exact
    64-bit comparison call (the sign bit of ``t - x`` in the whole ring, as CrypTen's ``_ltz``)
    for values of any magnitude."""
    return _top_bit_of_sum(torch.stack([_plus(-s, t) for t in thresholds]), bits=64)


def greater_than(s: torch.Tensor, threshold: int) -> torch.Tensor:
    """Shares of integer bits ``[x > threshold]`` for this party's ring shares ``s`` of any
    scale and a public ring threshold: exact in the whole 64-bit ring, one comparison call."""
    return _greater_than_exact(s, [threshold])[0]


def _max_last_dim(s: torch.Tensor) -> torch.Tensor:
    """Row max over the last dim (keepdim): a halving tree, one comparison call per level.

    ``n - 1`` comparisons per row, ``ceil(log2 n)`` levels. A comparison may pick the smaller of
    two values closer than ``CMP_RESOLUTION``, so the result is within ``log2(n) * 2^-5`` of the
    max (0.28 for n = 512), which softmax absorbs.
    """
    while s.size(-1) > 1:
        n = s.size(-1)
        half = n // 2
        a, b = s[..., :half], s[..., half : 2 * half]
        diff = a - b
        larger = a - _select(_negative_words(diff), diff)
        s = larger if n % 2 == 0 else torch.cat([larger, s[..., 2 * half :]], dim=-1)
    return s


def clip(x: Any, lo: float, hi: float) -> Any:
    """min(max(x, lo), hi) with both comparisons in one batched call (one set of rounds)."""
    both = crypten.stack([x - lo, hi - x])  # (2, ...) both must be >= 0 inside the range
    neg = both.lt(0)  # 1 where outside
    below, above = neg[0], neg[1]
    return x + (lo - x) * below + (hi - x) * above


def rows_out_of_range(x: Any, bound: float) -> Any:
    """Shares of one 0/1 integer per row (dim 0): whether any element of the row has
    ``|x| > bound``, for values of any magnitude in the ring (the garbage of a failed
    truncation included).

    Each element's two tests, ``bound - x < 0`` and ``bound + x < 0``, are signs in the whole
    ring computed on each party's share with its low :func:`_range_drop_bits` bits dropped
    (as :func:`_negative_bits` does in a narrow window): the two parties' remaining high bits add
    up, mod ``2^(64 - drop)``, to ``floor(v / 2^drop) + {-1, 0}`` for the ring value ``v``, whose
    top bit is the sign of ``v`` except that a ``v`` in ``[0, 2^drop)`` may read as negative. So
    every ``|x| > bound`` is flagged, whatever its magnitude, and an in-range ``|x|`` may be
    flagged only within ``bound / 2^8`` below the bound (then the row is computed again, and a
    job gives up after :data:`~secfwt.runtime.range_checks.RANGE_ATTEMPTS`). Dropping the bits
    below that resolution halves the carry tree of an exact 64-bit test: 63 bit planes become
    40 for a bound of ``2^15`` and 35 for ``2^20``. The row's flag is then one narrow sign test
    of minus its count of elements beyond the bound (integers, exact).
    """
    from secfwt.mpc.nonlinear.fixed_point import _share_of

    s = _share_of(x, "x")
    t = round(bound * 2**FRAC_BITS)
    drop = _range_drop_bits(t)
    flat = s.reshape(s.shape[0], -1)
    # (2, rows, elements): [x > bound], [x < -bound]
    beyond = _top_bit_of_sum(torch.stack([_plus(-flat, t), _plus(flat, t)]) >> drop, bits=64 - drop)
    count = beyond.sum(dim=(0, 2))  # (rows,) elements beyond the bound, at most 2 per element
    flags = _top_bit_of_sum(-count, bits=(2 * flat.shape[1]).bit_length() + 1)  # [count > 0]
    return crypten.mpc.MPCTensor.from_shares(flags, precision=0)


#: A range test resolves its bound to 2^-RANGE_RESOLUTION_BITS of it (:func:`rows_out_of_range`).
_RANGE_RESOLUTION_BITS = 8


def _range_drop_bits(bound: int) -> int:
    """Low share bits a test of ``|x| > bound`` (a ring integer) may drop: those below
    ``bound / 2^8``."""
    return max(bound.bit_length() - 1 - _RANGE_RESOLUTION_BITS, 0)
