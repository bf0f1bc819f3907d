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

import torch

from secfwt.bench.provenance import machine_busy_seconds
from secfwt.mpc.disclosure import Revealable
from secfwt.mpc.traffic import TrafficMeter
from secfwt.roles import Role


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
        t0, cpu0, c0 = time.perf_counter(), time.process_time(), self.meter.snapshot()
        try:
            yield
        finally:
            self._depth -= 1
            d = self.meter.snapshot().minus(c0)
            row = self.classes.setdefault(
                name, {"time_s": 0.0, "cpu_s": 0.0, "bytes_sent": 0, "rounds": 0, "calls": 0}
            )
            row["time_s"] += time.perf_counter() - t0
            row["cpu_s"] += time.process_time() - cpu0  # this process's, its threads' included
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
        keys = ("time_s", "cpu_s", "bytes_sent", "rounds")
        rest = {
            "time_s": total["wall_s"],
            "cpu_s": total.get("cpu_s", 0.0),
            "bytes_sent": total["bytes_sent"],
            "rounds": total["rounds"],
            "calls": 0,
        }
        for v in self.classes.values():
            for key in keys:
                rest[key] -= v[key]
        rest["time_s"] = max(rest["time_s"], 0.0)
        rest["cpu_s"] = max(rest["cpu_s"], 0.0)
        mine = self.classes.get(name)
        if mine is not None:  # a class of this name was timed too: add the unaccounted rest to it
            for key in keys:
                rest[key] += mine[key]
            rest["calls"] = mine["calls"]
        out[name] = rest
        return out


def measure(comm: Any, meter: TrafficMeter, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` between barriers; this party's wall time, traffic and rounds of it.

    The barrier before aligns the parties' start; the section ends when this party's ``fn``
    returns (its own wall time), then a second barrier keeps the next section apart.
    ``cpu_s``: this process's CPU time in the section (its threads' included: the work ahead
    of :mod:`secfwt.mpc.owned`); ``machine_busy_s``: the whole machine's (every process on every
    core: the other party and the dealer too), None off Linux. On a machine otherwise idle,
    ``machine_busy_s / wall_s`` near the core count means the parties were bound by compute,
    not by waiting on messages.
    """
    comm.barrier()
    c0 = meter.snapshot()
    busy0 = machine_busy_seconds()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    busy1 = machine_busy_seconds()
    d = meter.snapshot().minus(c0)
    comm.barrier()
    return out, {
        "wall_s": wall,
        "cpu_s": cpu,
        "machine_busy_s": None if busy0 is None or busy1 is None else busy1 - busy0,
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


def every_rep(fn: Callable[[], Any]) -> tuple[Callable[[], Any], list[Any]]:
    """``fn``, and the list each of its calls' outputs is appended to. A case's repetitions
    compute the same thing, each with its own truncations (CrypTen's fail at random, about
    ``|v| 2^-32`` for a value ``v``), so every repetition's output is checked against float64,
    not only the last one's: the fastest repetition, whose cost counts, may be another."""
    outs: list[Any] = []

    def run() -> Any:
        outs.append(fn())
        return outs[-1]

    return run, outs


def reveal(sess: Any, y: Any, note: str) -> torch.Tensor | None:
    """A case's output opened to the data owner to be checked against float64 (the bench's
    one disclosure, :attr:`~secfwt.mpc.disclosure.Revealable.VERIFY_OUTPUTS`)."""
    return sess.discloser.reveal(
        y, value=Revealable.VERIFY_OUTPUTS, to=[Role.DATA_OWNER], note=note
    )


def reveal_each(sess: Any, outs: list[Any], note: str) -> dict[str, Any]:
    """Every repetition's output (:func:`every_rep`) opened, outside the measured sections:
    ``output`` (the last) and ``output_each_rep``."""
    each = [reveal(sess, y, note) for y in outs]
    return {"output": each[-1], "output_each_rep": each}
