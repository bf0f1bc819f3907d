"""Products with a matrix the model owner holds in the clear (secfwt.mpc.owned).

One session per provider (model owner, data owner, and the dealer under TTP) checks that

* the untruncated one-sided product opens to exactly ``torch.matmul`` of the encoded int64
  inputs (so the dealer's triple, the exchange and both local ring matmuls are exact), for
  narrow weights (one GEMM on the owner) and wide ones (a full ring matmul), batched or not;
* the truncated product decrypts to the product of the encoded inputs within the truncation's
  error (2 units of 2^-16);
* the data owner's traffic is one x-sized and one w-sized message (CrypTen counts what a party
  sends and receives), half of what Beaver's protocol opens;
* under TFP (no dealer) the same call falls back to an ordinary sharing and Beaver's protocol;
* a frozen weight (fixed mask) sends its mask once per orientation and then only the data
  owner's x-sized message per product, exact throughout, with the work done ahead by the data
  owner and the dealer (also when the input's shape changes between products).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role

#: (data owner's x, model owner's w) shapes; the last pair has weights too wide for one limb.
SHAPES = [
    ((2, 16, 24), (24, 8)),
    ((64, 384), (384, 96)),
    ((3, 5, 24), (3, 24, 8)),
    ((7, 40), (40, 6)),
]
WIDE = 3  # index of the pair whose weights reach |w| = 100 (encoded above 2^21)
#: The decrypted product against the product of the encoded inputs: the local truncation is off
#: by at most one unit of 2^-16 (SecureML), plus one for the floor of the decoding.
ATOL = 2 * 2.0**-16


def party(ctx: PartyContext, payload: list[torch.Tensor]) -> dict[str, Any]:
    from secfwt.crypten_compat import crypten
    from secfwt.mpc import owned
    from secfwt.mpc.session import communication_stats

    mine = ctx.role is Role.DATA_OWNER
    out: dict[str, Any] = {"products": [], "exact": [], "narrow": [], "sent": []}
    for i, (shape_x, shape_w) in enumerate(SHAPES):
        x = crypten.cryptensor(
            payload[i] if mine else torch.zeros(shape_x), src=Role.DATA_OWNER.rank
        )
        w = owned.OwnedMatrix.share(
            None if mine else payload[i], owner=Role.MODEL_OWNER.rank, shape=shape_w
        )
        before = communication_stats()["bytes"]
        z = owned.matmul(x, w)
        out["sent"].append(communication_stats()["bytes"] - before)
        # Decrypt by opening the ring value (CrypTen 0.4.1's decode is off by one for some
        # negatives, see secfwt.crypten_compat) and dividing by the scale.
        out["products"].append((z._tensor.reveal().double() / 2**16).tolist())
        w_plain = w.to_mpc()._tensor.reveal()  # the encoded weights, through an ordinary sharing
        if isinstance(crypten.mpc.get_default_provider(), crypten.mpc.provider.TrustedThirdParty):
            raw = crypten.mpc.MPCTensor.from_shares(
                owned.product(x.share, w), precision=0
            )._tensor.reveal()
            out["exact"].append(torch.equal(raw, torch.matmul(x._tensor.reveal(), w_plain)))
        out["narrow"].append(w.narrow)
    return out


def _encoded(t: torch.Tensor) -> torch.Tensor:
    """The value CrypTen shares for ``t``: ``(2^16 t).long()`` truncates toward zero."""
    return torch.trunc(t.double() * 2**16) / 2**16


def _inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(31)
    xs = [torch.rand(sx, generator=gen) * 8 - 4 for sx, _ in SHAPES]
    ws = [torch.rand(sw, generator=gen) * 2 - 1 for _, sw in SHAPES]
    ws[WIDE] = ws[WIDE] * 100
    return xs, ws


@pytest.mark.multiprocess
@pytest.mark.parametrize("provider", [Provider.TTP, Provider.TFP])
def test_owned_matmul_is_exact_and_one_sided(provider: Provider) -> None:
    xs, ws = _inputs()
    results = run_parties(
        party,
        payloads={Role.DATA_OWNER: xs, Role.MODEL_OWNER: ws},
        provider=provider,
        timeout_s=120,
    )
    owner, data = results[Role.MODEL_OWNER].value, results[Role.DATA_OWNER].value
    assert owner["narrow"] == [i != WIDE for i in range(len(SHAPES))]
    for value in (owner, data):
        if provider is Provider.TTP:
            assert value["exact"] == [True] * len(SHAPES)
        for (x, w), got in zip(zip(xs, ws, strict=True), value["products"], strict=True):
            expected = torch.matmul(_encoded(x), _encoded(w))
            torch.testing.assert_close(
                torch.tensor(got, dtype=torch.float64), expected, atol=ATOL, rtol=0
            )
    if provider is Provider.TTP:
        for i, (shape_x, shape_w) in enumerate(SHAPES):
            elems = torch.Size(shape_x).numel() + torch.Size(shape_w).numel()
            # the model owner's count also holds its dealer traffic (the request and C's share)
            assert data["sent"][i] == 8 * elems, (shape_x, shape_w)


def fixed_mask_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Products with frozen (fixed-mask) weights: several inputs per weight, both orientations."""
    from secfwt.crypten_compat import crypten
    from secfwt.mpc import owned
    from secfwt.mpc.session import communication_stats

    mine = ctx.role is Role.DATA_OWNER
    out: dict[str, Any] = {"exact": [], "sent": []}
    ws = [
        owned.OwnedMatrix.share(w, owner=Role.MODEL_OWNER.rank, shape=shape, fixed_mask=True)
        for w, shape in zip(payload["w"], payload["shapes"], strict=True)
    ]
    for i, w in enumerate(ws):
        for oriented in (w, w.t(), w):  # the transpose has a mask of its own
            for rows in ROWS:
                x_in = payload["x"][i][:rows] if mine else torch.zeros(rows, w.shape[0])
                x = crypten.cryptensor(x_in, src=Role.DATA_OWNER.rank)
                before = communication_stats()["bytes"]
                raw = crypten.mpc.MPCTensor.from_shares(
                    owned.product(x.share, oriented), precision=0
                )
                out["sent"].append(communication_stats()["bytes"] - before)
                w_plain = oriented.to_mpc()._tensor.reveal()
                out["exact"].append(
                    torch.equal(raw._tensor.reveal(), torch.matmul(x._tensor.reveal(), w_plain))
                )
    owned.drain()  # both parties; rank 0 also asks the dealer
    return out


