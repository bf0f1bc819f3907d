"""Pure arithmetic of the benchmark suite: link-time projections, growth exponents, ratios.

No torch, no CrypTen, no processes: everything here is a function of measured numbers, so it
is tested on synthetic inputs (``tests/bench/test_metrics.py``).

Projection to a network link (a modelled time, not a measurement)::

    T_link = max_p wall_p                                   measured on this machine (loopback)
           + (max_p sent_p + max_p dealer_p) * 8 / bandwidth   bytes over the link
           + (max_p rounds_p + max_p dealer_requests_p) * RTT   one round trip per round

``wall_p`` is party p's measured time of the section (its computation plus loopback transfers,
so the projection slightly over-counts transfer time: an upper bound). ``sent_p`` are the
payload bytes party p sent to the other computing party; the link is full duplex, so the
busier direction sets the transfer time. ``dealer_p`` are the bytes party p received from the
dealer (Beaver triples on demand; in a deployment an offline phase could ship them ahead).
Every communication call of CrypTen (send, all_reduce, broadcast, ...) counts as one round and
is charged a full RTT (gloo's two-party all_reduce is two one-way steps; a send is half an
RTT, so this is conservative). Each dealer request is charged one more RTT.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Link:
    """A network between the parties: bandwidth in bits per second and round-trip time."""

    name: str
    bandwidth_bps: float
    rtt_s: float

    def describe(self) -> str:
        bw = self.bandwidth_bps
        rate = f"{bw / 1e9:g} Gbps" if bw >= 1e9 else f"{bw / 1e6:g} Mbps"
        return f"{self.name} ({rate}, {self.rtt_s * 1e3:g} ms RTT)"


#: SecFwT's LAN setting (arXiv 2506.15307) and a typical wide-area link.
LAN = Link("LAN", 3e9, 0.8e-3)
WAN = Link("WAN", 100e6, 80e-3)
LINKS = (LAN, WAN)


@dataclasses.dataclass(frozen=True)
class PartyCost:
    """What one computing party measured for one benchmark section."""

    wall_s: float
    bytes_sent: int
    bytes_received: int
    rounds: int
    dealer_bytes: int = 0
    dealer_requests: int = 0
    peak_rss_mb: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartyCost:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def project(parties: Sequence[PartyCost], link: Link) -> float:
    """Projected time of a section on ``link`` (see the module docstring for the formula)."""
    if not parties:
        raise ValueError("project: no party costs")
    compute = max(p.wall_s for p in parties)
    nbytes = max(p.bytes_sent for p in parties) + max(p.dealer_bytes for p in parties)
    rounds = max(p.rounds for p in parties) + max(p.dealer_requests for p in parties)
    return compute + nbytes * 8.0 / link.bandwidth_bps + rounds * link.rtt_s


def projections(parties: Sequence[PartyCost], links: Sequence[Link] = LINKS) -> dict[str, float]:
    return {link.name: project(parties, link) for link in links}


def growth_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): y ~ c * x^k returns k.

    Needs at least two distinct positive x and positive y.
    """
    if len(xs) != len(ys):
        raise ValueError("growth_exponent: xs and ys differ in length")
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        raise ValueError("growth_exponent: needs at least two distinct positive points")
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclasses.dataclass(frozen=True)
class Target:
    """A performance target: ``key`` of the report compared with ``threshold`` by ``at_least``."""

    key: str
    threshold: float
    at_least: bool
    text: str

    def passed(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.threshold if self.at_least else value <= self.threshold


#: What secfwt set out to reach against MPC backprop, vanilla CrypTen and plaintext torch; the
#: report marks each met or missed. The exponent targets allow 0.1 of fitting noise ("about
#: linear").
TARGETS = (
    Target(
        "fot_vs_backprop_time_ratio",
        20.0,
        True,
        "forward-only step >= 20x faster than MPC backprop step",
    ),
    Target(
        "fot_vs_backprop_bytes_ratio",
        25.0,
        True,
        "forward-only step >= 25x fewer bytes than MPC backprop step",
    ),
    Target(
        "vs_vanilla_crypten_ratio", 10.0, True, "BERT-base layer >= 10x faster than vanilla CrypTen"
    ),
    Target("vs_plaintext_ratio", 100.0, False, "BERT-base layer within 100x of plaintext torch"),
    Target(
        "rfa_time_growth_exponent",
        1.1,
        False,
        "RFA time grows about linearly in T (exponent <= 1.1)",
    ),
    Target(
        "rfa_bytes_growth_exponent",
        1.1,
        False,
        "RFA bytes grow about linearly in T (exponent <= 1.1)",
    ),
)
