"""Terminal progress of a safety evaluation: one rich bar per phase (prompts generated, suites
judged), a spinner for phases of unknown length; in logs and pipes, one line per phase."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Self

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


class SafetyProgress:
    """Implements :class:`secfwt.safety.evaluate.EvalProgress` on stderr."""

    def __init__(self) -> None:
        self._console = Console(file=sys.stderr)
        self._live = self._console.is_terminal
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            disable=not self._live,
        )
        self._task: TaskID | None = None
        self._t0 = time.monotonic()

    def __enter__(self) -> Self:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._finish()
        self._progress.__exit__(exc_type, exc, tb)

    def _finish(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, completed=task.total or 1, total=task.total or 1)
            self._progress.stop_task(self._task)
            self._task = None

    def phase(self, label: str, total: int | None) -> None:
        """A new phase starts; ``total`` steps (``None``: unknown)."""
        if self._live:
            self._finish()
            self._task = self._progress.add_task(label, total=total)
        else:
            size = f" ({total})" if total else ""
            self._console.print(
                f"[{time.monotonic() - self._t0:6.0f} s] {label}{size}", highlight=False
            )

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)
