"""The data owner's instruction pairs (prompt -> reply), their loaders, and prompt-disjoint splits.

An instruction-tuning job teaches a chat model to give the reply when it is asked the prompt
(optionally under a system message). Like the labelled-text loaders (:mod:`.datasets`), these are
strict: an empty reply, a missing column or a malformed file raises
:class:`~secfwt.errors.DataError` naming the file, the row and the config field, at load time,
before any party starts.

Sources:

* ``chatterbot``: the English conversations of PyPI ``chatterbot-corpus==1.3.3`` (BSD-3-Clause),
  ``chatterbot_corpus/data/english/*.yml``, read by path (the package itself needs nothing, but
  importing ``chatterbot`` would pull a chat-bot framework). Every consecutive pair of turns of a
  conversation is an utterance -> reply pair, as ChatterBot trains on them; exact duplicate pairs
  (``tech_support.yml`` repeats 10 pairs 1,050 times) are kept once, and an entry that is not a
  list of text turns (one in ``trivia.yml``, a YAML typo) is skipped. No system message.
* ``csv`` / ``jsonl``: a local file with a prompt column, a reply column and optionally a system
  column (names configurable). Text is stripped of surrounding whitespace; an empty or missing
  system cell means the chat template's default system message.

Splits are disjoint by prompt: two rows whose prompts are the same text up to case, Unicode form
and whitespace (:func:`prompt_key`) always land on the same side, so a held-out score never
measures recall of a training prompt. :func:`overlapping_rows` / :func:`require_disjoint` let
other code (held-out and safety evaluation sets) check the same property against a training set.
"""

from __future__ import annotations

import importlib.util
import logging
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secfwt.data.datasets import DataSource
from secfwt.data.sampling import check_count, check_seed
from secfwt.data.tables import Row, check_columns, data_file, read_csv, read_jsonl
from secfwt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INSTRUCTION_SOURCES: tuple[DataSource, ...] = (
    DataSource.CHATTERBOT,
    DataSource.CSV,
    DataSource.JSONL,
)
_CHATTERBOT_ENGLISH = ("data", "english")


@dataclass(frozen=True)
class InstructionPairs:
    """Prompts with the replies to learn; ``systems[i]`` is row i's system message or ``None``
    (the chat template's default). ``origins[i]``, when given, says where row i came from
    ("data.jsonl line 7") for error messages; it never holds the text. Immutable so a split can
    never change its source."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    systems: tuple[str | None, ...]
    origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.responses) != n or len(self.systems) != n or len(self.origins) not in (0, n):
            raise DataError(
                f"InstructionPairs: {n} prompts, {len(self.responses)} responses, "
                f"{len(self.systems)} systems and {len(self.origins)} origins; every prompt "
                "needs one response and one system entry (None for the template's default)"
            )
        for i in range(n):
            for field, text in (("prompt", self.prompts[i]), ("response", self.responses[i])):
                if not isinstance(text, str) or not text.strip():
                    where = self.origins[i] if self.origins else f"pair {i}"
                    raise DataError(f"InstructionPairs: {where} has an empty {field}")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> InstructionPairs:
        """The rows at ``indices``, in that order (negative indices are a bug, so rejected)."""
        rows = [int(i) for i in indices]
        for i in rows:
            if not 0 <= i < len(self.prompts):
                raise IndexError(f"subset index {i} is outside 0..{len(self.prompts) - 1}")
        return InstructionPairs(
            prompts=tuple(self.prompts[i] for i in rows),
            responses=tuple(self.responses[i] for i in rows),
            systems=tuple(self.systems[i] for i in rows),
            origins=tuple(self.origins[i] for i in rows) if self.origins else (),
        )


def packaged_chatterbot_dir() -> Path:
    """Folder of the English ChatterBot conversations inside the installed wheel (not imported)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            "source = 'chatterbot' needs the corpus from PyPI chatterbot-corpus==1.3.3, which is "
            "not installed; run `make setup`"
        )
    folder = Path(locations[0]).joinpath(*_CHATTERBOT_ENGLISH)
    if not any(folder.glob("*.yml")):
        raise DataError(
            f"source = 'chatterbot': no conversation files (*.yml) in {folder}; reinstall "
            "chatterbot-corpus==1.3.3 with `make setup`"
        )
    return folder


