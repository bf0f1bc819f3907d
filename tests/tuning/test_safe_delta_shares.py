"""Safe Delta on shares (secfwt.tuning.safe_delta_shares) against the float64 plaintext.

A real 2-party CrypTen session under TTP: the data owner inputs the delta (in a job it comes
out of the MPC tuning already shared), the model owner its ``U``; the corrected delta and the
kept mask are opened here for the comparison only. Budgets are chosen so that no cumulative cost
lies within :data:`MARGIN` budgets of the budget (checked on the plaintext, so a changed input
fails loudly instead of flaking): there the kept set must be exactly the plaintext's and the
corrected delta within :data:`ATOL`.
"""

from __future__ import annotations

import pytest
import torch

from secfwt.bench.cases.safe_delta import budget_distance, shared_value
from secfwt.errors import ConfigError
from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from secfwt.tuning import safe_delta as sd
from secfwt.tuning.safe_delta_shares import cumulative_cost, cumulative_operator, tail_mask

ROWS, COLS = 24, 32
#: (budget s, selection block, whether a few entries are huge): a few percent kept, about
#: half, everything outside the tail; two blocks; entries whose costs wrap the ring unclipped.
CASES = [(1.0, 2048, False), (8.0, 2048, False), (100.0, 2048, False), (10.0, 16, False)]
CASES.append((10.0, 2048, True))
#: Cumulative costs at least this far (in budgets) from the budget: away from ties (module doc).
MARGIN = 1e-3
#: Opened corrected delta against float64: the final truncation to 16 bits (1 unit), the
#: 16-bit U_jk / U_jj and 24-bit carries of the compensation (measured below 1 unit).
ATOL = 2 * 2.0**-16


def _inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Deltas (16-bit values, as shared) and Hessians of correlated random inputs."""
    gen = torch.Generator().manual_seed(5)
    deltas, hessians = [], []
    for _, _, huge in CASES:
        mix = torch.randn(COLS, COLS, generator=gen, dtype=torch.float64)
        x = torch.randn(4, 40, COLS, generator=gen, dtype=torch.float64) @ mix  # correlated
        hessians.append(sd.input_hessian(x, samples=4))
        delta = 0.01 * torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
        if huge:
            delta[3, 5], delta[10, 0], delta[20, 31] = 1000.0, -7000.0, 500.0
        deltas.append(shared_value(delta))
    return deltas, hessians


def party(ctx: PartyContext, payload: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    from secfwt.crypten_compat import crypten
    from secfwt.tuning.safe_delta_shares import safe_delta_shares

    mine = ctx.role is Role.DATA_OWNER
    out = []
    for i, (s, block, _) in enumerate(CASES):
        delta = crypten.cryptensor(
            payload[i] if mine else torch.zeros(ROWS, COLS), src=Role.DATA_OWNER.rank
        )
        res = safe_delta_shares(
            delta, None if mine else payload[i], owner=Role.MODEL_OWNER.rank, s=s, block=block
        )
        out.append(
            {
                "delta": res.delta._tensor.reveal().double() / 2**16,
                "kept": res.kept._tensor.reveal(),
            }
        )
    return out


@pytest.mark.multiprocess
def test_safe_delta_on_shares_matches_plaintext() -> None:
    deltas, hessians = _inputs()
    us = [sd.inverse_cholesky(h) for h in hessians]
    results = run_parties(
        party,
        payloads={Role.DATA_OWNER: deltas, Role.MODEL_OWNER: us},
        provider=Provider.TTP,
        timeout_s=300,
    )
    opened = results[Role.DATA_OWNER].value
    for a, b in zip(opened, results[Role.MODEL_OWNER].value, strict=True):
        assert torch.equal(a["kept"], b["kept"]) and torch.equal(a["delta"], b["delta"])
    kept = []
    for (s, block, _), delta, h, u, got in zip(CASES, deltas, hessians, us, opened, strict=True):
        ref = sd.safe_delta_layer(torch.zeros_like(delta), delta, h, s=s, block=block)
        kept.append(ref.kept)
        assert int(got["kept"].sum()) == ref.kept, (s, block)
        if block >= COLS:  # one block: the mask itself, from the original delta
            assert float(budget_distance(delta, torch.diag(u), s).abs().min()) > MARGIN, (s, block)
            mask, _, _ = sd.selection_mask(delta, torch.diag(u), s)
            assert torch.equal(got["kept"].bool(), mask), (s, block)
        torch.testing.assert_close(got["delta"], ref.weight, atol=ATOL, rtol=0)
    # the cases cover a few kept, about half, and all but the never-kept tail
    assert min(kept) > 0 and max(kept) == ROWS * COLS - sd.never_kept(ROWS * COLS), kept


def test_cumulative_operator_is_the_cumsum_in_selection_order() -> None:
    """The owner's 0/1 operator gives the plaintext's cumulative cost, with curvature ties (equal
    ``d_j``: their entries interleave row by row) and without."""
    gen = torch.Generator().manual_seed(2)
    d = torch.tensor([0.5, 0.2, 0.5, 0.9, 0.2, 0.3], dtype=torch.float64)
    cost = torch.rand(5, d.numel(), generator=gen, dtype=torch.float64)
    for dd in (d, torch.linspace(0.1, 1.0, 6, dtype=torch.float64).flip(0)):
        order = sd.selection_order(dd, cost.shape[0])
        expected = torch.empty(cost.numel(), dtype=torch.float64)
        expected[order] = torch.cumsum(cost.flatten()[order], 0)
        got = cumulative_cost(cost, cumulative_operator(dd).double())
        torch.testing.assert_close(got.flatten(), expected, atol=1e-12, rtol=0)
        tail = tail_mask(dd, cost.shape[0]).flatten()
        assert tail[order[-sd.never_kept(cost.numel()) :]].all()
        assert int(tail.sum()) == sd.never_kept(cost.numel())


def test_zero_budget_is_refused_before_any_party_work() -> None:
    from secfwt.tuning.safe_delta_shares import safe_delta_shares

    with pytest.raises(ConfigError, match="budget"):
        safe_delta_shares(None, None, owner=Role.MODEL_OWNER.rank, s=0.0)
