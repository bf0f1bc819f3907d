"""What a run's traffic would cost on a network link: a modelled time, not a measurement.

Pure arithmetic on measured numbers (no torch, no processes), shared by ``secfwt bench`` (per
measured section) and ``secfwt simulate`` (per job)::

    T_link = max_p wall_p                                   measured on this machine (loopback)
           + (max_p sent_p + max_p dealer_p) * 8 / bandwidth   bytes over the link
           + (max_p rounds_p + max_p dealer_requests_p) * RTT   one round trip per round

``wall_p`` is party p's measured time (its computation plus loopback transfers, so the
projection slightly over-counts transfer time: an upper bound). ``sent_p`` are the payload bytes
party p sent to the other computing party; the link is full duplex, so the busier direction
sets the transfer time. ``dealer_p`` are the bytes party p received from the dealer (Beaver
triples on demand; in a deployment an offline phase could ship them ahead) and
``dealer_requests_p`` the requests it sent it: the dealer's own traffic, counted at the other
end of each of its messages (the dealer answers rank 0 only). Every communication call of
CrypTen (send, all_reduce, broadcast, ...) counts as one round and is charged a full RTT
(gloo's two-party all_reduce is two one-way steps; a send is half an RTT, so this is
conservative). Each dealer request is charged one more RTT.
"""

from __future__ import annotations

import dataclasses
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
    """What one computing party measured for a benchmark section or a whole job."""

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


__all__ = ["LAN", "LINKS", "WAN", "Link", "PartyCost", "project", "projections"]
