"""Safe Delta on one Linear weight: keep the parts of a fine-tuning delta that cost the least
safety, drop the rest, and compensate what was dropped (Lu et al., ICML 2025, arXiv:2505.12038;
official code github.com/ColinLu50/SafeDelta ``safedelta_runner.py``, adapted from SparseGPT,
Frantar & Alistarh, ICML 2023, arXiv:2301.00774).

Pure tensor maths, no model: :mod:`secfwt.safety.safe_delta_run` feeds it the aligned model's
inputs and writes the result; :mod:`.safe_delta_shares` runs the same maths on secret shares.
For a weight ``W`` (out x in) with aligned value ``W0`` and tuned value ``W1``:

* ``H = (2/N) sum_t x_t x_t^T`` over the aligned layer's inputs on ``N`` safety samples (every
  token of every sample; ``N`` counts samples, as in the official ``add_batch``); a column whose
  ``H`` diagonal is 0 gets 1 there (official ``dead`` rule), then ``1%`` of the mean diagonal is
  added to it (damping).
* ``U`` = upper Cholesky factor of ``H^-1``, ``d_j = U_jj``. Keeping delta entry ``(i, j)`` costs
  ``delta_ij^2 / d_j^2`` (the OBS loss increase, up to the factor 1/2 of the paper's eq.).
* Per block of 2048 columns: entries ordered by curvature ``1/d_j^2``, lowest first (the official
  code orders by this, not by the cost: it is the ratio of the utility gain ``delta^2`` to the
  cost, so the greedy knapsack takes the best ratio first); the last 15% of that order (the
  highest-curvature entries, ``int(0.15 * rows * cols)`` of them) are never kept; the longest
  prefix of the rest whose cumulative cost stays ``<= mean(1/d^2) * (s/2) * (rows/4096)`` is kept
  (set to ``W1``). Ties in curvature (every row of one column) are broken by flat index (a stable
  sort; the official ``torch.argsort`` leaves their order unspecified).
* Columns left to right, SparseGPT's blockwise loop: a kept entry ``q = w1`` replaces the current
  ``w`` and its error ``err = (w - q) / d_j`` is propagated to every later column through row ``j``
  of ``U``; a dropped entry keeps its current (already compensated) value, error 0. So the
  compensation pulls the layer's output on the safety data back towards the aligned one. Each
  column is propagated before the next is chosen (exact OBS; the official code propagates in
  groups of 4 columns and skips the terms inside a group).

Everything runs in float64; the result is cast back to the weight's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from secfwt.errors import ConfigError, ModelError

DEFAULT_BUDGET = 0.1  # s of the paper; the official runs use 0.1-0.11 for Llama-2-7B
DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it (SparseGPT's percdamp)
SELECTION_BLOCK = 2048  # columns selected together (official blocksize)
NEVER_KEPT = 0.15  # highest-curvature fraction of each block that is never kept
REFERENCE_ROWS = 4096  # the budget scales with rows / 4096 (Llama-2-7B's hidden size)
_LAZY = 128  # columns propagated one by one before a block update (speed only, same result)


@dataclass(frozen=True)
class LayerResult:
    """A corrected weight and what the selection did."""

    weight: torch.Tensor  # (out, in), dtype of the aligned weight
    kept: int  # delta entries set to the tuned value
    entries: int  # out * in
    cost: float  # sum of delta^2 / d^2 over the kept entries, all blocks
    budget: float  # sum of the blocks' budgets


def check_budget(s: float) -> float:
    """``s`` (``--budget``) is a finite number >= 0."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s < math.inf):
        raise ConfigError(
            f"--budget = {s!r} must be a finite number >= 0 (the paper's s; about 0.1 keeps most "
            "of a benign delta, 0 keeps none of it)"
        )
    return float(s)


