"""Safe Delta (:mod:`.safe_delta`) on secret shares, before anything is released.

The tuned weight delta stays secret-shared between the two computing parties; the model owner
holds ``U`` (upper Cholesky factor of its damped ``H^-1``, from its own aligned model on public
safety data) in the clear; only the corrected delta leaves the function, still as shares. What
depends on ``U`` alone is the model owner's plaintext and enters the MPC only through products
with owner-held matrices (:mod:`secfwt.mpc.owned`: the other party learns their shapes only):

* the selection order (curvature ``1/d_j^2`` ascending, ties by flat index) is a COLUMN order
  plus the rows within it, so the cumulative cost in that order is linear in the cost matrix
  ``c`` (rows x cols)::

      cum = 1 (1^T c) P + (L c) M + c N

  with ``L`` the public strictly lower triangular ones (rows above in the same column), ``P`` =
  [group of j' before group of j], ``M`` = [same group], ``N`` = [same group, j' <= j] (a group
  is a set of columns of equal curvature; without ties ``M = N = I``). ``P``, ``M``, ``N`` are the
  owner's 0/1 matrices, stacked into one owned product at integer scale (exact);
* the per-column weights ``S_j = sqrt((1/d_j^2) / budget)`` (an owned diagonal product), so
  ``z = delta S`` and ``c = z^2`` is the cost in budgets: an entry is kept iff ``cum <= 1``;
* the never-kept tail (the last 15% of the order) is positional: the model owner adds a
  penalty of 8 budgets to its own share of ``cum`` there (no message at all);
* compensation: column by column, ``t_j = keep_j * (delta_j - v_j)`` (one Beaver product with
  the secret 0/1 bits) is added to the corrected delta ``v`` and ``t_j (U_jk / U_jj)`` to every
  later column ``k`` (owned products with row ``j`` of ``U``, in SparseGPT's lazy batches of
  :data:`LAZY` columns), since a kept entry's error ``e = (w - q) / d_j = -t_j / U_jj``.

Secure operations: per entry of the selection 2 owned products, 2 Beaver products (the clip's
select and the square) and 3 exact 64-bit comparisons (:func:`greater_than`), all batched (20
rounds in all); then per column one Beaver product of ``rows`` elements and one small owned
product, a round each: ``2 cols`` sequential rounds, the bulk of the time.

**Fixed point.** The cost needs more resolution than CrypTen's 16 fractional bits (kept entries
cost about ``budget / kept`` each, below 2^-16 budgets). ``z`` is computed with
:data:`S_BITS` bits of ``S`` and :func:`z_bits` fractional bits (20 for a 576 x 576 layer),
``c = z^2`` exactly at twice that, and the comparisons are exact in the 64-bit ring. ``|z|`` is
first clipped to :data:`Z_CLIP` (``c <= 4``): an entry with ``c > 1`` is never kept and neither
is any later one, so the clip leaves the kept set unchanged and bounds ``cum`` by
``4 rows cols`` budgets, which :func:`z_bits` keeps inside the ring. The only truncation of
the selection is ``z``'s (SecureML's local truncation fails with probability
``|value| / 2^64``, here ``|z| 2^-28``: for the kept entries, ``|z| <= 1``, at most
``sqrt(kept) 2^-28`` expected failures, 9e-7 for the example job's layer); a failure's garbage
is clipped to a cost of 4 budgets, so it can only end the kept prefix early (keep less), never
keep more. The corrected delta is carried with :data:`V_BITS` fractional bits and
``U_jk / U_jj`` with 16, so each propagated term's truncation fails with probability
``|t U_jk / U_jj| 2^-24`` (``t`` is small: a kept entry's cost fits the budget). An entry whose
cumulative cost lies within about 1e-4 budgets of the budget may be decided differently than in
float64; elsewhere the kept set is the plaintext's and the result differs by the fixed point's
rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ConfigError, ModelError, ProtocolError
from secfwt.mpc import beaver, owned
from secfwt.mpc.nonlinear import FRAC_BITS, greater_than
from secfwt.mpc.ring import NARROW_BOUND
from secfwt.tuning.safe_delta import (
    DEFAULT_BUDGET,
    SELECTION_BLOCK,
    block_budget,
    check_budget,
    never_kept,
    selection_order,
)

V_BITS = 24  # fractional bits of the corrected delta during the compensation
S_BITS = 20  # fractional bits of the owner's column weights S_j
Z_CLIP = 2.0  # |z| clipped here: c = z^2 <= 4 budgets (module doc)
PENALTY = 8  # budgets added to the cumulative cost of the never-kept tail (> 1 + anything)
#: Columns propagated one by one before a block update (same result): about sqrt(cols) balances
#: the dealer's per-column outer products against the block updates (32: half the bytes of 128).
LAZY = 32


@dataclass(frozen=True)
class SharesResult:
    """The corrected delta and the selection, both secret-shared."""

    delta: Any  # MPCTensor (out, in), 16 fractional bits: the Safe Delta weight minus aligned
    kept: Any  # MPCTensor (out, in), integer 0/1 (precision 0): which entries were kept


def z_bits(rows: int, cols: int) -> int:
    """Fractional bits of ``z`` for a ``rows x cols`` block: ``cum <= 4 rows cols + PENALTY``
    budgets at twice these bits must stay below 2^62 (public: it depends on the shape only)."""
    return min(20, math.floor((62 - math.log2(4 * rows * cols + PENALTY)) / 2))


def cumulative_operator(d: torch.Tensor) -> torch.Tensor:
    """The model owner's stacked ``[P; M; N]`` (3 cols, cols), int64 0/1 (module doc), so that
    ``[1 (1^T c), L c, c] @ it`` is the cumulative cost in :func:`selection_order`."""
    curvature = 1.0 / d**2  # (cols,)
    ranks = torch.unique(curvature, return_inverse=True)[1]  # (cols,) group rank
    before = ranks[:, None] < ranks[None, :]  # (cols, cols): P
    same = ranks[:, None] == ranks[None, :]  # M
    upto = same & torch.ones_like(same).triu()  # N: j' <= j in the same group
    return torch.cat([before, same, upto]).long()


def cumulative_cost(cost: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """``cum`` (rows, cols) from ``cost`` (rows, cols) and :func:`cumulative_operator`: the
    linear map the parties apply to shares (local sums, then one owned product)."""
    return _stacked(cost) @ operator


def _stacked(cost: torch.Tensor) -> torch.Tensor:
    """``[1 (1^T c), L c, c]`` (rows, 3 cols): local on shares (public linear maps, exact in the
    ring)."""
    above = torch.cumsum(cost, dim=0) - cost  # (rows, cols): L c, rows above in the column
    return torch.cat([cost.sum(0, keepdim=True).expand_as(cost), above, cost], dim=1)


def tail_mask(d: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, cols) bool: the entries at the end of the selection order that are never kept."""
    order = selection_order(d, rows)
    tail = torch.zeros(order.numel(), dtype=torch.bool)
    tail[order[order.numel() - never_kept(order.numel()) :]] = True
    return tail.reshape(rows, d.numel())


