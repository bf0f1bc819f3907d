"""Comparisons: the bit-sliced carry tree and bit planes in plaintext, and the one-opening bit
select and opened-once products against their unfused protocols."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc import nonlinear as nl
from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.nonlinear import bits as packing
from secfwt.mpc.nonlinear import compare, fixed_point, polynomial
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from tests.mpc.nonlinear.common import (
    TIMEOUT_S,
    _elementwise_inputs,
    _encoded,
    _one_thread,
    _share,
)


def _protocol_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The one-opening select and the opened-once products against their unfused forms."""
    _one_thread()
    from secfwt.crypten_compat import crypten

    data, shapes = payload["data"], payload["shapes"]
    signs, values = (_share(data, k, shapes, src=1).share for k in ("signs", "values"))
    words = compare._negative_words(signs, rows=3)  # rows of 2003: each padded to whole words
    picked = torch.cat(
        [
            compare._select(words, values),
            compare._select(compare._not(words[:1] ^ words[2:]), values[:1]),
        ]
    )
    reference = fixed_point._mul(
        compare._negative_bits(signs), values
    )  # B2A, then a Beaver product
    ring = [values[0], values[1], values[2]]
    once = polynomial._OpenedOnce(values[0].size(), [0, 1, 2], [(0, 0), (0, 1), (2, 1)])
    once.open({0: ring[0], 1: ring[1]})
    once.open({1: ring[1], 2: ring[2]})  # 1 is not opened again
    products = torch.stack([once.product(i, j) for i, j in ((0, 0), (0, 1), (2, 1))])
    expected = torch.stack(
        [fixed_point._mul(ring[i], ring[j]) for i, j in ((0, 0), (0, 1), (2, 1))]
    )
    reveal = crypten.mpc.MPCTensor.from_shares
    out = {
        "picked": reveal(picked, precision=nl.FRAC_BITS).get_plain_text(),
        "picked_minus_unfused": reveal(picked[:3] - reference, precision=0).get_plain_text(),
        "products_minus_beaver": reveal(products - expected, precision=0).get_plain_text(),
        # GELU's pieces: a square and a select of the same opened value (with the dealer)
        "gelu": nl.gelu(reveal(values, precision=nl.FRAC_BITS)).get_plain_text(),
    }
    square = polynomial._OpenedOnce(values.size(), [0], [(0, 0)], select=0)
    square.open({0: values})
    if square.dealt:
        two = compare._negative_words(torch.stack([signs, -signs]), rows=2)  # a row per value
        fused = compare._select_with_opened(two, values, square.select_shares(0), values * 3)
        unfused = compare._select(two, torch.stack([values, values * 3])).sum(0)
        out["opened_select_minus_select"] = reveal(fused - unfused, precision=0).get_plain_text()
        out["square_minus_beaver"] = reveal(
            square.product(0, 0) - fixed_point._mul(values, values), precision=0
        ).get_plain_text()
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.mark.multiprocess
@pytest.mark.parametrize("provider", [Provider.TTP, Provider.TFP])
def test_fused_select_and_opened_once_products_equal_their_unfused_forms(
    provider: Provider,
) -> None:
    """With the dealer, ``_select`` and ``_OpenedOnce`` use secfwt's own correlations
    (``secfwt_bit_triple``, ``secfwt_mask_products``, with a select on an opened value as GELU
    takes it); without it (TFP) they fall back to B2A and Beaver products. Both give exactly the
    ring values of the unfused protocols, and GELU is right on either."""
    data = _elementwise_inputs()
    data = {"signs": data["signs"], "values": data["act"][: data["signs"].numel()].reshape(3, 2003)}
    shapes = {k: tuple(v.shape) for k, v in data.items()}
    payloads = {
        Role.DATA_OWNER: {"data": data, "shapes": shapes},
        Role.MODEL_OWNER: {"data": {}, "shapes": shapes},
    }
    out = run_parties(_protocol_party, payloads=payloads, provider=provider, timeout_s=TIMEOUT_S)[
        Role.DATA_OWNER
    ].value
    x, v = _encoded(data["signs"]), _encoded(data["values"])
    assert float(out["picked_minus_unfused"].abs().max()) == 0.0  # bit-for-bit the same ring values
    assert float(out["products_minus_beaver"].abs().max()) == 0.0
    decided = x.abs() >= nl.CMP_RESOLUTION
    assert torch.equal(out["picked"][:3][decided], torch.where(x < 0, v, 0.0)[decided])
    both = decided[0] & decided[2]
    between = (x[0] >= 0) == (x[2] >= 0)  # NOT (neg0 XOR neg2)
    assert torch.equal(out["picked"][3][both], torch.where(between, v[0], 0.0)[both])
    want = torch.nn.functional.gelu(v.double())
    assert float((out["gelu"].double() - want).abs().max()) < 1e-3
    if provider is Provider.TTP:  # the select on an opened value needs the dealer's bits
        assert float(out["opened_select_minus_select"].abs().max()) == 0.0
        assert float(out["square_minus_beaver"].abs().max()) == 0.0


