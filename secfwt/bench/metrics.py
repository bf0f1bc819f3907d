"""Pure arithmetic of the benchmark suite: link-time projections, growth exponents, ratios.

No torch, no CrypTen, no processes: everything here is a function of measured numbers, so it
is tested on synthetic inputs (``tests/bench/test_metrics.py``).

Link-time projections live in :mod:`secfwt.runtime.links` (``secfwt simulate`` uses them too)
and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from secfwt.runtime.links import LAN, LINKS, WAN, Link, PartyCost, project, projections


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


#: What secfwt set out to reach against MPC full fine-tuning, vanilla CrypTen and plaintext
#: torch; the report marks each met or missed. The full fine-tuning targets are beyond SecFwT's
#: own 11.8x / 17.2x (issue 19); issue 4's ``fot_vs_backprop_*`` pairing (same trainable set
#: on both sides) is reported without a target. The exponent targets allow 0.1 of fitting noise
#: ("about linear").
TARGETS = (
    Target(
        "fot_vs_full_ft_time_ratio",
        20.0,
        True,
        "forward-only iteration >= 20x faster than MPC full fine-tuning",
    ),
    Target(
        "fot_vs_full_ft_bytes_ratio",
        25.0,
        True,
        "forward-only iteration >= 25x fewer bytes than MPC full fine-tuning",
    ),
    Target(
        "vs_vanilla_crypten_ratio", 8.0, True, "BERT-base layer >= 8x faster than vanilla CrypTen"
    ),
    Target("vs_plaintext_ratio", 40.0, False, "BERT-base layer within 40x of plaintext torch"),
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


__all__ = [
    "LAN",
    "LINKS",
    "TARGETS",
    "WAN",
    "Link",
    "PartyCost",
    "Target",
    "growth_exponent",
    "project",
    "projections",
    "ratio",
]
