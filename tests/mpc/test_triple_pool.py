"""Pooled element-wise correlations for small protocol steps (secfwt.mpc.beaver._Pool).

One TTP session takes every pooled kind (product and AND triples, B2A bits, bit-select
triples) in small sizes that cross a pool refill, and opens what each party was handed to check
the correlation itself: ``c = a b``, ``c = a & b``, the XOR and the additive sharing of the same
bit, ``r a``. A slice taken at the wrong offset, or from the wrong batch after a refill, breaks
those identities. It also checks that small products (broadcast ones included) open to the exact
ring product, that each kind costs one dealer request per pool instead of one per use, that
larger sizes still ask the dealer every time, and that a reseed for tests drops the pools on
both parties alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role

pytestmark = pytest.mark.multiprocess

#: Element counts of the small uses; their sum exceeds one pool (POOL_SIZE = 65536), and the
#: take of the fourth 16384 spans the end of the first pool and the start of the second.
SMALL = [1, 7, 128, 16384, 3000, 16384, 16384, 16384, 16384, 2000, 5]
#: Broadcast products (x shape, y shape): pooled while the output has at most 16384 elements.
BROADCAST_SMALL = [((18, 128, 1), (1, 128, 1)), ((64, 1), (1, 256))]
BROADCAST_LARGE = [((200, 1), (1, 100))]
LARGE = [16385, 30000]
KINDS = ("mul", "binary", "B2A", "bit_triple")


def _opened(t: torch.Tensor, *, xor: bool = False) -> torch.Tensor:
    """Test only: the value both parties' shares of ``t`` stand for."""
    from secfwt.crypten_compat import crypten

    op = torch.distributed.ReduceOp.BXOR if xor else torch.distributed.ReduceOp.SUM
    return crypten.communicator.get().all_reduce(t.clone(), op=op)


def _take(kind: str, size: torch.Size) -> Callable[[], bool]:
    """Take one ``kind`` correlation of ``size``; the returned check opens it (reading rank 0's
    dealer share only then, as a protocol may after later takes) and tests its identity."""
    from secfwt.mpc import beaver

    if kind in ("mul", "binary"):
        a, b, c_of = beaver.triple(size, size, kind)
        xor = kind == "binary"

        def check_triple() -> bool:
            a_, b_, c = _opened(a, xor=xor), _opened(b, xor=xor), _opened(c_of(), xor=xor)
            return a_.shape == size and torch.equal(c, a_ & b_ if xor else a_ * b_)

        return check_triple
    if kind == "B2A":
        r_bits, r_arith_of = beaver.bit_masks(size)

        def check_b2a() -> bool:
            r = _opened(r_bits, xor=True)
            return bool(((r == 0) | (r == 1)).all()) and torch.equal(_opened(r_arith_of()), r)

        return check_b2a
    triple = beaver.bit_triple(size)
    assert triple is not None
    r_bits, a, rest_of = triple

    def check_bit_triple() -> bool:
        r_share, ra_share = rest_of()
        r, a_open = _opened(r_bits, xor=True), _opened(a)
        return (
            bool(((r == 0) | (r == 1)).all())
            and torch.equal(_opened(r_share), r)
            and torch.equal(_opened(ra_share), r * a_open)
        )

    return check_bit_triple


def party(ctx: PartyContext, payload: None) -> dict[str, Any]:
    from crypten.mpc.primitives import ArithmeticSharedTensor

    from secfwt.crypten_compat import crypten
    from secfwt.mpc import beaver

    requests: list[str] = []
    real = beaver.dealer_request

    def counting(function: str, *args: Any) -> Any:
        requests.append(function)
        return real(function, *args)

    beaver.dealer_request = counting  # type: ignore[assignment]
    g = torch.Generator().manual_seed(3)
    out: dict[str, Any] = {"exact": [], "holds": [], "requests": {}}

    def counted(what: str, run: Any) -> None:
        before = len(requests)
        run()
        out["requests"][what] = len(requests) - before

    def products(pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        for xs, ys in pairs:
            x = crypten.cryptensor(torch.randn(xs, generator=g) * 10, src=Role.DATA_OWNER.rank)
            y = crypten.cryptensor(torch.randn(ys, generator=g) * 10, src=Role.MODEL_OWNER.rank)
            z = beaver.product(x._tensor, y._tensor, op="mul", local=torch.mul)
            assert isinstance(z, ArithmeticSharedTensor)
            out["exact"].append(torch.equal(z.reveal(), x._tensor.reveal() * y._tensor.reveal()))

    def correlations(kind: str, sizes: list[int]) -> None:
        # every correlation is taken before any is opened, so the first ones are read after
        # the pool has refilled
        checks = [(n, _take(kind, torch.Size([n]))) for n in sizes]
        out["holds"].extend((kind, n, check()) for n, check in checks)

    products([((n,), (n,)) for n in SMALL])
    counted("products small", lambda: products([((n,), (n,)) for n in SMALL]))
    counted("products large", lambda: products([((16385,), (16385,)), ((20000,), (20000,))]))
    counted("broadcast small", lambda: products(BROADCAST_SMALL))
    counted("broadcast large", lambda: products(BROADCAST_LARGE))
    for kind in KINDS:
        beaver.reset_pools()
        counted(f"{kind} small", lambda kind=kind: correlations(kind, SMALL))
        # large ones ask the dealer each: taken and read one at a time (replies come in order)
        counted(f"{kind} large", lambda kind=kind: [correlations(kind, [n]) for n in LARGE])
    beaver.reset_pools()
    counted("after reset", lambda: products([((10,), (10,)), ((10,), (10,))]))
    return out


def test_small_correlations_come_from_pools_and_hold() -> None:
    from secfwt.mpc.beaver import POOL_MAX_ELEMENTS, POOL_SIZE

    assert sum(SMALL) > POOL_SIZE and max(SMALL) <= POOL_MAX_ELEMENTS
    results = run_parties(
        party,
        payloads={Role.MODEL_OWNER: None, Role.DATA_OWNER: None},
        provider=Provider.TTP,
        timeout_s=180,
    )
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        value = results[role].value
        assert all(value["exact"]), role
        assert [h for h in value["holds"] if not h[2]] == [], role
        assert len(value["holds"]) == len(KINDS) * (len(SMALL) + 2)

    # only rank 0 (the model owner) talks to the dealer: one request per pool filled, a take
    # that does not fit spanning the rest of a pool and the next (nothing the dealer sent is
    # dropped), so the small uses cost as many requests as the pools their running total
    # fills; each large use is one request; a fresh pool after the reset
    def pools(elements: int) -> int:
        return -(-elements // POOL_SIZE)

    small, broadcast = (
        sum(SMALL),
        sum(math.prod(torch.broadcast_shapes(*p)) for p in BROADCAST_SMALL),
    )
    expected = {
        "products small": pools(2 * small) - pools(small),  # after a first, uncounted pass
        "products large": 2,
        "broadcast small": pools(2 * small + broadcast) - pools(2 * small),
        "broadcast large": 1,
        "after reset": 1,
        **{f"{kind} small": pools(small) for kind in KINDS},
        **{f"{kind} large": 2 for kind in KINDS},
    }
    assert expected["products small"] == 1 and expected["mul small"] == 2  # the sizes' intent
    assert results[Role.MODEL_OWNER].value["requests"] == expected
    assert set(results[Role.DATA_OWNER].value["requests"].values()) == {0}