#: Rows of x per product: a change of shape discards the work done ahead on both sides alike.
ROWS = (6, 6, 3, 6)


@pytest.mark.multiprocess
def test_fixed_mask_products_are_exact_and_send_the_mask_once() -> None:
    """The weight's mask is opened once per orientation; every product stays exact, also when
    the input's shape changes between products (the work done ahead is then thrown away)."""
    gen = torch.Generator().manual_seed(5)
    ws = [
        torch.rand(24, 24, generator=gen) * 2 - 1,
        torch.rand(40, 40, generator=gen) * 100,
    ]  # narrow, wide
    xs = [torch.rand(max(ROWS), w.shape[0], generator=gen) * 8 - 4 for w in ws]
    shapes = [tuple(w.shape) for w in ws]
    payloads = {
        Role.DATA_OWNER: {"x": xs, "w": [None] * 2, "shapes": shapes},
        Role.MODEL_OWNER: {"x": [None] * 2, "w": ws, "shapes": shapes},
    }
    results = run_parties(fixed_mask_party, payloads=payloads, provider=Provider.TTP, timeout_s=120)
    data = results[Role.DATA_OWNER].value
    assert all(results[Role.MODEL_OWNER].value["exact"]) and all(data["exact"])
    sent, k = data["sent"], 0
    for w in ws:
        n = w.shape[0]
        for first_use in (True, True, False):  # w (first), w.t() (first), w again
            for j, rows in enumerate(ROWS):
                # CrypTen counts what a party sends plus what it receives: e (rows x n) out,
                # d (n x n) in at the first product of each orientation only
                expected = 8 * (rows * n + (n * n if first_use and j == 0 else 0))
                assert sent[k] == expected, (tuple(w.shape), first_use, j, sent[k], expected)
                k += 1
