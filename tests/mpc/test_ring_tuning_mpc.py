"""The int64 matmul choice in real party processes (model owner, data owner, TTP dealer).

One session per way, forced with ``SECFWT_RING_MATMUL`` in every process's environment (the
dealer's too): a private x private Beaver product and owner-held products (narrow frozen
weights, whose fixed mask the data owner and the dealer multiply with a prepared operand, and
wide weights) are opened untruncated, so each is exactly ``torch.matmul`` of the encoded
inputs in the ring, whichever way the parties computed it; both sessions open the same bits;
every process records every kind it ran under the forced way. The dealer's own traffic count
equals what the computing parties counted at their ends of its messages.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.errors import ConfigError
from secfwt.mpc.launcher import PartyContext, PartyResult, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role

pytestmark = pytest.mark.multiprocess

#: Above SMALL_WORK (2^18 multiply-adds), so every product is routed by the chooser.
X, W = (64, 128), (128, 64)
#: Kinds of product each process runs: Beaver's local products and the dealer's triple are
#: general; the owner multiplies its own narrow weights (narrow) and wide ones (general); the
#: data owner and the dealer multiply a frozen weight's fixed mask (prepared).
KINDS = {
    Role.MODEL_OWNER: {"general", "narrow"},
    Role.DATA_OWNER: {"general", "prepared"},
    Role.DEALER: {"general", "prepared"},
}


def party(ctx: PartyContext, payload: dict[str, torch.Tensor | None]) -> dict[str, Any]:
    from crypten.mpc.primitives import beaver

    from secfwt.crypten_compat import crypten
    from secfwt.mpc import owned

    x = crypten.cryptensor(
        payload["x"] if ctx.role is Role.DATA_OWNER else torch.zeros(X), src=Role.DATA_OWNER.rank
    )
    mine = ctx.role is Role.MODEL_OWNER
    w_plain = crypten.cryptensor(payload["w"] if mine else torch.zeros(W), src=0)
    opened: list[list[int]] = []
    exact: list[bool] = []

    def check(raw: torch.Tensor, w_encoded: torch.Tensor) -> None:
        opened.append(raw.tolist())
        exact.append(torch.equal(raw, torch.matmul(x._tensor.reveal(), w_encoded)))

    check(beaver.matmul(x._tensor, w_plain._tensor).reveal(), w_plain._tensor.reveal())
    frozen = owned.OwnedMatrix.share(payload["w"], owner=0, shape=W, fixed_mask=True)
    wide = owned.OwnedMatrix.share(payload["wide"], owner=0, shape=W)
    for w in (frozen, frozen, wide):  # the frozen weight's mask is opened once, then reused
        raw = crypten.mpc.MPCTensor.from_shares(owned.product(x.share, w), precision=0)
        check(raw._tensor.reveal(), w.to_mpc()._tensor.reveal())
    owned.drain()
    return {"opened": opened, "exact": exact}


def _session(
    monkeypatch: pytest.MonkeyPatch, way: str, device: torch.device | None = None
) -> dict[Role, PartyResult]:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(X, generator=gen) * 8 - 4
    w = torch.rand(W, generator=gen) * 2 - 1  # narrow: |encoded| < 2^21
    wide = w * 100  # encoded above 2^21: a full ring matmul on the owner
    monkeypatch.setenv("SECFWT_RING_MATMUL", way)
    return run_parties(
        party,
        payloads={
            Role.DATA_OWNER: {"x": x, "w": None, "wide": None},
            Role.MODEL_OWNER: {"x": None, "w": w, "wide": wide},
        },
        provider=Provider.TTP,
        timeout_s=180,
        device=device,
    )


def test_forced_ways_open_identical_exact_products_and_are_recorded(monkeypatch) -> None:
    opened = {}
    for way in ("torch", "limbs"):
        results = _session(monkeypatch, way)
        for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
            assert results[role].value["exact"] == [True] * 4, (way, role)
        opened[way] = results[Role.DATA_OWNER].value["opened"]
        assert results[Role.MODEL_OWNER].value["opened"] == opened[way]
        for role, kinds in KINDS.items():
            recs = results[role].ring_matmul
            assert {r["kind"] for r in recs} == kinds, (way, role, recs)
            assert all(r["method"] == way and r["source"] == "forced" for r in recs), recs
            assert all(r["calls"] >= 1 for r in recs)
        _check_dealer_traffic(results)
    assert opened["torch"] == opened["limbs"]


def test_run_device_reaches_every_process_and_opens_the_same_bits(monkeypatch) -> None:
    """``run.device``'s plumbing with the host standing in for the GPU (this machine has none):
    every process, the dealer's included, computes every kind of product through the device
    way (operands copied to the device, limbs there, result back) and the opened products are
    the bits of the torch session's."""
    host = _session(monkeypatch, "torch")[Role.DATA_OWNER].value["opened"]
    results = _session(monkeypatch, "device", device=torch.device("cpu"))
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        assert results[role].value["exact"] == [True] * 4, role
        assert results[role].value["opened"] == host, role
    for role, kinds in KINDS.items():
        recs = results[role].ring_matmul
        assert {r["kind"] for r in recs} == kinds, (role, recs)
        assert all(r["method"] == "device" and r["calls"] >= 1 for r in recs), recs
    # measured: each process times torch against the device at the first product of a class,
    # and checks the device's bits against torch's there
    results = _session(monkeypatch, "1", device=torch.device("cpu"))
    assert results[Role.DATA_OWNER].value["opened"] == host
    for role, kinds in KINDS.items():
        recs = results[role].ring_matmul
        assert {r["kind"] for r in recs} == kinds, (role, recs)
        for r in recs:
            assert r["source"] == "measured" and r["device"] == "cpu", r
            assert r["torch_ms"] > 0 and r["device_ms"] > 0 and r["limbs_ms"] is None, r
            assert r["clock"] == "perf_counter", r


def test_forcing_the_device_way_without_a_device_is_refused_before_any_party(monkeypatch) -> None:
    monkeypatch.setenv("SECFWT_RING_MATMUL", "device")
    with pytest.raises(ConfigError, match="SECFWT_RING_MATMUL=device .* set run.device"):
        run_parties(party, payloads={}, provider=Provider.TTP, timeout_s=10)


def _check_dealer_traffic(results: dict[Role, PartyResult]) -> None:
    """The dealer counted its messages in its own process; the computing parties counted the
    same messages at their ends (rank 0 asks, and receives every answer)."""
    dealer = results[Role.DEALER]
    owners = [results[r].traffic for r in (Role.MODEL_OWNER, Role.DATA_OWNER)]
    assert dealer.rounds == dealer.traffic["served"] == sum(t["dealer_requests"] for t in owners)
    assert dealer.rounds > 0
    assert dealer.bytes_sent == dealer.traffic["sent"] == sum(t["dealer_bytes"] for t in owners)
    assert dealer.traffic["received"] == sum(t["dealer_sent"] for t in owners) > 0
    assert results[Role.DATA_OWNER].traffic["dealer_requests"] == 0  # only rank 0 asks
