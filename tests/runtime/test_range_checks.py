"""The guard against failed truncations: rows whose secure values left the value range are found
(one revealed bit per row) and computed again; the LM head's product with headroom."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role
from tests.conftest import data_owner_result

pytestmark = pytest.mark.multiprocess

#: What a failed 2-party truncation adds to a value: 2^64 / 2^16 / 2^16 (real units).
FAILURE = 2.0**32


def _party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    from secfwt.crypten_compat import crypten
    from secfwt.mpc import owned
    from secfwt.mpc.disclosure import DisclosureTerms, Revealable
    from secfwt.mpc.nonlinear import rows_out_of_range
    from secfwt.runtime.range_checks import OUTPUT_BOUND, RANGE_BOUND, RangeChecks
    from secfwt.runtime.session import PartySession

    both = [Role.MODEL_OWNER, Role.DATA_OWNER]
    terms = DisclosureTerms.of(
        [(Revealable.RANGE_CHECK, both), (Revealable.VERIFY_OUTPUTS, [Role.DATA_OWNER])]
    )
    sess = PartySession(role=ctx.role, terms=terms, audit_path=None)
    do = Role.DATA_OWNER
    # (6, 3, 4): shared values, a public massive activation (in range) and two failures (public
    # offsets stand for them: a share may not exceed 4096)
    clean, massive, failures = payload["clean"], payload["massive"], payload["failures"]

    def shared(rows: list[int], offset: torch.Tensor) -> Any:
        ix = torch.tensor(rows)
        value = clean[ix] if ctx.role is do else None
        x = sess.share(value, owner=do, shape=(len(rows), 3, 4), name="prefix")
        return x + (massive + offset)[ix]

    flags = rows_out_of_range(shared(list(range(6)), failures), RANGE_BOUND).get_plain_text()
    # ring values at the bound's edges and the ring's ends, shared as x + m and -m
    ring, mask = payload["ring"], payload["mask"]
    share = ring + mask if ctx.role is Role.MODEL_OWNER else -mask
    edges = crypten.mpc.MPCTensor.from_shares(share, precision=16)
    edge_flags = {
        b: rows_out_of_range(edges, b).get_plain_text() for b in (RANGE_BOUND, OUTPUT_BOUND)
    }
    calls: list[list[int]] = []

    def compute(rows: list[int]) -> Any:
        # a row's first computation is broken where failures say, every later one right
        again = torch.tensor([r in sum(calls, []) for r in range(6)]).view(6, 1, 1)
        calls.append(rows)
        return shared(rows, failures * ~again)

    seen: list[int] = []
    checks = RangeChecks(sess)
    cache = checks.rows(
        compute, n=6, batch=4, what="prefix", bound=RANGE_BOUND, on_chunk=seen.append
    )
    out = sess.discloser.reveal(cache, value=Revealable.VERIFY_OUTPUTS, to=[do])
    recomputed, prefix_calls = checks.recomputed, list(calls)
    # as a step's guard: all rows in one batch (their first computation broken again)
    calls.clear()
    guard = checks.guard(what="upper layers", bound=RANGE_BOUND)
    again = sess.discloser.reveal(guard(compute, 6), value=Revealable.VERIFY_OUTPUTS, to=[do])
    guard_calls = list(calls)
    # the LM head's product with headroom against the plain product
    w_plain, h = payload["w"], payload["h"]
    w = owned.OwnedMatrix.share(
        w_plain if ctx.role is Role.MODEL_OWNER else None, owner=0, shape=(8, 5), fixed_mask=True
    )
    hs = sess.share(h if ctx.role is do else None, owner=do, shape=(2, 8), name="h")
    y = owned.matmul(hs, w, headroom_bits=4)
    y_plain = sess.discloser.reveal(y, value=Revealable.VERIFY_OUTPUTS, to=[do])
    crypten.communicator.get().barrier()
    if ctx.role is not do:
        return None
    return {
        "flags": flags,
        "edge_flags": edge_flags,
        "calls": prefix_calls,
        "cache": out,
        "recomputed": recomputed,
        "again": again,
        "guard_calls": guard_calls,
        "total": checks.recomputed,
        "seen": seen,
        "y": y_plain,
    }


def _edge_rows(bound: float, *, g: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """Rows of 8 ring values (16 fractional bits) and whether each has a value beyond
    ``bound``: in-range values at up to 1/256 of the bound below it, values just beyond it and
    at the ring's ends (the garbage a failed truncation may leave anywhere)."""
    t = round(bound * 2**16)
    near = t - (t >> 8)  # the test's resolution below the bound: never flagged
    specials = [near, -near, 0, t + 1, -t - 1, 2**63 - 1, -(2**63), -(2**63) + t, 2**63 - t]
    rows = torch.randint(-near, near, (len(specials), 8), generator=g)
    rows[:, 3] = torch.tensor(specials)
    return rows, [int(v > t or v < -t) for v in specials]


def test_failed_rows_are_found_and_computed_again() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 3, 4, generator=g) * 100
    massive = torch.zeros(6, 3, 4)
    massive[2, 0, 0] = 2.4e4  # SmolLM2's massive activation is in range
    failures = torch.zeros(6, 3, 4)
    failures[1, 2, 3], failures[4, 0, 1] = FAILURE, -FAILURE
    h = torch.randn(2, 8, generator=g) * 3
    w = torch.randn(8, 5, generator=g)
    from secfwt.runtime.range_checks import OUTPUT_BOUND, RANGE_BOUND

    edges = {b: _edge_rows(b, g=g) for b in (RANGE_BOUND, OUTPUT_BOUND)}
    ring = torch.cat([edges[RANGE_BOUND][0], edges[OUTPUT_BOUND][0]])
    mask = torch.randint(-(2**63), 2**63 - 1, ring.shape, generator=g, dtype=torch.long)
    payload = {"clean": clean, "massive": massive, "failures": failures, "h": h, "w": w}
    got = data_owner_result(_party, {**payload, "ring": ring, "mask": mask})
    assert got["flags"].tolist() == [0, 1, 0, 0, 1, 0]
    n = len(edges[RANGE_BOUND][1])
    for b, part in ((RANGE_BOUND, slice(0, n)), (OUTPUT_BOUND, slice(n, None))):
        assert got["edge_flags"][b][part].tolist() == edges[b][1], b
    # rows 0-3 and 4-5 in the first pass, then only the two broken rows, once
    assert got["calls"] == [[0, 1, 2, 3], [4, 5], [1, 4]] and got["recomputed"] == 2
    assert got["seen"] == [4, 6]
    assert (got["cache"].double() - (clean + massive).double()).abs().max() < 1e-2
    assert got["guard_calls"] == [[0, 1, 2, 3, 4, 5], [1, 4]] and got["total"] == 4
    assert (got["again"].double() - (clean + massive).double()).abs().max() < 1e-2
    # x at 12 fractional bits: |error| <= 8 * 2^-12 * max|w| plus the product's last bit
    assert (got["y"].double() - (h @ w).double()).abs().max() < 8 * 2**-12 * w.abs().max() + 1e-3
