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
    from secfwt.runtime.range_checks import RANGE_BOUND, RangeChecks
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
        "calls": prefix_calls,
        "cache": out,
        "recomputed": recomputed,
        "again": again,
        "guard_calls": guard_calls,
        "total": checks.recomputed,
        "seen": seen,
        "y": y_plain,
    }


def test_failed_rows_are_found_and_computed_again() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 3, 4, generator=g) * 100
    massive = torch.zeros(6, 3, 4)
    massive[2, 0, 0] = 2.4e4  # SmolLM2's massive activation is in range
    failures = torch.zeros(6, 3, 4)
    failures[1, 2, 3], failures[4, 0, 1] = FAILURE, -FAILURE
    h = torch.randn(2, 8, generator=g) * 3
    w = torch.randn(8, 5, generator=g)
    payload = {"clean": clean, "massive": massive, "failures": failures, "h": h, "w": w}
    got = data_owner_result(_party, payload)
    assert got["flags"].tolist() == [0, 1, 0, 0, 1, 0]
    # rows 0-3 and 4-5 in the first pass, then only the two broken rows, once
    assert got["calls"] == [[0, 1, 2, 3], [4, 5], [1, 4]] and got["recomputed"] == 2
    assert got["seen"] == [4, 6]
    assert (got["cache"].double() - (clean + massive).double()).abs().max() < 1e-2
    assert got["guard_calls"] == [[0, 1, 2, 3, 4, 5], [1, 4]] and got["total"] == 4
    assert (got["again"].double() - (clean + massive).double()).abs().max() < 1e-2
    # x at 12 fractional bits: |error| <= 8 * 2^-12 * max|w| plus the product's last bit
    assert (got["y"].double() - (h @ w).double()).abs().max() < 8 * 2**-12 * w.abs().max() + 1e-3
