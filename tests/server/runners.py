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
