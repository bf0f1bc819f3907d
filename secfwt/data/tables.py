"""Reading the data owner's local CSV and JSONL files into rows of named columns.

Shared by the labelled-text loaders (:mod:`.datasets`) and the instruction loaders
(:mod:`.instructions`), so both give the same strict errors: a missing file, a file that is not
UTF-8, malformed CSV or JSON, and a missing column each raise :class:`~secfwt.errors.DataError`
naming the file, the row or line, the config field (``text_column``, ``prompt_column``, ...) and
the fix. What a cell must contain is the caller's to check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secfwt.errors import ConfigError, DataError


@dataclass(frozen=True)
class Row:
    """One row of a file: where it is (for errors) and its cells by column name.

    CSV cells are always text (no ``NA``/``null`` guessing); JSONL cells are JSON values.
    """

    where: str  # "row 3" (CSV, data rows counted from 1 after the header) or "line 7" (JSONL)
    cells: Mapping[str, Any]


def check_columns(columns: Mapping[str, str]) -> None:
    """``columns`` maps config fields to column names: each non-empty, no column named twice."""
    seen: dict[str, str] = {}
    for field, column in columns.items():
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{field} = {column!r} must be a non-empty column name")
        if column in seen:
            raise ConfigError(
                f"{seen[column]} and {field} are both {column!r}; they must name two fields"
            )
        seen[column] = field


def data_file(path: str | Path | None, *, kind: str) -> Path:
    """The existing file at ``path`` for a ``csv``/``jsonl`` source (``kind``)."""
    if path is None or str(path) == "":
        raise ConfigError(f"source = '{kind}' needs path = the {kind.upper()} file")
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise DataError(f"data file {file} {what}; set path to an existing {kind} file")
    return file


def read_csv(file: Path, *, columns: Mapping[str, str]) -> list[Row]:
    """Every data row of a CSV file, with the cells of ``columns`` (field -> column name)."""
    import pandas as pd

    try:
        # Every cell as text, no NA guessing: "NA", "null" or "None" are valid texts.
        frame = pd.read_csv(file, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"data file {file} is empty; it needs a header row and at least one row"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {file} is not UTF-8 ({exc}); re-save it as UTF-8") from exc
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(
            f"data file {file} is not valid CSV: {exc}; fix the quoting or the field count"
        ) from exc
    for field, column in columns.items():
        if column not in frame.columns:
            available = ", ".join(repr(c) for c in frame.columns)
            raise DataError(
                f"data file {file} has no column {column!r} ({field}); available columns: "
                f"{available}; set {field} to one of them"
            )
    names = list(columns.values())
    values = zip(*(frame[c] for c in names), strict=True)
    return [
        Row(where=f"row {n}", cells=dict(zip(names, cells, strict=True)))
        for n, cells in enumerate(values, start=1)
    ]


def read_jsonl(file: Path, *, columns: Mapping[str, str]) -> list[Row]:
    """Every JSON object of a JSONL file (blank lines skipped); each must have ``columns``."""
    rows = []
    try:
        with file.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"line {line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"data file {file}, {where}: malformed JSON ({exc.msg} at column "
                        f"{exc.colno}); write one complete JSON object per line"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"data file {file}, {where}: expected a JSON object, got "
                        f"{type(obj).__name__}; write one {{...}} object per line"
                    )
                for field, column in columns.items():
                    if column not in obj:
                        available = ", ".join(repr(k) for k in obj) or "none"
                        raise DataError(
                            f"data file {file}, {where}: no field {column!r} ({field}); fields "
                            f"on this line: {available}; set {field} or add the field to every "
                            "line"
                        )
                rows.append(Row(where=where, cells=obj))
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {file} is not UTF-8 ({exc}); re-save it as UTF-8") from exc
    return rows
