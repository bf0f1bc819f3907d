"""Structured daemon logs: one JSON object per line on stderr (and optionally a file).

Log calls pass their fields as ``extra={"fields": {...}}`` (see :func:`fields`); the formatter
emits ``{"time", "level", "logger", "msg", **fields}`` so operators can grep or ship them as-is.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any


def fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            for k, v in extra.items():
                out.setdefault(
                    k,
                    v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v),
                )
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(*, level: int = logging.INFO, file: Path | None = None) -> None:
    """JSON lines on stderr (and ``file``) for the daemon process; replaces earlier handlers."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(JsonFormatter())
        root.addHandler(h)
    root.setLevel(level)
