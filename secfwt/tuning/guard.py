"""The guard a secure forward runs its per-row computations through (the MPC job's range
checks, :class:`~secfwt.runtime.range_checks.RangeChecks`); the plaintext reference has none."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: ``guard(compute, n)``: rows 0 .. n-1 of ``compute(rows)`` (dim 0: the rows), checked, each
#: failed row computed again.
Guard = Callable[[Callable[[list[int]], Any], int], Any]


def guarded(guard: Guard | None, compute: Callable[[list[int]], Any], n: int) -> Any:
    """Rows 0 .. n-1 of ``compute(rows)``: through ``guard``, or computed once (no guard)."""
    rows = list(range(n))
    return compute(rows) if guard is None else guard(compute, n)
