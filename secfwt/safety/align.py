"""``secfwt safety align``: make a safety-aligned chat checkpoint from a base that is not.

The model owner's own plaintext step on public data (the shipped SmolLM2-135M-Instruct refuses
about 2% of harmful requests): a short full fine-tuning (:mod:`.sft`) on a balanced mix of
refusals and self-distilled benign answers (:mod:`.training_data`, :mod:`.self_distill`), with
every training prompt checked against the held-out evaluation prompts before any model loads.

The result is a Hugging Face folder (``save_pretrained`` weights, tokenizer, chat template, and
``secfwt-align.json``: the summary) cached under ``--out`` (default ``$SECFWT_CACHE/models``),
named by a hash of the base weights, the training rows and the settings, so a second call with
the same inputs returns the folder without training, and later steps can start from it. The
folder is written to a temporary name and renamed into place, so no reader sees it half-written.
The self-distilled answers are cached too (``$SECFWT_CACHE/safety``): they depend only on the base
and the prompts, and cost minutes on CPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from secfwt.data.chat_tokenize import drop_too_long, format_instructions
from secfwt.data.instructions import InstructionPairs, load_instructions
from secfwt.data.sampling import check_count
from secfwt.data.task import PaddingSide, Truncation
from secfwt.errors import ConfigError, ModelError
from secfwt.models.checkpoint import load_config, resolve_model_path
from secfwt.models.packaged import cache_root, file_sha256
from secfwt.safety.chat_model import load_chat_model
from secfwt.safety.evaluate import EvalProgress, _NoProgress
from secfwt.safety.self_distill import distil_answers
from secfwt.safety.sft import SftSettings, fine_tune, steps_per_epoch
from secfwt.safety.training_data import (
    ALIGN_SUMMARY_FILE,
    DEFAULT_REFUSAL_SHARE,
    HELD_OUT,
    build_mix,
    check_disjoint,
)

log = logging.getLogger(__name__)

SUMMARY_FILE = ALIGN_SUMMARY_FILE
#: Bumped when the recipe changes in a way the settings do not show (invalidates the cache).
RECIPE_VERSION = 2


@dataclass(frozen=True)
class AlignRequest:
    """The ``secfwt safety align`` flags."""

    model: str = "packaged:smollm2-135m-instruct"
    out: str | None = None  # parent of the cached checkpoint folders
    epochs: int = 2
    lr: float = 2e-5
    limit_train: int = 600  # training rows (before benign answers are filtered)
    refusal_share: float = DEFAULT_REFUSAL_SHARE  # of the training rows, refusals; the rest benign
    seed: int = 0
    batch_size: int = 16
    max_length: int = 96  # tokens per row at the chat template; longer rows are left out
    distil_tokens: int = 48  # new tokens per self-distilled benign answer
    extra_data: str | None = None  # the owner's own prompt/response pairs (JSONL)

    def checked(self) -> AlignRequest:
        """Every bad flag is a :class:`ConfigError` naming it, before anything loads."""
        check_count("--epochs", self.epochs, minimum=1)
        check_count("--limit-train", self.limit_train, minimum=2)
        check_count("--seed", self.seed, minimum=0)
        check_count("--batch-size", self.batch_size, minimum=1)
        check_count("--max-length", self.max_length, minimum=8)
        check_count("--distil-tokens", self.distil_tokens, minimum=1)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
            raise ConfigError(f"--lr = {lr!r} must be a number in (0, 1), e.g. 2e-5")
        if not math.isfinite(lr):
            raise ConfigError(f"--lr = {lr!r} must be finite")
        share = self.refusal_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ConfigError(f"--refusal-share = {share!r} must be a number in (0, 1), e.g. 0.33")
        if self.extra_data is not None and not Path(self.extra_data).is_file():
            raise ConfigError(
                f"--extra-data {self.extra_data!r} is not a file; give a JSONL file with "
                "'prompt' and 'response' fields"
            )
        return replace(self, lr=float(lr))

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("model", "out", "extra_data"):
            out.pop(k)
        return out


@dataclass(frozen=True)
class AlignResult:
    folder: Path
    summary: dict[str, Any]
    cache_hit: bool


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _weights_digest(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelError(f"MODEL: {folder} has no weight files (*.safetensors or *.bin)")
    return _digest([file_sha256(f) for f in files])


def _write_atomic(final: Path, write: Any) -> None:
    """``write(tmp)`` into a temporary sibling folder, then rename it to ``final``; if another
    process got there first, its folder stays and ours is dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_answers(
    chat: Any, base_digest: str, prompts: tuple[str, ...], req: AlignRequest, progress: EvalProgress
) -> tuple[list[tuple[str, str]], dict[str, int], bool]:
    """Self-distilled answers, from ``$SECFWT_CACHE/safety`` when the same base already answered
    the same prompts."""
    key = _digest([base_digest, list(prompts), req.distil_tokens])[:16]
    file = cache_root() / "safety" / f"distil-{key}.json"
    if file.is_file():
        doc = json.loads(file.read_text(encoding="utf-8"))
        return [(str(p), str(a)) for p, a in doc["pairs"]], doc["dropped"], True
    progress.phase("self-distilling benign answers", total=len(prompts))
    pairs, dropped = distil_answers(
        chat.model,
        chat.tokenizer,
        prompts,
        max_new_tokens=req.distil_tokens,
        on_batch=progress.step,
    )
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"pairs": pairs, "dropped": dropped}), encoding="utf-8")
    os.replace(tmp, file)
    return pairs, dropped, False


