"""Terminal progress of a safety evaluation: one rich bar per phase (prompts generated, suites
judged), a spinner for phases of unknown length; in logs and pipes, a line per phase and about
every 10% of it, so a log shows that a long evaluation is alive."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class SafetyProgress(Progress):
    """A rich :class:`Progress` (use it as a context manager) that implements
    :class:`secfwt.safety.evaluate.EvalProgress` on stderr."""

    def __init__(self) -> None:
        console = Console(file=sys.stderr)
        super().__init__(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self._current: TaskID | None = None
        self._t0 = time.monotonic()
        self._tenth = -1

    def phase(self, label: str, total: int | None) -> None:
        """A new phase starts; ``total`` steps (``None``: unknown)."""
        if self._current is not None:  # the last phase is complete
            done = self.tasks[self._current]
            self.update(self._current, total=done.total or 1, completed=done.total or 1)
        self._current = self.add_task(label, total=total)
        self._tenth = 0
        self._log(f"{label}" + (f" (0/{total})" if total else ""))

    def step(self, n: int) -> None:
        """``n`` more steps of the current phase are done."""
        if self._current is None:
            return
        self.advance(self._current, n)
        task = self.tasks[self._current]
        tenth = int(10 * task.completed // task.total) if task.total else 0
        if tenth > self._tenth:
            self._tenth = tenth
            self._log(f"{task.description} ({int(task.completed)}/{int(task.total or 0)})")

    def _log(self, text: str) -> None:
        if self.disable:
            self.console.print(f"[{time.monotonic() - self._t0:6.0f} s] {text}", highlight=False)