def load_instructions(
    *,
    source: str | DataSource,
    path: str | Path | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_column: str = "",
) -> InstructionPairs:
    """Load the data owner's instruction pairs.

    ``prompt_column``, ``response_column`` and ``system_column`` (``""``: none) name the columns
    of a ``csv`` file or the fields of a ``jsonl`` file; the packaged ``chatterbot`` corpus has
    fixed fields and takes no ``path``.
    """
    kind = next((s for s in INSTRUCTION_SOURCES if s.value == source), None)
    if kind is None:
        choices = ", ".join(repr(s.value) for s in INSTRUCTION_SOURCES)
        raise ConfigError(
            f"source = {source!r} is not an instruction data source; use one of {choices}"
        )
    if kind is DataSource.CHATTERBOT:
        if path is not None and str(path) != "":
            raise ConfigError(
                f"path = {str(path)!r} is not used with source = 'chatterbot' (the corpus is "
                "packaged); remove path, or use source = 'jsonl' for your own pairs"
            )
        return load_chatterbot()

    file = data_file(path, kind=kind.value)
    columns = {"prompt_column": prompt_column, "response_column": response_column}
    if system_column:
        columns["system_column"] = system_column
    check_columns(columns)
    read = read_csv if kind is DataSource.CSV else read_jsonl
    rows = read(file, columns=columns)
    if not rows:
        raise DataError(f"data file {file} has no rows; add prompt/response pairs")
    prompts, responses, systems, origins = [], [], [], []
    for row in rows:
        origins.append(f"data file {file}, {row.where}")
        prompts.append(_text(row, file=file, field="prompt_column", column=prompt_column))
        responses.append(_text(row, file=file, field="response_column", column=response_column))
        systems.append(_system(row, file=file, column=system_column) if system_column else None)
    data = InstructionPairs(
        prompts=tuple(prompts),
        responses=tuple(responses),
        systems=tuple(systems),
        origins=tuple(origins),
    )
    log.info(
        "loaded %d instruction pairs from %s (%d distinct prompts, %d with a system message)",
        len(data),
        file,
        len({prompt_key(p) for p in data.prompts}),
        sum(s is not None for s in data.systems),
    )
    return data


