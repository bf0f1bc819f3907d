"""Structured daemon logs: one JSON object per line on stderr (and optionally a file).

Log calls pass their fields as ``extra={"fields": {...}}`` (see :func:`fields`); the formatter
emits ``{"time", "level", "logger", "msg", **fields}`` so operators can grep or ship them as-is.

Bounded: a field is clipped to :data:`MAX_FIELD_CHARS` and a traceback to :data:`MAX_EXC_CHARS`
(its first and last lines), so no request can make a daemon log more than a few KiB, whatever it
carries (a deeply nested job file once produced a 200 KB traceback from a 2 KB request).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

#: Longest text a log field keeps; a request's reason or value beyond it is clipped.
MAX_FIELD_CHARS = 1024
#: Longest traceback a log line keeps: its head (where the call entered) and its tail (where it
#: failed, with the exception).
MAX_EXC_CHARS = 4096


def fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` if it takes at most ``limit`` characters in a JSON line, else its start and how
    much was cut (counted as written: escaped, so a line stays short in bytes too)."""
    if len(json.dumps(text)) - 2 <= limit:
        return text
    kept = used = 0
    for ch in text[:limit]:
        used += len(json.dumps(ch)) - 2
        if used > limit:
            break
        kept += 1
    return text[:kept] + f"... [{len(text) - kept} more characters clipped]"


def _clip_traceback(text: str, limit: int) -> str:
    """The first quarter and the last three quarters of ``limit``: entry point and failure."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    if len(text) <= limit:
        return text
    head = limit // 4
    return (
        text[:head]
        + f"\n... [{len(text) - limit} characters of traceback clipped] ...\n"
        + text[len(text) - (limit - head) :]
    )


def _field(value: Any) -> Any:
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, (int, float, bool, type(None))):
        return value
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
        return value if len(text) <= MAX_FIELD_CHARS else clip(text)
    return clip(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(record.getMessage()),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            for k, v in extra.items():
                out.setdefault(k, _field(v))
        if record.exc_info:
            out["exc"] = _clip_traceback(self.formatException(record.exc_info), MAX_EXC_CHARS)
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
