"""The ``safe-delta`` sub-benchmark: Safe Delta on secret shares for the example job's adapter.

``secfwt/jobs/smollm2_instruct_zo.toml`` tunes a rank-1 LoRA (scale 1) of
``model.layers.29.self_attn.q_proj`` (576 x 576) and the final norm (not a Linear: Safe Delta
leaves it as it is). The case runs :func:`secfwt.tuning.safe_delta_shares.safe_delta_shares` on
that Linear's delta ``B A`` (random factors, shared by the data owner; a job forms it on shares
before, not measured) with the model owner's ``U`` from a random SPD Hessian of 1,024 random
tokens with heavy channels, as a decoder's hidden states have (the real one comes from the
aligned layer's inputs on safety data, :mod:`secfwt.safety.safe_delta_run`; the cost does not
depend on its values), at the default budget. The opened result is checked against the float64
:func:`secfwt.tuning.safe_delta.safe_delta_layer` on the same 16-bit delta: the kept set (entries
decided differently, and how close the nearest cumulative cost came to the budget) and the
largest difference of the corrected delta.
"""

from __future__ import annotations

from typing import Any

import torch

from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner, case_summary, max_err
from secfwt.roles import Role
from secfwt.tuning.safe_delta import (
    DEFAULT_BUDGET,
    block_budget,
    input_hessian,
    inverse_cholesky,
    never_kept,
    safe_delta_layer,
    selection_mask,
    selection_order,
)

SIZE = 576  # SmolLM2-135M's hidden size: q_proj is 576 x 576
TOKENS, SAMPLES = 1024, 32  # calibration tokens of the random Hessian


def example_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data owner's delta ``B A`` (float32, rank 1: B 576 x 1 around 0.05, A 1 x 576 around
    1/24) and the model owner's Hessian (float64)."""
    gen = torch.Generator().manual_seed(seed)
    b = 0.05 * torch.randn(SIZE, 1, generator=gen)
    a = torch.randn(1, SIZE, generator=gen) / SIZE**0.5
    channels = torch.exp(torch.randn(SIZE, generator=gen, dtype=torch.float64))
    x = torch.randn(TOKENS, SIZE, generator=gen, dtype=torch.float64) * channels
    return b @ a, input_hessian(x, samples=SAMPLES)


def shared_value(x: torch.Tensor) -> torch.Tensor:
    """The value CrypTen shares for float32 ``x``: ``(2^16 x).long()`` truncates toward zero."""
    return torch.trunc(x.to(torch.float32).double() * 2**16) / 2**16


#: Entries whose cumulative cost lies this close to the budget (in budgets) may be decided
#: differently on shares (fixed point, :mod:`secfwt.tuning.safe_delta_shares`); no other may.
NEAR_BUDGET = 1e-3


def budget_distance(delta: torch.Tensor, d: torch.Tensor, s: float) -> torch.Tensor:
    """(rows, cols): each selectable entry's cumulative cost minus the budget, in budgets (one
    block; the never-kept tail gets +inf)."""
    rows = delta.shape[0]
    order = selection_order(d, rows)
    order = order[: order.numel() - never_kept(order.numel())]
    cost = (delta**2 / d**2).flatten()[order] / block_budget(d, rows, s)
    out = torch.full((delta.numel(),), torch.inf, dtype=torch.float64)
    out[order] = torch.cumsum(cost, 0) - 1
    return out.reshape(delta.shape)


def safe_delta(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    delta, hessian = example_inputs(plan.seed)
    u = inverse_cholesky(hessian)
    res = runner.run(
        "safe-delta",
        f"Safe Delta on shares, q_proj {SIZE} x {SIZE} (rank-1 LoRA delta), s = {DEFAULT_BUDGET}",
        model_owner={"u": u},
        data_owner={"delta": delta},
        common={"case": "safe_delta", "shape": (SIZE, SIZE), "budget": DEFAULT_BUDGET},
    )
    s = case_summary(res)
    ref_delta = shared_value(delta)
    ref = safe_delta_layer(torch.zeros_like(ref_delta), ref_delta, hessian, s=DEFAULT_BUDGET)
    mask, _, _ = selection_mask(ref_delta, torch.diag(u), DEFAULT_BUDGET)
    opened = res["values"][Role.DATA_OWNER]
    s["max_abs_err"] = max_err(opened["output"], ref.weight)
    distance = budget_distance(ref_delta, torch.diag(u), DEFAULT_BUDGET).abs()
    differs = opened["kept"].round().bool() != mask
    return {
        "case": s,
        "budget": DEFAULT_BUDGET,
        "entries": SIZE * SIZE,
        "kept": ref.kept,
        "kept_secure": int(opened["kept"].round().sum()),
        "kept_differs": int(differs.sum()),
        "kept_differs_away_from_budget": int((differs & (distance > NEAR_BUDGET)).sum()),
        "boundary_margin": float(distance.min()),
    }


__all__ = ["NEAR_BUDGET", "budget_distance", "example_inputs", "safe_delta", "shared_value"]