def _owned(value: torch.Tensor | None, shape: tuple[int, ...], owner: int) -> owned.OwnedMatrix:
    """An owned matrix whose owner gives its ring integers directly (any scale)."""
    size = torch.Size(shape)
    if value is None:
        return owned.OwnedMatrix(owner=owner, shape=size, encoded=None)
    narrow = bool(value.abs().max() < NARROW_BOUND) if value.numel() else True
    return owned.OwnedMatrix(owner=owner, shape=size, encoded=value, narrow=narrow)


def _part(m: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    return None if m is None else m[rows, cols]


def _fixed(x: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(x.double() * 2**bits).long()


def _times_bits(bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shares of ``bits * x`` for integer 0/1 ``bits``: exact, no truncation (one Beaver round)."""
    return beaver.product_shares(bits, x, op="mul", local=torch.mul)


def _trunc(s: torch.Tensor, bits: int) -> torch.Tensor:
    """CrypTen's 2-party local truncation by 2^bits (SecureML)."""
    return s.div(2**bits, rounding_mode="trunc")


def _check(delta: Any, u: torch.Tensor | None, owner: int, s: float) -> tuple[int, int]:
    check_budget(s)
    if s == 0:
        raise ConfigError(
            "--budget = 0 keeps no delta at all: release the aligned weights instead of running "
            "Safe Delta on shares (which needs a budget > 0 to scale the costs)"
        )
    if not isinstance(delta, crypten.mpc.MPCTensor) or delta.dim() != 2:
        raise ModelError("safe_delta_shares needs the delta as a 2-D crypten MPCTensor")
    if delta.encoder.scale != 2**FRAC_BITS:
        raise ModelError(f"the delta must have {FRAC_BITS} fractional bits")
    comm = crypten.communicator.get()
    if comm.get_world_size() != 2 or beaver.dealer_generator() is None:
        raise ProtocolError("Safe Delta on shares needs 2 computing parties and the TTP dealer")
    rows, cols = delta.size()
    if comm.get_rank() == owner:
        if u is None or u.shape != (cols, cols) or not torch.equal(u, u.triu()):
            got = None if u is None else tuple(u.shape)
            raise ModelError(
                f"the model owner's U must be upper triangular ({cols}, {cols}): {got}"
            )
        if not bool((torch.diag(u) > 0).all()):
            raise ModelError("the model owner's U has a non-positive diagonal entry")
    return rows, cols


def _keep_bits(
    r: torch.Tensor, u_block: torch.Tensor | None, *, s: float, owner: int, rank: int
) -> torch.Tensor:
    """Shares of the integer 0/1 kept mask of one column block from shares ``r`` (rows, nb) of
    its current delta at :data:`V_BITS` bits; ``u_block`` the owner's diagonal block of ``U``."""
    rows, nb = r.shape
    zb = z_bits(rows, nb)
    mine = rank == owner
    d = None if u_block is None else torch.diag(u_block).double()  # (nb,) owner only
    weights = None
    if d is not None:  # S_j = sqrt((1 / d_j^2) / budget) on the diagonal
        weights = torch.diag(_fixed(torch.sqrt(1.0 / d**2 / block_budget(d, rows, s)), S_BITS))
    z = owned.product(_trunc(r, V_BITS - FRAC_BITS), _owned(weights, (nb, nb), owner))
    z = _trunc(z, FRAC_BITS + S_BITS - zb)  # (rows, nb) at zb bits
    clip = round(Z_CLIP * 2**zb)
    out = greater_than(torch.stack([z, -z]), clip)  # (2, rows, nb): z > clip, -z > clip
    # outside: z -> +-clip, i.e. z + (above - below) clip - (above + below) z
    z = z - _times_bits(out[0] + out[1], z) + (out[0] - out[1]) * clip
    cost = _times_bits(z, z)  # (rows, nb) at 2 zb bits, exact: budgets
    operator = None if d is None else cumulative_operator(d)
    cum = owned.product(_stacked(cost), _owned(operator, (3 * nb, nb), owner))  # (rows, nb)
    one = 2 ** (2 * zb)
    if rank == 0:
        cum = cum - one  # cum - budget
    if mine:
        assert d is not None
        cum = cum + tail_mask(d, rows).long() * (PENALTY * one)
    over = greater_than(cum, 0)  # (rows, nb) integer bits
    return (1 if rank == 0 else 0) - over


def safe_delta_shares(
    delta: Any,
    u: torch.Tensor | None,
    *,
    owner: int,
    s: float = DEFAULT_BUDGET,
    block: int = SELECTION_BLOCK,
) -> SharesResult:
    """Safe Delta of one Linear on shares: ``delta`` (out, in) the secret tuned-minus-aligned
    weight (MPCTensor), ``u`` the model owner's :func:`~.safe_delta.inverse_cholesky` of its
    Hessian (plaintext on rank ``owner``, None on the other party). Both parties call it with
    the same ``s`` and ``block``; the result equals
    ``safe_delta_layer(W0, W0 + delta, H, s=s, block=block).weight - W0`` (module doc)."""
    rows, cols = _check(delta, u, owner, s)
    rank = crypten.communicator.get().get_rank()
    mine = rank == owner
    # the owner's U_jk / U_jj at 16 bits (None on the other party)
    ratio = None if u is None or not mine else _fixed(u.double() / torch.diag(u)[:, None], 16)
    target = delta.share << (V_BITS - FRAC_BITS)  # (rows, cols) at V_BITS
    v = torch.zeros_like(target)  # the corrected delta, V_BITS
    kept = torch.zeros_like(target)
    for b1 in range(0, cols, block):
        b2 = min(b1 + block, cols)
        keep = _keep_bits(
            target[:, b1:b2] - v[:, b1:b2],
            _part(u if mine else None, slice(b1, b2), slice(b1, b2)),
            s=s,
            owner=owner,
            rank=rank,
        )
        kept[:, b1:b2] = keep
        for l1 in range(b1, b2, LAZY):
            l2 = min(l1 + LAZY, b2)
            taken = torch.zeros(rows, l2 - l1, dtype=torch.long)  # (rows, l2 - l1)
            for j in range(l1, l2):
                t = _times_bits(keep[:, j - b1], target[:, j] - v[:, j])  # (rows,)
                v[:, j] += t
                taken[:, j - l1] = t
                if j + 1 < l2:
                    row = _part(ratio, slice(j, j + 1), slice(j + 1, l2))
                    step = owned.product(t[:, None], _owned(row, (1, l2 - j - 1), owner))
                    v[:, j + 1 : l2] += _trunc(step, FRAC_BITS)
            if l2 < cols:
                rest = _part(ratio, slice(l1, l2), slice(l2, cols))
                step = owned.product(taken, _owned(rest, (l2 - l1, cols - l2), owner))
                v[:, l2:] += _trunc(step, FRAC_BITS)
    out = crypten.mpc.MPCTensor.from_shares(_trunc(v, V_BITS - FRAC_BITS), precision=FRAC_BITS)
    return SharesResult(delta=out, kept=crypten.mpc.MPCTensor.from_shares(kept, precision=0))


__all__ = [
    "SharesResult",
    "cumulative_cost",
    "cumulative_operator",
    "safe_delta_shares",
    "tail_mask",
    "z_bits",
]
