"""Measurement inside a party process: traffic by direction, time, rounds, peak memory, op classes.

CrypTen's own counter (``communication_stats``) adds what a party sends and what it receives
into one "bytes" figure (an all_reduce is logged as 2x its size) and mixes dealer traffic in.
:class:`TrafficMeter` counts the two directions apart and separates the dealer, by wrapping
the communication methods of this process's communicator *instance* (CrypTen's and the TLS
mesh alike; instance attributes shadow the class methods CrypTen calls). It is installed
only by the benchmark's own party function and changes no result: every call is forwarded
unchanged. Bytes are payload bytes (8 per int64 element, CrypTen's convention); object
messages are counted by their pickled length.

Two computing parties are assumed (secfwt's setting): in every collective, what one party
sends is what the other receives (gloo's two-party ring all_reduce sends and receives one
tensor each way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

_BYTES_PER_ELEMENT = 8


@dataclasses.dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    rounds: int = 0
    dealer_bytes: int = 0  # received from the dealer
    dealer_sent: int = 0  # requests sent to the dealer
    dealer_requests: int = 0

    def minus(self, other: Traffic) -> Traffic:
        return Traffic(
            **{
                f.name: getattr(self, f.name) - getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )


def _nel(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nel(t) for t in x)
    return int(x.nelement()) * _BYTES_PER_ELEMENT


def _obj_bytes(obj: Any) -> int:
    try:
        return len(pickle.dumps(obj))
    except Exception:  # noqa: BLE001  (an unpicklable object: count nothing rather than fail)
        return 0


class TrafficMeter:
    """Counts this party's traffic with the other computing party and with the dealer."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = comm.get_rank()
        self.dealer = comm.get_ttp_rank() if hasattr(comm, "get_ttp_rank") else None
        self.t = Traffic()
        self._open_send = False
        self._install()

    def snapshot(self) -> Traffic:
        return dataclasses.replace(self.t)

    # -- accounting ----------------------------------------------------------------------------
    def _peer(self, *, sent: int = 0, received: int = 0, exchange: bool = False) -> None:
        """One message flight with the other computing party. ``exchange``: a point-to-point
        send not yet answered; the receive that follows it is the same round (both parties
        send at once, as in :func:`secfwt.mpc.owned.product`), not a second one."""
        self.t.sent += sent
        self.t.received += received
        if not (self._open_send and received and not sent):
            self.t.rounds += 1
        self._open_send = exchange

    def _with(
        self, other: int | None, *, sent: int = 0, received: int = 0, exchange: bool = False
    ) -> None:
        if other is not None and other == self.dealer:
            self.t.dealer_bytes += received
            self.t.dealer_sent += sent
            if sent:
                self.t.dealer_requests += 1
        else:
            self._peer(sent=sent, received=received, exchange=exchange)

    def _install(self) -> None:
        comm = self.comm
        wrap = self._wrap

        wrap("send", lambda a, k, r: self._with(_arg(a, k, 1, "dst"), sent=_nel(a[0])))
        wrap(
            "isend",
            lambda a, k, r: self._with(_arg(a, k, 1, "dst"), sent=_nel(a[0]), exchange=True),
        )
        wrap("recv", lambda a, k, r: self._with(_arg(a, k, 1, "src"), received=_nel(a[0])))
        wrap("irecv", lambda a, k, r: self._with(_arg(a, k, 1, "src"), received=_nel(a[0])))
        wrap("all_reduce", lambda a, k, r: self._peer(sent=_nel(a[0]), received=_nel(a[0])))
        wrap("all_gather", lambda a, k, r: self._peer(sent=_nel(a[0]), received=_nel(a[0])))
        wrap("reduce", lambda a, k, r: self._rooted(_arg(a, k, 1, "dst"), _nel(a[0]), to_root=True))
        wrap("gather", lambda a, k, r: self._rooted(_arg(a, k, 1, "dst"), _nel(a[0]), to_root=True))
        wrap(
            "broadcast",
            lambda a, k, r: self._rooted(_arg(a, k, 1, "src"), _nel(a[0]), to_root=False),
        )
        wrap("scatter", lambda a, k, r: self._rooted(_arg(a, k, 1, "src"), _nel(r), to_root=False))
        wrap("send_obj", lambda a, k, r: self._with(_arg(a, k, 1, "dst"), sent=_obj_bytes(a[0])))
        wrap("recv_obj", lambda a, k, r: self._with(_arg(a, k, 0, "src"), received=_obj_bytes(r)))
        wrap(
            "broadcast_obj",
            lambda a, k, r: self._rooted(_arg(a, k, 1, "src"), _obj_bytes(r), to_root=False),
        )
        del comm

    def _rooted(self, root: int | None, nbytes: int, *, to_root: bool) -> None:
        """A two-party collective with a root: data flows to it (reduce, gather) or from it."""
        if root == self.rank:
            if to_root:
                self._peer(received=nbytes)
            else:
                self._peer(sent=nbytes)
        elif root is not None and root == self.dealer:
            self._with(root, received=nbytes)
        else:
            if to_root:
                self._peer(sent=nbytes)
            else:
                self._peer(received=nbytes)

    def _wrap(
        self, name: str, account: Callable[[tuple[Any, ...], dict[str, Any], Any], None]
    ) -> None:
        method = getattr(self.comm, name, None)
        if method is None:
            return

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            account(args, kwargs, result)
            return result

        setattr(self.comm, name, counted)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


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
) -> tuple[Any, list[dict[str, Any]]]:
    """:func:`measure` ``reps`` times; the last output and every repetition's cost (with the
    op-class breakdown of that repetition when ``profile`` is given). The parent picks the
    fastest repetition: on a shared machine the minimum is the robust estimate."""
    costs = []
    out = None
    for _ in range(max(1, reps)):
        if profile is not None:
            profile.reset()
        out, cost = measure(comm, meter, fn)
        if profile is not None:
            cost["breakdown"] = profile.with_remainder(cost, remainder)
        costs.append(cost)
    return out, costs