def load_chatterbot() -> InstructionPairs:
    """Utterance -> reply pairs of the packaged English ChatterBot corpus (see the module doc)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built with it
    pairs: dict[tuple[str, str], str] = {}  # pair -> origin of its first occurrence
    n_pairs = skipped = 0
    for file in sorted(packaged_chatterbot_dir().glob("*.yml")):
        try:
            doc = yaml.load(file.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (safe)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(
                f"cannot read the ChatterBot corpus file {file}: {exc}; reinstall "
                "chatterbot-corpus==1.3.3 with `make setup`"
            ) from exc
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(conversations, list):
            raise DataError(
                f"ChatterBot corpus file {file} has no 'conversations' list; reinstall "
                "chatterbot-corpus==1.3.3 with `make setup`"
            )
        for c, turns in enumerate(conversations, start=1):
            if not _is_conversation(turns):
                skipped += 1
                continue
            for t, (prompt, reply) in enumerate(zip(turns, turns[1:], strict=False), start=1):
                n_pairs += 1
                origin = f"chatterbot {file.name}, conversation {c}, turn {t}"
                pairs.setdefault((prompt.strip(), reply.strip()), origin)
    if skipped:
        log.info("chatterbot: skipped %d entries that are not lists of text turns", skipped)
    data = InstructionPairs(
        prompts=tuple(p for p, _ in pairs),
        responses=tuple(r for _, r in pairs),
        systems=(None,) * len(pairs),
        origins=tuple(pairs.values()),
    )
    log.info(
        "loaded chatterbot: %d distinct pairs (of %d) with %d distinct prompts",
        len(data),
        n_pairs,
        len({prompt_key(p) for p in data.prompts}),
    )
    return data


def prompt_key(prompt: str) -> str:
    """The text two prompts must share to count as the same prompt: Unicode NFKC, case-folded,
    runs of whitespace as one space, stripped ("What is AI?" == " what  is AI? ")."""
    return " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())


def overlapping_rows(prompts: Iterable[str], *, training_prompts: Iterable[str]) -> tuple[int, ...]:
    """Indices into ``prompts`` of those that are also training prompts (by :func:`prompt_key`)."""
    seen = {prompt_key(p) for p in training_prompts}
    return tuple(i for i, p in enumerate(prompts) if prompt_key(p) in seen)


def require_disjoint(prompts: Iterable[str], *, training_prompts: Iterable[str], what: str) -> None:
    """Raise :class:`DataError` when any of ``prompts`` (``what``: e.g. "held-out split") is
    also a training prompt.

    The message gives row indices, never the text: training prompts are the data owner's private
    data, and errors travel to logs and, in a job, to the other parties.
    """
    prompts = list(prompts)
    rows = overlapping_rows(prompts, training_prompts=training_prompts)
    if rows:
        shown = ", ".join(str(i) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
        raise DataError(
            f"{what}: {len(rows)} of {len(prompts)} prompts are also training prompts (rows "
            f"{shown}, compared case- and whitespace-insensitively); remove them from one side "
            "so the evaluation does not measure recall of training data"
        )


def split_by_prompt(
    data: InstructionPairs, *, eval_rows: int, train_rows: int | None = None, seed: int
) -> tuple[InstructionPairs, InstructionPairs]:
    """``(train, held_out)``: ``eval_rows`` held-out pairs and ``train_rows`` (None: all the
    rest) training pairs, no prompt on both sides, each side in a shuffled order.

    Whole prompt groups (rows with the same :func:`prompt_key`) are drawn in a seeded random
    order into the held-out side until it has ``eval_rows`` pairs; pairs of the last group beyond
    that count are left out of both sides rather than leaking into training. Deterministic for a
    seed on every machine (numpy's PCG64). Disjointness is checked on the result.
    """
    check_count("eval_rows", eval_rows, minimum=0)
    if train_rows is not None:
        check_count("train_rows", train_rows, minimum=1)
    check_seed(seed)
    groups = _group_rows([prompt_key(p) for p in data.prompts])
    rng = np.random.default_rng(seed)
    held: list[int] = []
    rest: list[int] = []
    for g in rng.permutation(len(groups)):
        (held if len(held) < eval_rows else rest).extend(groups[g])
    if len(held) < eval_rows:
        raise DataError(
            f"eval_rows = {eval_rows} held-out pairs requested but the data has only "
            f"{len(data)} pairs; lower eval_rows"
        )
    held_rows = rng.permutation(np.asarray(held, dtype=np.int64))[:eval_rows]
    train_idx = rng.permutation(np.asarray(rest, dtype=np.int64))
    if train_rows is not None and train_rows > train_idx.size:
        raise DataError(
            f"train_rows = {train_rows} requested but only {train_idx.size} pairs have prompts "
            f"that are not held out ({len(data)} pairs, eval_rows = {eval_rows}); lower train_rows "
            "or eval_rows"
        )
    if train_idx.size == 0:
        raise DataError(
            f"no training pairs are left after holding out eval_rows = {eval_rows} of "
            f"{len(data)} pairs; lower eval_rows"
        )
    train_rows_idx = train_idx if train_rows is None else train_idx[:train_rows]
    train = data.subset(train_rows_idx.tolist())
    held_out = data.subset(held_rows.tolist())
    require_disjoint(held_out.prompts, training_prompts=train.prompts, what="held-out split")
    log.info(
        "prompt-disjoint split (seed %d): %d train, %d held-out of %d pairs (%d prompts)",
        seed,
        len(train),
        len(held_out),
        len(data),
        len(groups),
    )
    return train, held_out


# --- helpers -------------------------------------------------------------------------------


def _group_rows(keys: Sequence[str]) -> list[list[int]]:
    """Row indices grouped by key, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _is_conversation(turns: Any) -> bool:
    return (
        isinstance(turns, list)
        and len(turns) >= 2
        and all(isinstance(t, str) and t.strip() for t in turns)
    )


def _text(row: Row, *, file: Path, field: str, column: str) -> str:
    value = row.cells[column]
    if value is not None and not isinstance(value, str):
        raise DataError(
            f"data file {file}, {row.where}: {column!r} ({field}) is a {type(value).__name__}, "
            "not text; quote it"
        )
    if value is None or not value.strip():
        raise DataError(
            f"data file {file}, {row.where}: {column!r} ({field}) is empty; fill it in or "
            "remove the row"
        )
    return value.strip()


def _system(row: Row, *, file: Path, column: str) -> str | None:
    value = row.cells[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # the chat template's default system message
    return _text(row, file=file, field="system_column", column=column)
