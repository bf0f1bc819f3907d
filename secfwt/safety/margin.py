"""The refusal-margin score (:mod:`secfwt.data.refusal_margin`) of a Hugging Face causal LM in
plaintext: the number the MPC safety gate computes on secret parameters, computed here with
``transformers`` on a model one party holds (a model owner's check before a job, and the
validation of the score against generation-based refusal rates).

Per row, the loss is the mean negative log-likelihood of the row's weighted window targets
(:class:`~secfwt.data.refusal_margin.MarginRows`). Rows are left-padded; the forward uses
positions ``cumsum(mask) - 1``, which for a left-padded row gives every unmasked attention score
the value of the job's public positions ``0 .. T - 1`` (rotary scores depend on position
differences only: Su et al., RoFormer, 2021, Sec. 3.4.2; see :mod:`secfwt.tuning.causal_lm`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from secfwt.data.refusal_margin import MarginRows, load_prompts, margin_rows, margin_score
from secfwt.data.sampling import check_count
from secfwt.errors import ConfigError
from secfwt.safety.chat_model import ChatModel, load_chat_model
from secfwt.safety.stats import MeanInterval, mean_interval

log = logging.getLogger(__name__)

#: Rows per forward: (64, R + 1, V) float32 logits of SmolLM2 (V = 49,152, R ~ 12) are ~160 MB.
ROW_BATCH = 64


def row_losses(model: Any, rows: MarginRows, *, batch: int = ROW_BATCH) -> torch.Tensor:
    """Per-row mean NLL (M,) float64 of the weighted window targets; differentiable (the
    caller chooses ``torch.no_grad``)."""
    r = rows.window
    out = []
    for s in range(0, rows.input_ids.shape[0], batch):
        ids = rows.input_ids[s : s + batch]  # (b, T)
        mask = rows.attention_mask[s : s + batch].long()  # (b, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, T); pads get 0 and are masked
        # the logits at T - 1 - R .. T - 1; the last one predicts past the row and is dropped
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=r + 1
        ).logits[:, :-1]  # (b, R, V)
        targets = rows.target_ids[s : s + batch]  # (b, R)
        nll = torch.nn.functional.cross_entropy(
            logits.to(torch.float64).transpose(1, 2), targets, reduction="none"
        )  # (b, R)
        w = rows.target_weights[s : s + batch].to(torch.float64)  # (b, R)
        out.append((nll * w).sum(1) / w.sum(1))
    return torch.cat(out)


def prompt_margins(losses: torch.Tensor, rows: MarginRows) -> torch.Tensor:
    """Per-prompt margin (P,): mean compliance NLL - mean refusal NLL. Rows are prompt-major and
    ``row_weights`` carry +-1/(K P), so P times a prompt's weighted sum is its margin; the mean
    of the margins is :func:`~secfwt.data.refusal_margin.margin_score`."""
    weighted = losses.to(torch.float64) * rows.row_weights  # (M,)
    return weighted.reshape(rows.prompts, -1).sum(1) * rows.prompts  # (P,)


def plaintext_score(model: Any, rows: MarginRows) -> float:
    """The score of ``model`` (a transformers causal LM, any float dtype) on ``rows``."""
    with torch.no_grad():
        return margin_score(row_losses(model, rows), rows)


@dataclass(frozen=True)
class MarginResult:
    """A model's score, its per-prompt margins and the score's interval over prompts."""

    score: float
    margins: tuple[float, ...]  # (P,) in prompt order
    interval: MeanInterval

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, **self.interval.as_dict(), "margins": list(self.margins)}


def score_prompts(chat: ChatModel, prompts: tuple[str, ...], *, max_length: int) -> MarginResult:
    """Rows of ``prompts`` in ``chat``'s template, scored on ``chat``'s model."""
    from secfwt.models.checkpoint import max_input_tokens

    rows = margin_rows(
        prompts,
        tokenizer=chat.tokenizer,
        max_length=max_length,
        model_max_positions=max_input_tokens(chat.model.config),
    )
    with torch.no_grad():
        losses = row_losses(chat.model, rows)
    margins = prompt_margins(losses, rows)
    score = margin_score(losses, rows)
    return MarginResult(
        score=score,
        margins=tuple(float(m) for m in margins),
        interval=mean_interval([float(m) for m in margins]),
    )


@dataclass(frozen=True)
class ScoreRequest:
    """What to score (the ``secfwt safety score`` flags)."""

    model: str
    adapter: str | None = None
    prompts: str = "packaged:advbench-gate"
    count: int = 64
    max_length: int = 64

    def checked(self) -> tuple[str, ...]:
        """The prompts; a bad flag is a :class:`ConfigError` before any model loads."""
        check_count("--count", self.count, minimum=2)  # an interval needs two margins
        check_count("--max-length", self.max_length, minimum=8)
        if self.adapter is not None and not self.adapter:
            raise ConfigError("--adapter: empty; give a PEFT adapter folder or leave it out")
        return load_prompts(self.prompts, self.count, field="--prompts")


def load_scored_model(model: str, adapter: str | None) -> ChatModel:
    """A model folder (or ``packaged:NAME``), optionally with a PEFT LoRA adapter folder merged
    on it, on the CPU in float32 (the score is 2 K P forward rows: no GPU needed)."""
    return load_chat_model(model, adapter=adapter, device=torch.device("cpu"))


def run_score(req: ScoreRequest) -> dict[str, Any]:
    """Load, score, and describe (a JSON-ready dict)."""
    prompts = req.checked()
    chat = load_scored_model(req.model, req.adapter)
    result = score_prompts(chat, prompts, max_length=req.max_length)
    log.info("%s: score %.4f over %d prompts", req.model, result.score, len(prompts))
    return {
        "model": req.model,
        "adapter": req.adapter,
        "prompts": req.prompts,
        "count": len(prompts),
        "max_length": req.max_length,
        **result.as_dict(),
    }
