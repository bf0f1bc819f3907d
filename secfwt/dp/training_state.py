"""Checkpoints of the DP-SGD baseline: everything a resumed run needs to finish exactly like an
uninterrupted one, written atomically, refused when they belong to another job.

Contents: the step counter, the trainable tensors (the frozen encoder is rebuilt from the
model checkpoint), the optimizer state, the accountant's history (so epsilon keeps counting
from where it stopped), and the states of the two random generators (Poisson sampling and
Gaussian noise). With those, steps k+1..T of a resumed run draw the same batches and the same
noise as the uninterrupted run.

Why not ``PrivacyEngine.save_checkpoint``: it saves the whole module state (for MiniLM 22.7 M
frozen parameters, about 90 MB per checkpoint) and its ``load_checkpoint`` unpickles with
``weights_only=False``, which runs code from the file. Here the file holds tensors and plain
containers only and is read with ``weights_only=True``; the accountant and optimizer still go
through their own Opacus/torch ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ConfigError

CHECKPOINT_NAME = "dp_baseline.pt"
FORMAT = 1


@dataclasses.dataclass
class TrainingState:
    """The resumable state after ``step`` completed steps."""

    digest: str  # settings digest of the job that wrote it (see :func:`settings_digest`)
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    accountant: dict[str, Any]
    sampler_rng: torch.Tensor  # torch.Generator.get_state() of the Poisson sampler
    noise_rng: torch.Tensor  # torch.Generator.get_state() of the Gaussian noise
    loss_history: list[float | None]
    batch_sizes: list[int]
    accuracy_before: float
    train_s: float  # training seconds spent so far, across resumed runs


def settings_digest(public: dict[str, Any], *tensors: torch.Tensor) -> str:
    """SHA-256 of the settings that determine the trajectory, plus the data it trains on."""
    h = hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_path(directory: Path) -> Path:
    return directory / CHECKPOINT_NAME


def save_state(directory: Path, state: TrainingState) -> Path:
    """Write atomically: a crash leaves the previous checkpoint or the new one, never half of
    one."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory)
    tmp = directory / f".{CHECKPOINT_NAME}.tmp-{os.getpid()}"
    payload = {"format": FORMAT, **dataclasses.asdict(state)}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def load_state(directory: Path, *, digest: str) -> TrainingState:
    """Read the checkpoint in ``directory``; refuse one from a different job or format."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise ConfigError(
            f"--resume: {directory} holds no checkpoint ({CHECKPOINT_NAME}); run without "
            "--resume to start, or point --checkpoint-dir at the run to continue"
        )
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ConfigError(
            f"--resume: {path} is not a readable dp-baseline checkpoint ({exc}); start again "
            "without --resume in an empty --checkpoint-dir"
        ) from exc
    if payload.get("format") != FORMAT:
        raise ConfigError(
            f"--resume: {path} has checkpoint format {payload.get('format')!r}, this secfwt "
            f"writes {FORMAT}; start again in an empty --checkpoint-dir"
        )
    if payload["digest"] != digest:
        raise ConfigError(
            f"--resume: {path} was written by a different job (settings digest "
            f"{payload['digest'][:12]} vs this job's {digest[:12]}): "
            "model, data, trainable set, [dp] settings, seed and steps must all be the same. "
            "Resume with the same job file and --set "
            "options, or use an empty --checkpoint-dir to start this job afresh"
        )
    fields = {f.name for f in dataclasses.fields(TrainingState)}
    return TrainingState(**{k: v for k, v in payload.items() if k in fields})


def refuse_existing(directory: Path) -> None:
    """Starting afresh must not silently overwrite another run's checkpoint."""
    if checkpoint_path(directory).is_file():
        raise ConfigError(
            f"--checkpoint-dir: {directory} already holds a checkpoint; pass --resume to "
            "continue it, or choose an empty directory"
        )
