"""SWAT-style update scales of a ZO job: warm up robust modules first, per-module learning rates.

SWAT (Du et al., "Toward Secure Tuning", arXiv 2410.04524) keeps fine-tuning from eroding safety by
first training only the modules whose change least moves the model's refusal behaviour (the
"warm-up" of robust modules), then everything, each module with its own learning rate
(module-level LR). In a ZO step the update of tensor n is ``lr * g * z_n`` with a public
direction ``z_n`` and a secret scalar ``g`` (:mod:`secfwt.tuning.spsa`); here each tensor gets a
public factor

    m_n(step) = (0 if step < warmup_steps and n is not robust else 1) * multiplier_n

so the step becomes ``lr * m_n * g * z_n``: a public scalar on a public direction, no
communication in MPC. The factors depend only on the job file and the step, so both parties,
the plaintext reference and a resumed run compute the same ones.

Patterns match like ``zo.trainable`` and ``zo.lora_modules`` (fnmatch, case-sensitive): against
the tensor's full name (``classifier.*``) or its module's (``*.q_proj`` matches
``...q_proj.weight``, ``...q_proj.bias`` and the LoRA factors ``...q_proj.lora_A``/``lora_B``).
A tensor matched by several multiplier patterns takes the first one listed in the file.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from secfwt.config import SafetySection
from secfwt.errors import ConfigError


def matches(name: str, pattern: str) -> bool:
    """A pattern matches a tensor's full name or the name of the module it belongs to."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(
        name.rsplit(".", 1)[0], pattern
    )


@dataclasses.dataclass(frozen=True)
class UpdateScales:
    """The public per-tensor factors m_n(step) of one job's trainable set."""

    warmup_steps: int
    robust: frozenset[str]  # tensors that train during the warm-up
    multipliers: tuple[tuple[str, float], ...]  # (tensor name, multiplier), every trainable one

    def factors(self, step: int) -> dict[str, float]:
        """m_n at ``step`` (0-based) for every trainable tensor."""
        warm = step < self.warmup_steps
        return {n: 0.0 if warm and n not in self.robust else m for n, m in self.multipliers}


def update_scales(safety: SafetySection, names: tuple[str, ...]) -> UpdateScales | None:
    """The factors of ``safety`` for the trainable tensors ``names``; None when the section sets
    nothing (every factor 1). A pattern that matches no trainable tensor is a ConfigError."""
    if not safety.warmup_steps and not safety.lr_multipliers:
        return None
    for field, patterns in (
        ("warmup_modules", safety.warmup_modules),
        ("lr_multipliers", tuple(p for p, _ in safety.lr_multipliers)),
    ):
        for pat in patterns:
            if not any(matches(n, pat) for n in names):
                raise ConfigError(
                    f"safety.{field}: pattern {pat!r} matches no trainable tensor of this job; "
                    f"trainable names look like: {', '.join(names[:4])}"
                )
    robust = frozenset(n for n in names if any(matches(n, p) for p in safety.warmup_modules))
    multipliers = tuple(
        (n, next((m for p, m in safety.lr_multipliers if matches(n, p)), 1.0)) for n in names
    )
    return UpdateScales(warmup_steps=safety.warmup_steps, robust=robust, multipliers=multipliers)