def run_align(req: AlignRequest, *, progress: EvalProgress | None = None) -> AlignResult:
    """The aligned checkpoint for ``req`` (module doc): from the cache, or trained now."""
    t0 = time.perf_counter()
    view: EvalProgress = progress or _NoProgress()
    req = req.checked()
    base = resolve_model_path(req.model)
    load_config(base)
    extra = (
        load_instructions(source="jsonl", path=req.extra_data)
        if req.extra_data
        else InstructionPairs((), (), ())
    )
    view.phase("building the data mix and checking it against the evaluation suites", None)
    mix = build_mix(req.limit_train, seed=req.seed, refusal_share=req.refusal_share)
    prompts = (*mix.refusals.prompts, *mix.benign, *extra.prompts)
    checked = check_disjoint(prompts)  # before any model loads
    base_digest = _weights_digest(base)
    key = _digest(
        {
            "recipe": RECIPE_VERSION,
            "base": base_digest,
            "refusals": [mix.refusals.prompts, mix.refusals.responses],
            "benign": mix.benign,
            "extra": [extra.prompts, extra.responses, extra.systems],
            "settings": req.settings(),
        }
    )
    root = Path(req.out).expanduser() if req.out else cache_root() / "models"
    final = root / f"aligned-{base.name[:40]}-{key[:12]}"
    if (final / SUMMARY_FILE).is_file():
        summary = json.loads((final / SUMMARY_FILE).read_text(encoding="utf-8"))
        log.info("aligned checkpoint found in the cache: %s", final)
        return AlignResult(folder=final, summary=summary, cache_hit=True)

    view.phase(f"loading {req.model}", None)
    chat = load_chat_model(str(base))
    t_distil = time.perf_counter()
    answered, distil_dropped, distil_hit = _cached_answers(chat, base_digest, mix.benign, req, view)
    distil_s = time.perf_counter() - t_distil
    benign = InstructionPairs(
        prompts=tuple(p for p, _ in answered),
        responses=tuple(a for _, a in answered),
        systems=(None,) * len(answered),
    )
    rows = _concat(mix.refusals, benign, extra)
    fitting = drop_too_long(rows, tokenizer=chat.tokenizer, max_length=req.max_length)
    batch = format_instructions(
        fitting,
        tokenizer=chat.tokenizer,
        max_length=req.max_length,
        truncate=Truncation.NONE,
        padding_side=PaddingSide.RIGHT,
        model_max_positions=int(getattr(chat.model.config, "max_position_embeddings", 2048)),
    )
    settings = SftSettings(epochs=req.epochs, lr=req.lr, batch_size=req.batch_size, seed=req.seed)
    n_steps = req.epochs * steps_per_epoch(len(batch), req.batch_size)
    view.phase(f"fine-tuning on {len(batch)} rows ({n_steps} steps)", total=n_steps)
    t_train = time.perf_counter()
    losses = fine_tune(chat.model, batch, settings, on_step=lambda _: view.step(1))
    train_s = time.perf_counter() - t_train
    per_epoch = steps_per_epoch(len(batch), req.batch_size)
    summary = {
        "base": req.model,
        "base_folder": str(base),
        "base_weights_sha256": base_digest,
        "key": key,
        "settings": req.settings(),
        "recipe": RECIPE_VERSION,
        "data": {
            "rows_per_source": {**mix.counts, "extra": len(extra)},
            "refusal_rows": len(mix.refusals),
            "benign_rows": len(benign),
            "extra_rows": len(extra),
            "trained_rows": len(batch),
            "left_out": {
                **mix.dropped,
                **{f"benign: {k}": v for k, v in distil_dropped.items()},
                f"longer than {req.max_length} tokens": len(rows) - len(fitting),
            },
            "self_distillation_cached": distil_hit,
        },
        "disjointness": {
            "checked": True,
            "held_out_per_split_suite": HELD_OUT,
            "evaluation_prompts_checked": checked,
            "rule": (
                f"training prompts share no prompt (normalised) with the first {HELD_OUT} "
                "prompts of donotanswer, rho-refusal and overrefusal, nor with any AdvBench or "
                f"HarmBench prompt; evaluate with --limit {HELD_OUT} or less"
            ),
        },
        "losses": {
            "steps": losses,
            "first_epoch_mean": sum(losses[:per_epoch]) / per_epoch,
            "last_epoch_mean": sum(losses[-per_epoch:]) / per_epoch,
        },
        "time_s": {
            "self_distillation": distil_s,
            "training": train_s,
            "total": time.perf_counter() - t0,
        },
    }
    view.phase(f"saving {final}", None)

    def write(tmp: Path) -> None:
        chat.model.save_pretrained(tmp)
        chat.tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")

    try:
        _write_atomic(final, write)
    except OSError as exc:
        raise ModelError(
            f"--out: cannot write the aligned checkpoint under {root}: {exc}; give a writable "
            "folder with --out or set SECFWT_CACHE"
        ) from exc
    return AlignResult(folder=final, summary=summary, cache_hit=False)


def _concat(*parts: InstructionPairs) -> InstructionPairs:
    return InstructionPairs(
        prompts=tuple(p for part in parts for p in part.prompts),
        responses=tuple(r for part in parts for r in part.responses),
        systems=tuple(s for part in parts for s in part.systems),
    )
