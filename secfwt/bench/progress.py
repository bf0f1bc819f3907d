"""Terminal progress of a benchmark run: which case runs now, and for how long.

On a terminal, a rich spinner with the elapsed time of the current case and of the run; in
logs and pipes, one timestamped line per case.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class BenchProgress:
    def __init__(self) -> None:
        self._console = Console(file=sys.stderr)
        self._live = self._console.is_terminal
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self._console,
            disable=not self._live,
            transient=False,
        )
        self._task: TaskID | None = None
        self._t0 = time.monotonic()
        self._n = 0

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
            self._progress.update(self._task, completed=1, total=1)
            self._progress.stop_task(self._task)
            self._task = None

    def case(self, label: str) -> None:
        """A new case starts (party processes are being launched)."""
        self._n += 1
        if self._live:
            self._finish()
            self._task = self._progress.add_task(f"[{self._n}] {label}", total=None)
        else:
            self._console.print(
                f"[{time.monotonic() - self._t0:6.0f} s] case {self._n}: {label}", highlight=False
            )
