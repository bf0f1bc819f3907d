"""Few-shot train/eval splits and random subsets of :class:`LabelledTexts`.

Few-shot tuning (k examples per class, as in Black-Box Tuning and SecFwT's 16-shot setting) is
sensitive to which examples are drawn, so splits are stratified (every class gets exactly its
share) and reproducible: the same data in the same order with the same seed gives the same split
on every machine (numpy's ``Generator``, PCG64, is stable across platforms and versions).

Disjointness is by row: a text that appears twice in the source (the Rotten Tomatoes corpus has
a few duplicated reviews) can land on both sides; deduplicate the data first if that matters.
"""

from __future__ import annotations

import logging

import numpy as np

from secfwt.data.datasets import LabelledTexts
from secfwt.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def few_shot_split(
    data: LabelledTexts, *, shots_per_class: int, eval_per_class: int, seed: int
) -> tuple[LabelledTexts, LabelledTexts]:
    """Draw ``shots_per_class`` training and ``eval_per_class`` evaluation rows from each class.

    Returns ``(train, eval)``: disjoint, stratified, each in a shuffled order (so batches are not
    sorted by class). Every label name must have enough examples; a class that is short raises
    :class:`DataError` rather than silently giving an unbalanced split.
    """
    check_count("shots_per_class", shots_per_class, minimum=1)
    check_count("eval_per_class", eval_per_class, minimum=0)
    check_seed(seed)
    needed = shots_per_class + eval_per_class
    labels = np.asarray(data.labels, dtype=np.int64)
    rng = np.random.default_rng(seed)

    train_idx: list[np.ndarray] = []
    eval_idx: list[np.ndarray] = []
    for label, name in enumerate(data.label_names):
        rows = np.flatnonzero(labels == label)
        if rows.size < needed:
            raise DataError(
                f"class {name!r} has {rows.size} examples, but shots_per_class = "
                f"{shots_per_class} plus eval_per_class = {eval_per_class} needs {needed}; "
                "lower shots_per_class or eval_per_class, or add examples of this class"
            )
        rows = rng.permutation(rows)
        train_idx.append(rows[:shots_per_class])
        eval_idx.append(rows[shots_per_class:needed])

    train_rows = rng.permutation(np.concatenate(train_idx))
    eval_rows = rng.permutation(np.concatenate(eval_idx))
    log.info(
        "few-shot split (seed %d): %d train (%d per class), %d eval (%d per class) of %d rows",
        seed,
        train_rows.size,
        shots_per_class,
        eval_rows.size,
        eval_per_class,
        len(data),
    )
    return data.subset(train_rows.tolist()), data.subset(eval_rows.tolist())


def take(data: LabelledTexts, *, n: int, seed: int) -> LabelledTexts:
    """``n`` rows drawn uniformly without replacement, in a shuffled order (not stratified).

    Useful to cap an evaluation set or a benchmark run at a fixed size.
    """
    check_count("n", n, minimum=0)
    check_seed(seed)
    if n > len(data):
        raise DataError(f"n = {n} rows requested but the data has only {len(data)}; lower n")
    rows = np.random.default_rng(seed).permutation(len(data))[:n]
    return data.subset(rows.tolist())


def check_count(field: str, value: int, *, minimum: int) -> None:
    """A count from a job (``field``) is an integer, not a bool, and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{field} = {value!r} must be an integer >= {minimum}")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed = {seed!r} must be a non-negative integer")
