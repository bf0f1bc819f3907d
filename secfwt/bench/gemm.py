"""The machine's int64 matmuls: torch's kernel against secfwt's float64 limb GEMMs, and the
way each party process chose.

:func:`machine_timings` times the products of the benchmark's layer in the bench process, with
one torch thread as each party runs: torch's int64 matmul, the limbs (general, with the right
operand split once as for a fixed weight mask, and the narrow form the model owner uses with
its own weights) and a float64 GEMM of the same shape (what plaintext torch pays), best of a
few runs, every limb result checked bit for bit against torch's. :func:`choices` gathers what
the parties' :mod:`secfwt.mpc.ring_tuning` measured and chose in each case, per shape class.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from secfwt.bench.plan import BenchPlan
from secfwt.mpc import device as mpc_device
from secfwt.mpc import ring_tuning
from secfwt.mpc.ring import (
    NARROW_BOUND,
    PreparedRight,
    on_device,
    ring_matmul_limbs,
    ring_matmul_narrow,
    ring_matmul_prepared,
)


def _products(plan: BenchPlan) -> list[tuple[str, tuple[int, ...], tuple[int, ...], bool]]:
    """(name, a shape, b shape, b is a weight) of one layer of the plan's shape, batch 1."""
    s, t = plan.layer, plan.layer_seq_len
    dh = s.hidden // s.heads
    return [
        ("Q/K/V/output projection", (t, s.hidden), (s.hidden, s.hidden), True),
        ("FFN up", (t, s.hidden), (s.hidden, s.intermediate), True),
        ("FFN down", (t, s.intermediate), (s.intermediate, s.hidden), True),
        ("attention scores QK^T", (1, s.heads, t, dh), (1, s.heads, dh, t), False),
        ("attention probabilities x V", (1, s.heads, t, t), (1, s.heads, t, dh), False),
    ]


def _best_ms(fn: Callable[[], torch.Tensor], reps: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    assert out is not None
    return best * 1e3, out


def machine_timings(
    plan: BenchPlan, *, reps: int | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Best-of-``reps`` times (ms) of each layer product every way, one torch thread; with a
    ``device`` (the plan's ``device``, resolved), also the limbs there as a party runs them:
    operands copied there and the result back (``device_ms``), a weight's mask split there once
    (``device_prepared_ms``), an owner's narrow weights kept there (``device_narrow_ms``)."""
    reps = reps or max(2, plan.reps)
    if device is not None and device.type == "cuda":
        mpc_device.warm_up(device)
    gen = torch.Generator().manual_seed(plan.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    machine = ring_tuning.machine_key()  # as the parties' (one thread each)
    rows = []
    try:
        for name, sa, sb, weight in _products(plan):
            a = torch.randint(-(2**63), 2**63 - 1, sa, generator=gen)
            b = torch.randint(-(2**63), 2**63 - 1, sb, generator=gen)
            torch_ms, ref = _best_ms(partial(torch.matmul, a, b), reps)
            row: dict[str, Any] = {
                "product": name,
                "a": list(sa),
                "b": list(sb),
                "torch_ms": torch_ms,
                "float64_ms": _best_ms(partial(torch.matmul, a.double(), b.double()), reps)[0],
            }
            ways: dict[str, Callable[[], torch.Tensor]] = {
                "limbs_ms": partial(ring_matmul_limbs, a, b)
            }
            if device is not None:
                ways["device_ms"] = partial(on_device, ring_matmul_limbs, a, b, device)
            if weight:
                ways["limbs_prepared_ms"] = partial(ring_matmul_prepared, a, PreparedRight(b))
                if device is not None:
                    on = PreparedRight(b.to(device))
                    ways["device_prepared_ms"] = partial(
                        on_device, ring_matmul_prepared, a, on, device
                    )
                w = torch.randint(-NARROW_BOUND + 1, NARROW_BOUND, sb, generator=gen)
                row["narrow_torch_ms"], narrow_ref = _best_ms(partial(torch.matmul, a, w), reps)
                narrow = partial(ring_matmul_narrow, a, w.double())
                row["limbs_narrow_ms"], got = _best_ms(narrow, reps)
                row["bit_identical"] = torch.equal(got, narrow_ref)
                if device is not None:
                    w_on = w.to(device=device, dtype=torch.float64)
                    on_narrow = partial(on_device, ring_matmul_narrow, a, w_on, device)
                    row["device_narrow_ms"], got = _best_ms(on_narrow, reps)
                    row["bit_identical"] = row["bit_identical"] and torch.equal(got, narrow_ref)
            for key, fn in ways.items():
                row[key], got = _best_ms(fn, reps)
                row["bit_identical"] = row.get("bit_identical", True) and torch.equal(got, ref)
            fastest = {"torch": row["torch_ms"], "limbs": row["limbs_ms"]}
            if device is not None:
                fastest["device"] = row["device_ms"]
            row["faster"] = min(fastest, key=fastest.__getitem__)
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return {
        "machine_key": machine,
        "device": None if device is None else ring_tuning.device_name(device),
        "threads": 1,
        "reps": reps,
        "seq_len": plan.layer_seq_len,
        "shape": plan.layer.describe(),
        "products": rows,
    }


def choices(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per shape class, over every party process of every case run: how many chose each way,
    the median of their timings, and how many products took each way.

    ``results``: :class:`~secfwt.bench.runner.Runner` results by case key (their
    ``ring_matmul``: the records of :func:`secfwt.mpc.ring_tuning.records` by role).
    """
    by_class: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for res in results.values():
        for records in res.get("ring_matmul", {}).values():
            for r in records:
                key = (r["kind"], r["batch"], r["m"], r["k"], r["n"])
                by_class.setdefault(key, []).append(r)
    ways = [w.value for w in ring_tuning.Method]
    rows = []
    for (kind, batch, m, k, n), recs in sorted(by_class.items()):
        timed = [r for r in recs if r.get("torch_ms") is not None]

        def median(key: str, timed: list[dict[str, Any]] = timed) -> float | None:
            values = [r[key] for r in timed if r.get(key) is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "kind": kind,
                "class": {"batch": batch, "m": m, "k": k, "n": n},
                "example": recs[0]["example"],
                "processes": {w: sum(r["method"] == w for r in recs) for w in ways},
                "calls": {w: sum(r["calls"] for r in recs if r["method"] == w) for w in ways},
                "sources": sorted({r["source"] for r in recs}),
                "torch_ms_median": median("torch_ms"),
                "limbs_ms_median": median("limbs_ms"),
                "device_ms_median": median("device_ms"),
            }
        )
    return rows


__all__ = ["choices", "machine_timings"]
