"""Progress display for long jobs (rich), fed by the parties' progress messages."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from secfwt.roles import Role


class ProgressView:
    """Shows the frozen-prefix pass and tuning steps with loss (when the terms reveal it) and ETA."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "ProgressView":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def _task(self, key: str, description: str, total: int) -> Any:
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(description, total=total, info="")
        return self._tasks[key]

    def update(self, role: Role, msg: dict[str, Any]) -> None:
        # The data owner sees everything the model owner sees and more (loss), so show its view.
        if role is not Role.DATA_OWNER:
            return
        kind = msg.get("kind")
        if kind == "phase":
            self._progress.console.print(f"[dim]{msg['phase']}[/dim]")
        elif kind == "prefix":
            t = self._task("prefix", "frozen encoder (MPC)", msg["total"])
            self._progress.update(t, completed=msg["done"])
        elif kind == "step":
            t = self._task("steps", "tuning steps       ", msg["total"])
            loss = msg.get("loss")
            self._progress.update(t, completed=msg["step"], info="" if loss is None else f"loss {loss:.4f}")
        elif kind == "eval":
            acc = msg.get("accuracy")
            self._progress.console.print(f"held-out accuracy {msg['when']} tuning: {'hidden by terms' if acc is None else f'{acc:.4f}'}")
