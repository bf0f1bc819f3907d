"""Few-shot splits: stratified, disjoint, deterministic for a seed, shuffled."""

from __future__ import annotations

from collections import Counter

import pytest

from secfwt.data.datasets import LabelledTexts
from secfwt.data.sampling import few_shot_split, take
from secfwt.errors import ConfigError, DataError


def make_data(counts: dict[str, int]) -> LabelledTexts:
    """Unique texts ("<label>-<i>") so disjointness by text is disjointness by row."""
    texts, labels = [], []
    for label, (name, count) in enumerate(counts.items()):
        texts += [f"{name}-{i}" for i in range(count)]
        labels += [label] * count
    return LabelledTexts(texts=tuple(texts), labels=tuple(labels), label_names=tuple(counts))


def test_split_is_stratified_disjoint_and_shuffled() -> None:
    data = make_data({"neg": 40, "pos": 60, "neutral": 25})
    train, evals = few_shot_split(data, shots_per_class=8, eval_per_class=10, seed=3)
    assert train.class_counts() == (8, 8, 8)
    assert evals.class_counts() == (10, 10, 10)
    assert not set(train.texts) & set(evals.texts)
    assert len(set(train.texts)) == len(train) and len(set(evals.texts)) == len(evals)
    for part in (train, evals):  # labels still belong to their texts
        pairs = zip(part.texts, part.labels, strict=True)
        assert all(t.startswith(part.label_names[y] + "-") for t, y in pairs)
        assert list(part.labels) != sorted(part.labels)  # shuffled, not grouped by class


def test_split_is_deterministic_for_a_seed() -> None:
    data = make_data({"a": 50, "b": 50})
    first = few_shot_split(data, shots_per_class=16, eval_per_class=5, seed=7)
    again = few_shot_split(data, shots_per_class=16, eval_per_class=5, seed=7)
    other = few_shot_split(data, shots_per_class=16, eval_per_class=5, seed=8)
    assert first == again
    assert first[0].texts != other[0].texts


def test_eval_per_class_zero_gives_empty_eval() -> None:
    train, evals = few_shot_split(
        make_data({"a": 3, "b": 3}), shots_per_class=3, eval_per_class=0, seed=0
    )
    assert len(train) == 6 and len(evals) == 0 and evals.label_names == ("a", "b")


def test_too_few_examples_names_class_count_and_settings() -> None:
    data = make_data({"a": 30, "b": 12})
    with pytest.raises(DataError) as info:
        few_shot_split(data, shots_per_class=8, eval_per_class=5, seed=0)
    message = str(info.value)
    for expected in ("'b'", "12 examples", "needs 13", "shots_per_class", "eval_per_class"):
        assert expected in message


def test_unused_label_name_cannot_be_split() -> None:
    data = LabelledTexts(texts=("x", "y"), labels=(0, 1), label_names=("a", "b", "c"))
    with pytest.raises(DataError, match="'c' has 0 examples"):
        few_shot_split(data, shots_per_class=1, eval_per_class=0, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shots_per_class": 0, "eval_per_class": 1, "seed": 0}, "shots_per_class"),
        ({"shots_per_class": 1, "eval_per_class": -1, "seed": 0}, "eval_per_class"),
        ({"shots_per_class": 1, "eval_per_class": 1, "seed": -5}, "seed"),
        ({"shots_per_class": 1.5, "eval_per_class": 1, "seed": 0}, "shots_per_class"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        few_shot_split(make_data({"a": 5, "b": 5}), **kwargs)


def test_rotten_tomatoes_16_shot(rotten_tomatoes: LabelledTexts) -> None:
    train, evals = few_shot_split(rotten_tomatoes, shots_per_class=16, eval_per_class=200, seed=0)
    assert train.class_counts() == (16, 16) and evals.class_counts() == (200, 200)
    # Disjoint by row; the corpus repeats a few reviews, so compare (text, label) multisets.
    pool = Counter(zip(rotten_tomatoes.texts, rotten_tomatoes.labels, strict=True))
    drawn = Counter(zip(train.texts, train.labels, strict=True))
    drawn += Counter(zip(evals.texts, evals.labels, strict=True))
    assert all(pool[key] >= count for key, count in drawn.items())


def test_take() -> None:
    data = make_data({"a": 10, "b": 10})
    sample = take(data, n=7, seed=1)
    assert len(sample) == 7 and len(set(sample.texts)) == 7
    assert sample == take(data, n=7, seed=1)
    assert len(take(data, n=0, seed=1)) == 0
    with pytest.raises(DataError, match=r"n = 21.*only 20"):
        take(data, n=21, seed=1)
    with pytest.raises(ConfigError, match="n = -1"):
        take(data, n=-1, seed=1)