def _unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of one row of packed words."""
    return packing._unpack_rows(words.reshape(1, -1), torch.Size([n]))


def test_bit_sliced_carry_gives_exact_signs_in_range() -> None:
    """Simulate the two parties' shares and the carry tree of _negative_bits in plaintext."""
    g = torch.Generator().manual_seed(3)
    limit = int(nl.CMP_RANGE * 2**nl.FRAC_BITS) - 2**12
    x = torch.cat([torch.randint(-limit, limit, (100000,), generator=g), torch.arange(-5000, 5001)])
    mask = torch.randint(-(2**63), 2**63 - 1, x.shape, generator=g, dtype=torch.long)
    planes = [packing._bit_planes(share >> 11, bits=21) for share in (x + mask, -mask)]
    a, b = planes
    anded: list[int] = []

    def and_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        anded.append(x.shape[0])
        return x & y

    carry = compare._carry_out(a[:-1] & b[:-1], a[:-1] ^ b[:-1], and_)
    assert sum(anded) == compare._carry_and_planes(20) == 33  # the triples _negative_bits fetches
    assert len(anded) == 5  # levels (rounds)
    signs = _unpack(a[-1] ^ b[-1] ^ carry, x.numel())
    decided = x.abs() >= nl.CMP_RESOLUTION * 2**nl.FRAC_BITS
    assert torch.equal(signs[decided], (x[decided] < 0).long())
    # the full 64-bit width: the exact sign of the ring sum, for values of any magnitude
    wide = torch.cat([x << 20, torch.tensor([2**63 - 1, -(2**63), 0, -1, 1])])
    wide_mask = torch.randint(-(2**63), 2**63 - 1, wide.shape, generator=g, dtype=torch.long)
    a, b = (packing._bit_planes(share, bits=64) for share in (wide + wide_mask, -wide_mask))
    carry64 = compare._carry_out(a[:-1] & b[:-1], a[:-1] ^ b[:-1], torch.bitwise_and)
    assert torch.equal(_unpack(a[-1] ^ b[-1] ^ carry64, wide.numel()), (wide < 0).long())
    assert compare._carry_and_planes(63) == 118
    # the tree is the carry of the 20-bit sum for any inputs, not only in range
    low = [(share >> 11) & (2**20 - 1) for share in (x + mask, -mask)]
    expected = ((low[0] + low[1]) >> 20) & 1
    assert torch.equal(_unpack(carry, x.numel()), expected)


def test_range_test_on_high_share_bits_flags_every_value_beyond_the_bound() -> None:
    """Simulate rows_out_of_range's two sign tests on the high bits of both parties' shares:
    every value beyond the bound is flagged, whatever its magnitude in the ring, and none
    further than the resolution below it."""
    g = torch.Generator().manual_seed(5)
    for bound, drop in ((2.0**15, 23), (2.0**20, 28)):
        t = round(bound * 2**nl.FRAC_BITS)
        assert compare._range_drop_bits(t) == drop
        res = 1 << drop
        edge = torch.arange(-4 * res, 4 * res + 1, res // 8)
        x = torch.cat(
            [
                t + edge,
                -t + edge,
                torch.randint(-t, t, (20000,), generator=g),
                torch.randint(-(2**63), 2**63 - 1, (20000,), generator=g, dtype=torch.long),
                torch.tensor([2**63 - 1, -(2**63), -(2**63) + t, 2**63 - t, 0, t + 1, -t - 1]),
            ]
        )
        mask = torch.randint(-(2**63), 2**63 - 1, x.shape, generator=g, dtype=torch.long)
        # party 0 adds the public bound, as _plus does
        tests = [
            torch.stack([-share + plus, share + plus]) >> drop
            for share, plus in ((x + mask, t), (-mask, 0))
        ]
        a, b = (packing._bit_planes(u, bits=64 - drop) for u in tests)
        carry = compare._carry_out(a[:-1] & b[:-1], a[:-1] ^ b[:-1], torch.bitwise_and)
        flagged = _unpack(a[-1] ^ b[-1] ^ carry, 2 * x.numel()).reshape(2, -1).amax(0)
        beyond = (x > t) | (x < -t)
        assert bool(flagged[beyond].all())
        assert not bool(flagged[(x >= -t + res) & (x <= t - res)].any())
        assert int(beyond.sum()) > 20000  # the random ring values are nearly all beyond


def test_bit_planes_round_trip() -> None:
    g = torch.Generator().manual_seed(4)
    u = torch.randint(0, 2**21, (3, 67), generator=g)  # not a multiple of 64 elements
    planes = packing._bit_planes(u, bits=21)
    assert planes.shape == (21, 4)
    for j in (0, 7, 20):
        assert torch.equal(_unpack(planes[j], u.numel()), (u.reshape(-1) >> j) & 1)
    full = torch.cat([u.reshape(-1), torch.tensor([-1, -(2**63), 2**63 - 1])])  # all 64 bits
    planes = packing._bit_planes(full, bits=64)
    for j in (0, 33, 62, 63):
        assert torch.equal(_unpack(planes[j], full.numel()), (full >> j) & 1)
    bits = u.reshape(-1) & 1
    assert torch.equal(_unpack(packing._pack_rows(bits, 1), bits.numel()), bits)
    # rows padded apart: row r of plane j is bit j of u[r], and packing rows matches
    rows = packing._bit_planes(u, bits=21, rows=3)
    assert rows.shape == (21, 3 * 2)
    for j in (0, 20):
        assert torch.equal(packing._unpack_rows(rows[j].reshape(3, 2), u.shape), (u >> j) & 1)
        assert torch.equal(packing._pack_rows((u >> j) & 1, 3), rows[j].reshape(3, 2))
