"""Progress display for long jobs, fed by the parties' progress messages.

On a terminal: rich progress bars (frozen-encoder pass, tuning steps with loss where the terms
reveal it, elapsed time and ETA). Elsewhere (CI logs, pipes): one plain line per phase and
roughly every 10% of a pass, so a log shows that a long job is alive.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from secfwt.roles import Role


class ProgressView:
    def __init__(self) -> None:
        self._console = Console(file=sys.stderr)
        self._live = self._console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
            disable=not self._live,
        )
        self._tasks: dict[str, Any] = {}
        self._last_line: dict[str, int] = {}
        self._started: dict[str, tuple[float, int]] = {}
        self._t0 = time.monotonic()

    def __enter__(self) -> Self:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def _print(self, text: str) -> None:
        self._console.print(f"[{time.monotonic() - self._t0:6.0f} s] {text}", highlight=False)

    def _advance(self, key: str, description: str, done: int, total: int, info: str) -> None:
        if self._live:
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(description, total=total, info="")
            self._progress.update(self._tasks[key], completed=done, info=info)
            return
        tenth = (10 * done) // max(total, 1)
        if tenth != self._last_line.get(key, -1) or done == total:
            self._last_line[key] = tenth
            started = self._started.setdefault(key, (time.monotonic(), done))
            rate = (done - started[1]) / max(time.monotonic() - started[0], 1e-9)
            eta = f"ETA {(total - done) / rate:.0f} s" if 0 < done < total and rate > 0 else ""
            self._print(f"{description.strip()}: {done}/{total} {info} {eta}".rstrip())

    def update(self, role: Role, msg: dict[str, Any]) -> None:
        # The data owner sees everything the model owner sees and more (loss), so show its view,
        # and of the other parties only the steps they take alone (``own``: the model owner's
        # Safe Delta Hessians), which the data owner's view cannot show.
        if role is not Role.DATA_OWNER:
            if msg.get("kind") == "phase" and msg.get("own"):
                self._print(f"{role.value.replace('_', ' ')}: {msg['phase']}")
            return
        kind = msg.get("kind")
        if kind == "phase":
            self._print(msg["phase"])
            self._tasks.pop(
                "steps", None
            )  # a new tuning run (dp-compare variants) gets a fresh bar
            self._last_line.pop("steps", None)
            self._started.pop("steps", None)
        elif kind == "prefix":
            self._advance(
                "prefix", "frozen layers (MPC), sequences ", msg["done"], msg["total"], ""
            )
        elif kind == "step":
            loss, eps = msg.get("loss"), msg.get("epsilon")
            info = ("" if loss is None else f"loss {loss:.4f}") + (
                "" if eps is None else f"  epsilon {eps:.3f}"
            )
            self._advance(
                "steps", "tuning steps                  ", msg["step"], msg["total"], info.strip()
            )
        elif kind == "gate":
            self._print(
                f"safety gate: score {msg['score_before']:.4f} -> {msg['score_after']:.4f}: "
                f"{msg['state']}"
            )
        elif kind == "eval":
            what, value = (
                ("response loss", msg["loss"])
                if "loss" in msg
                else ("accuracy", msg.get("accuracy"))
            )
            self._print(
                f"held-out {what} {msg['when']} tuning: "
                f"{'hidden by the terms' if value is None else f'{value:.4f}'}"
            )