def input_hessian(inputs: torch.Tensor, samples: int) -> torch.Tensor:
    """``(2 / samples) X^T X`` of ``inputs`` (tokens, in), in float64: one sample's (or several
    samples') contribution to ``H``; sum the contributions of all ``samples``."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)  # (T, in)
    return (2.0 / samples) * (x.T @ x)


def inverse_cholesky(hessian: torch.Tensor, *, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damping * mean(diag H) I)^-1`` (in, in), float64,
    after the dead-column rule (module doc)."""
    h = hessian.to(torch.float64).clone()
    cols = h.shape[0]
    if h.shape != (cols, cols) or not torch.isfinite(h).all():
        raise ModelError(f"Hessian of shape {tuple(h.shape)} is not a finite square matrix")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.mean(torch.diag(h)))
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as exc:  # not positive definite even after damping
        raise ModelError(f"the damped Hessian is not positive definite: {exc}") from exc
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def selection_order(d: torch.Tensor, rows: int) -> torch.Tensor:
    """Flat (row-major) indices of a ``(rows, cols)`` block in selection order: curvature
    ``1 / d_j^2`` ascending, ties by flat index. Depends on ``H`` only (the model owner's)."""
    curvature = (1.0 / d**2).expand(rows, d.numel())  # (rows, cols): 1 / d_j^2 on every row
    return torch.argsort(curvature.flatten(), stable=True)


def never_kept(entries: int) -> int:
    """How many entries at the end of the selection order are never kept."""
    return int(NEVER_KEPT * entries)


def block_budget(d: torch.Tensor, rows: int, s: float) -> float:
    """The block's cost budget ``mean(1 / d^2) * (s / 2) * (rows / 4096)``."""
    return float(torch.mean(1.0 / d**2)) * (s / 2) * (rows / REFERENCE_ROWS)


def selection_mask(
    delta: torch.Tensor, d: torch.Tensor, s: float
) -> tuple[torch.Tensor, float, float]:
    """Which entries of one column block to keep, their total cost and the block's budget.

    ``delta`` (rows, cols): tuned minus current weight; ``d`` (cols,): diagonal of ``U`` there.
    """
    rows, cols = delta.shape
    cost = (delta**2 / d**2).flatten()  # (rows * cols,)
    order = selection_order(d, rows)
    order = order[: order.numel() - never_kept(order.numel())]
    budget = block_budget(d, rows, s)
    take = torch.cumsum(cost[order], dim=0) <= budget
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[order[take]] = True
    return mask.reshape(rows, cols), float(cost[order[take]].sum()), budget


def safe_delta_layer(
    aligned: torch.Tensor,
    tuned: torch.Tensor,
    hessian: torch.Tensor,
    *,
    s: float = DEFAULT_BUDGET,
    block: int = SELECTION_BLOCK,
) -> LayerResult:
    """The Safe Delta weight for ``aligned`` / ``tuned`` (out, in) given the input Hessian
    ``hessian`` (in, in) of the aligned layer on the safety data (module doc)."""
    check_budget(s)
    if aligned.shape != tuned.shape or aligned.ndim != 2:
        raise ModelError(
            f"aligned {tuple(aligned.shape)} and tuned {tuple(tuned.shape)} weights differ in shape"
        )
    if hessian.shape != (aligned.shape[1], aligned.shape[1]):
        raise ModelError(
            f"Hessian {tuple(hessian.shape)} does not fit a weight with {aligned.shape[1]} inputs"
        )
    u = inverse_cholesky(hessian)  # (in, in), upper
    w = aligned.to(torch.float64).clone()  # (out, in): becomes the result
    w1 = tuned.to(torch.float64)
    rows, cols = w.shape
    kept, cost, budget = 0, 0.0, 0.0
    for b1 in range(0, cols, block):
        b2 = min(b1 + block, cols)
        d = torch.diag(u)[b1:b2]
        mask, block_cost, block_budget = selection_mask(w1[:, b1:b2] - w[:, b1:b2], d, s)
        kept, cost, budget = kept + int(mask.sum()), cost + block_cost, budget + block_budget
        for l1 in range(b1, b2, _LAZY):  # SparseGPT's lazy batches: exact, fewer big updates
            l2 = min(l1 + _LAZY, b2)
            err = torch.zeros(rows, l2 - l1, dtype=torch.float64)  # (rows, l2 - l1)
            for j in range(l1, l2):
                keep = mask[:, j - b1]
                q = torch.where(keep, w1[:, j], w[:, j])  # (rows,)
                e = (w[:, j] - q) / u[j, j]
                w[:, j] = q
                w[:, j + 1 : l2] -= e[:, None] * u[j, j + 1 : l2][None, :]
                err[:, j - l1] = e
            w[:, l2:] -= err @ u[l1:l2, l2:]
    return LayerResult(
        weight=w.to(aligned.dtype), kept=kept, entries=rows * cols, cost=cost, budget=budget
    )
