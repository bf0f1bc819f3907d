"""The bench's repetitions (secfwt.bench.probe.measure_reps): each one is measured alone."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from secfwt.bench.probe import measure_reps
from secfwt.mpc.traffic import Traffic


class _Idle:
    """One process, no peers: barriers return at once and nothing is sent. (The MPC session's
    own communicator and meter are covered by the bench's party tests; this test is about what
    one repetition leaves behind for the next.)"""

    def barrier(self) -> None:
        return None

    def snapshot(self) -> Traffic:
        return Traffic()


class _Graph:
    """A step's output in a reference cycle, as CrypTen's autograd leaves its graphs."""

    def __init__(self) -> None:
        self.me = self
        self.payload = bytearray(1 << 20)


def test_a_repetition_starts_after_the_one_before_is_freed() -> None:
    alive_at_start: list[bool] = []
    before: list[weakref.ref[Any]] = []

    def step() -> _Graph:
        alive_at_start.append(bool(before) and before[-1]() is not None)
        g = _Graph()
        before.append(weakref.ref(g))
        return g

    gc.disable()  # as when the cyclic collector has not run between two big steps
    try:
        out, costs = measure_reps(_Idle(), _Idle(), step, reps=3)  # type: ignore[arg-type]
    finally:
        gc.enable()
    assert alive_at_start == [False, False, False]
    assert len(costs) == 3 and out is before[-1]()
