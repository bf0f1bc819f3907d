"""Job runners for tests only: they compute nothing, so no daemon ships them.

The library's runner is :class:`secfwt.server.runner.MpcJobRunner` (the MPC session hook).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from secfwt.server.runner import JobContext, ProgressCallback


class EchoRunner:
    """Reports ``steps`` progress events and writes one artifact naming the job and the party."""

    capabilities = ("test-echo",)

    def __init__(self, steps: int = 3, step_s: float = 0.0) -> None:
        self.steps, self.step_s = steps, step_s
        self.calls: list[str] = []

    def run(
        self, ctx: JobContext, progress: ProgressCallback, cancel: threading.Event
    ) -> dict[str, Any]:
        self.calls.append(ctx.job_id)
        for step in range(1, self.steps + 1):
            if cancel.wait(self.step_s):
                return {"stopped_at": step}
            progress(phase="echo", step=step, total_steps=self.steps, metrics={"loss": 1.0 / step})
        (ctx.artifacts_dir / "echo.json").write_text(
            json.dumps({"job": ctx.job_id, "role": ctx.role.value, "resume": ctx.resume})
        )
        return {"steps": self.steps, "role": ctx.role.value}


class BlockingRunner:
    """Runs until cancelled (or ``release`` is set); signals ``started`` when it began."""

    capabilities = ()

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def run(
        self, ctx: JobContext, progress: ProgressCallback, cancel: threading.Event
    ) -> dict[str, Any]:
        self.started.set()
        progress(phase="blocking", message="waiting for cancel")
        while not cancel.wait(0.05):
            if self.release.is_set():
                return {}
        return {}


class GateRunner:
    """Returns the summary of a job whose safety gate decided ``released`` (what
    :class:`secfwt.server.runner.MpcJobRunner` returns from ``PartyOutcome.summary()``); the
    gate's MPC computation is tested in tests/runtime/test_safety_gate.py."""

    capabilities = ()

    def __init__(self, *, released: bool) -> None:
        self.released = released

    def run(
        self, ctx: JobContext, progress: ProgressCallback, cancel: threading.Event
    ) -> dict[str, Any]:
        reason = "score fell 2.5000 (from 8.0000 to 5.5000), more than max_drop = 0.5"
        gate = {
            "score_before": 8.0,
            "score_after": 5.5 if not self.released else 7.9,
            "released": self.released,
            "reason": reason if not self.released else "score 8.0000 -> 7.9000 within the gate",
            "prompts": 8,
            "state": "released" if self.released else "withheld: safety",
        }
        return {"role": ctx.role.value, "safety_gate": gate}
