"""Measurement inside a party process: time, traffic and rounds of a section, peak memory, op
classes.

Traffic is counted by :class:`secfwt.mpc.traffic.TrafficMeter` (by direction, the dealer apart);
the benchmark's party function installs its own meter and reads it around each measured
section.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

from secfwt.mpc.traffic import TrafficMeter


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Profile:
    """Time and traffic per op class inside a measured section (outermost section only)."""

    def __init__(self, meter: TrafficMeter) -> None:
        self.meter = meter
        self.classes: dict[str, dict[str, float]] = {}
        self._depth = 0

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self._depth:
            yield
            return
        self._depth += 1
        t0, c0 = time.perf_counter(), self.meter.snapshot()
        try:
            yield
        finally:
            self._depth -= 1
            d = self.meter.snapshot().minus(c0)
            row = self.classes.setdefault(
                name, {"time_s": 0.0, "bytes_sent": 0, "rounds": 0, "calls": 0}
            )
            row["time_s"] += time.perf_counter() - t0
            row["bytes_sent"] += d.sent
            row["rounds"] += d.rounds
            row["calls"] += 1

    def reset(self) -> None:
        self.classes = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.section(name):
                return fn(*args, **kwargs)

        return timed

    def with_remainder(self, total: dict[str, float], name: str) -> dict[str, dict[str, float]]:
        """The classes plus ``name`` = whatever of ``total`` no class accounts for."""
        out = {k: dict(v) for k, v in self.classes.items()}
        rest = {
            "time_s": total["wall_s"],
            "bytes_sent": total["bytes_sent"],
            "rounds": total["rounds"],
            "calls": 0,
        }
        for v in self.classes.values():
            rest["time_s"] -= v["time_s"]
            rest["bytes_sent"] -= v["bytes_sent"]
            rest["rounds"] -= v["rounds"]
        rest["time_s"] = max(rest["time_s"], 0.0)
        mine = self.classes.get(name)
        if mine is not None:  # a class of this name was timed too: add the unaccounted rest to it
            for key in ("time_s", "bytes_sent", "rounds"):
                rest[key] += mine[key]
            rest["calls"] = mine["calls"]
        out[name] = rest
        return out


def measure(comm: Any, meter: TrafficMeter, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` between barriers; this party's wall time, traffic and rounds of it.

    The barrier before aligns the parties' start; the section ends when this party's ``fn``
    returns (its own wall time), then a second barrier keeps the next section apart.
    """
    comm.barrier()
    c0 = meter.snapshot()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    d = meter.snapshot().minus(c0)
    comm.barrier()
    return out, {
        "wall_s": wall,
        "bytes_sent": d.sent,
        "bytes_received": d.received,
        "rounds": d.rounds,
        "dealer_bytes": d.dealer_bytes,
        "dealer_sent": d.dealer_sent,
        "dealer_requests": d.dealer_requests,
    }


def measure_reps(
    comm: Any,
    meter: TrafficMeter,
    fn: Callable[[], Any],
    *,
    reps: int,
    profile: Profile | None = None,
    remainder: str = "other",
    before: Callable[[], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """:func:`measure` ``reps`` times; the last output and every repetition's cost (with the
    op-class breakdown of that repetition when ``profile`` is given). The parent picks the
    fastest repetition: on a shared machine the minimum is the robust estimate. ``before``
    runs ahead of each repetition, outside the measured section (e.g. to restore the state a
    step changed, so that every repetition computes the same thing)."""
    costs = []
    out = None
    for _ in range(max(1, reps)):
        if before is not None:
            before()
        if profile is not None:
            profile.reset()
        # The repetition before is freed first: CrypTen's autograd graphs hold their shares in
        # reference cycles, which the cyclic collector may not reach before the next step has
        # allocated its own (MPC full fine-tuning at T=512, 8.8 GB per party and step, ran out
        # of 23 GB in its second repetition). Outside the measured section.
        out = None
        gc.collect()
        out, cost = measure(comm, meter, fn)
        if profile is not None:
            cost["breakdown"] = profile.with_remainder(cost, remainder)
        costs.append(cost)
    return out, costs
