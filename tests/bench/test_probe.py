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


def test_a_section_records_its_cpu_and_the_machine_s() -> None:
    """``cpu_s`` is this process's CPU in the section, ``machine_busy_s`` every core's (Linux):
    a section that computes has both, one that waits has little of its own."""
    import time

    from secfwt.bench.probe import measure

    def burn() -> None:
        t = time.process_time()
        while time.process_time() - t < 0.5:
            pass

    _, busy = measure(_Idle(), _Idle(), burn)  # type: ignore[arg-type]
    _, idle = measure(_Idle(), _Idle(), lambda: time.sleep(0.5))  # type: ignore[arg-type]
    assert busy["cpu_s"] >= 0.5 and idle["cpu_s"] < 0.1, (busy, idle)
    if busy["machine_busy_s"] is not None:  # /proc/stat: 10 ms ticks
        assert busy["machine_busy_s"] >= 0.48, busy
        assert idle["machine_busy_s"] >= 0.0


def test_every_repetition_s_output_is_kept_for_the_check() -> None:
    """The fastest repetition, whose cost counts, need not be the last: each one's output is
    kept (to be opened and checked), and the error is the largest over them."""
    import torch

    from secfwt.bench.probe import every_rep
    from secfwt.bench.runner import max_err, outputs

    calls = iter([torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([1.5])])
    run, outs = every_rep(lambda: next(calls))
    last, _ = measure_reps(_Idle(), _Idle(), run, reps=3)  # type: ignore[arg-type]
    assert [float(y) for y in outs] == [1.0, 5.0, 1.5] and float(last) == 1.5
    ref = torch.tensor([1.0])
    assert max_err(outs, ref) == 4.0  # the second repetition's, not the last one's 0.5
    assert max_err(outputs({"output": outs[-1], "output_each_rep": outs}), ref) == 4.0
    assert max_err(outputs({"output": outs[-1]}), ref) == 0.5  # a case with one output
    assert max_err([outs[0], None], ref) is None  # an output that stayed secret


def test_each_op_class_records_its_cpu_and_the_rest_gets_the_remainder() -> None:
    """An op class that computes has its CPU, one that waits little; what no class accounts
    for is the remainder class's; the report shows both parties' CPU per class."""
    import time

    from secfwt.bench.probe import Profile, measure
    from secfwt.bench.report import _class_cpu

    profile = Profile(_Idle())  # type: ignore[arg-type]

    def burn(seconds: float) -> None:
        t = time.process_time()
        while time.process_time() - t < seconds:
            pass

    def forward() -> None:
        with profile.section("GELU"):
            burn(0.3)
        with profile.section("linear (weights)"):
            time.sleep(0.3)
        burn(0.2)  # in no class

    _, total = measure(_Idle(), _Idle(), forward)  # type: ignore[arg-type]
    rows = profile.with_remainder(total, "other")
    assert rows["GELU"]["cpu_s"] >= 0.3 and rows["linear (weights)"]["cpu_s"] < 0.1, rows
    assert rows["other"]["cpu_s"] >= 0.19 and rows["other"]["time_s"] >= 0.19, rows
    case = {"breakdown": rows, "breakdown_data_owner": {"GELU": {"cpu_s": 0.125}}}
    assert _class_cpu(case, "GELU") == f" (CPU {rows['GELU']['cpu_s']:.2f} + 0.12)"
    assert _class_cpu(case, "other") == ""  # the data owner's not measured
