"""Pooled element-wise triples for small products (secfwt.mpc.beaver._TriplePool).

One TTP session checks that small products (a few to 4096 elements, crossing a pool refill)
open to exactly the ring product of the encoded inputs, that they cost one dealer request per
pool instead of one each, that larger products still ask the dealer every time, and that a
reseed for tests drops the pool on both parties alike (products stay exact after it).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role

pytestmark = pytest.mark.multiprocess

#: Element counts of the small products; their sum exceeds one pool (POOL_SIZE = 32768).
SMALL = [1, 7, 128, 4096, 3000, 4096, 4096, 4096, 4096, 4096, 4096, 2000, 5]


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
    out: dict[str, Any] = {"exact": [], "requests": {}}

    def products(sizes: list[int], what: str) -> None:
        before = len(requests)
        for n in sizes:
            x = crypten.cryptensor(torch.randn(n, generator=g) * 10, src=Role.DATA_OWNER.rank)
            y = crypten.cryptensor(torch.randn(n, generator=g) * 10, src=Role.MODEL_OWNER.rank)
            z = beaver.product(x._tensor, y._tensor, op="mul", local=torch.mul)
            assert isinstance(z, ArithmeticSharedTensor)
            out["exact"].append(torch.equal(z.reveal(), x._tensor.reveal() * y._tensor.reveal()))
        out["requests"][what] = len(requests) - before

    products(SMALL, "small")
    products([4097, 5000], "large")
    beaver.reset_pools()
    products([10, 10], "after reset")
    return out


def test_small_products_share_pooled_triples_and_stay_exact() -> None:
    from secfwt.mpc.beaver import POOL_SIZE

    assert sum(SMALL) > POOL_SIZE
    results = run_parties(
        party,
        payloads={Role.MODEL_OWNER: None, Role.DATA_OWNER: None},
        provider=Provider.TTP,
        timeout_s=120,
    )
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        assert all(results[role].value["exact"]), role
    # only rank 0 (the model owner) talks to the dealer: two pools for the small products,
    # one request per large product, a fresh pool after the reset
    assert results[Role.MODEL_OWNER].value["requests"] == {"small": 2, "large": 2, "after reset": 1}
    assert results[Role.DATA_OWNER].value["requests"] == {"small": 0, "large": 0, "after reset": 0}
