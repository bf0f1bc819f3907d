"""CrypTen's private x private matmul with the ring-matmul patch (:mod:`secfwt.mpc.engine`).

One TTP session (model owner, data owner, dealer) checks that

* the product decrypts to the float product within fixed-point tolerance;
* the untruncated Beaver product opens to exactly ``torch.matmul`` of the encoded int64
  inputs, so every int64 product in the protocol (the three Beaver terms and the dealer's
  ``c = a @ b``) was exact;
* every matmul the protocol ran on real share tensors went through ``ring_matmul``, which
  agreed bit for bit with torch's int64 matmul (and with the forced limb path) on them, each
  party ran exactly two of them per product (secfwt's Beaver, :mod:`secfwt.mpc.beaver`: no
  third product on rank 0, and the TTP client on rank 1 no longer multiplies to learn the
  triple size);
* with the patch switched off the same checks hold and no matmul goes through the patch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role

#: (data owner's x, model owner's w) shapes.
SHAPES = [((2, 16, 24), (24, 8)), ((64, 384), (384, 96))]
#: Local matmuls per private x private product and party in secfwt's Beaver protocol
#: (``secfwt.mpc.beaver``): epsilon @ b_i and x_i @ delta. CrypTen's own runs three on rank 0.
BEAVER_MATMULS = 2


def _install_spy(checks: list[bool]) -> None:
    """Wrap the ring_matmul that the engine calls: record whether each call on real share
    tensors matched torch's int64 matmul and the forced limb path bit for bit."""
    from secfwt.mpc import engine
    from secfwt.mpc.ring import MAX_EXACT_K, _ring_matmul

    real = engine.ring_matmul

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real(a, b)
        expected = torch.matmul(a, b)
        forced = _ring_matmul(a, b, max_k=MAX_EXACT_K)
        same = torch.equal(out, expected) and torch.equal(forced, expected)
        checks.append(a.dtype == torch.int64 and same)
        return out

    engine.ring_matmul = spy  # type: ignore[assignment]


def _one_product(x_in: torch.Tensor, w_in: torch.Tensor, checks: list[bool]) -> dict[str, Any]:
    from crypten.mpc.primitives import beaver

    from secfwt.crypten_compat import crypten

    x = crypten.cryptensor(x_in, src=Role.DATA_OWNER.rank)
    w = crypten.cryptensor(w_in, src=Role.MODEL_OWNER.rank)
    before = len(checks)
    z = x.matmul(w)
    spied = len(checks) - before
    # Decrypt by opening the ring value and dividing by the scale. CrypTen 0.4.1's
    # get_plain_text (FixedPointEncoder.decode divides negatives by scale - 1) returns x - 1
    # for about |x| / 2^16 of negative values, which would make this check flaky.
    product = z._tensor.reveal().double() / z.encoder.scale
    raw = beaver.matmul(x._tensor, w._tensor).reveal()  # untruncated, scale 2^32, int64
    exact = torch.equal(raw, torch.matmul(x._tensor.reveal(), w._tensor.reveal()))
    # Plain lists: tensors put on the launcher's result queue are shared by file descriptor
    # and the party may exit before the parent has fetched them.
    return {"product": product.tolist(), "exact": exact, "spied": spied}


def party(ctx: PartyContext, payload: list[torch.Tensor]) -> dict[str, Any]:
    """Each party feeds only its own tensors; the other side's argument is a same-shape stub."""
    from secfwt.mpc.engine import ring_matmul_enabled, set_ring_matmul

    checks: list[bool] = []
    _install_spy(checks)
    mine = ctx.role is Role.DATA_OWNER
    results: dict[str, Any] = {"enabled_by_default": ring_matmul_enabled(), "on": [], "off": []}
    for mode in ("on", "off"):
        set_ring_matmul(mode == "on")
        for i, (shape_x, shape_w) in enumerate(SHAPES):
            x_in = payload[i] if mine else torch.zeros(shape_x)
            w_in = torch.zeros(shape_w) if mine else payload[i]
            results[mode].append(_one_product(x_in, w_in, checks))
    set_ring_matmul(True)
    results["all_spied_calls_bit_identical"] = all(checks)
    return results


@pytest.mark.multiprocess
def test_private_matmul_is_exact_with_ring_matmul() -> None:
    gen = torch.Generator().manual_seed(2024)
    xs = [torch.rand(sx, generator=gen) * 2 - 1 for sx, _ in SHAPES]
    ws = [torch.rand(sw, generator=gen) * 2 - 1 for _, sw in SHAPES]
    results = run_parties(
        party,
        payloads={Role.DATA_OWNER: xs, Role.MODEL_OWNER: ws},
        provider=Provider.TTP,
        timeout_s=120,
    )
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        value = results[role].value
        assert value["enabled_by_default"]
        assert value["all_spied_calls_bit_identical"]
        for mode, spied in (("on", BEAVER_MATMULS), ("off", 0)):
            for (x, w), got in zip(zip(xs, ws, strict=True), value[mode], strict=True):
                expected = torch.matmul(x, w)
                assert got["exact"], (role, mode, x.shape)
                # 3 on rank 0 with CrypTen's protocol; 3 on rank 1 if its TTP client multiplied
                # to learn a size
                assert got["spied"] == spied, (role, mode, x.shape)
                product = torch.tensor(got["product"], dtype=torch.float64)
                torch.testing.assert_close(product, expected.double(), atol=1e-2, rtol=0)


def test_broadcast_shapes_matches_torch() -> None:
    """secfwt.mpc.beaver sizes triples with a plain-Python broadcast (see its docstring)."""
    import itertools

    from secfwt.mpc.beaver import broadcast_shapes

    dims = [(), (1,), (3,), (2, 1), (2, 3), (1, 3), (4, 2, 3), (4, 1, 1), (5, 3)]
    for a, b in itertools.product(dims, repeat=2):
        try:
            expected = torch.broadcast_shapes(a, b)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                broadcast_shapes(a, b)
            continue
        assert broadcast_shapes(a, b) == expected, (a, b)
