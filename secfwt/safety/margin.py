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
from secfwt.errors import ConfigError, DataError
from secfwt.safety.chat_model import ChatModel, load_chat_model
from secfwt.safety.stats import MeanInterval, mean_interval

log = logging.getLogger(__name__)

#: Prompts per forward: their 2 K rows share the prompt's cached keys and values; the openings'
#: logits, (8 * 2K, ~14, V) float32 for SmolLM2 (V = 49,152), are ~130 MB.
PROMPT_BATCH = 8


def row_losses(model: Any, rows: MarginRows, *, prompts: int = PROMPT_BATCH) -> torch.Tensor:
    """Per-row mean NLL (M,) float64 of the weighted window targets.

    A prompt's 2 K rows differ only in their opening, so the text they share (template and
    prompt, less its last token) runs once, and its cached keys and values serve every opening:
    about a third of the tokens of a forward over the padded rows, with the same values (the
    positions continue the prefix's). Differentiable; the caller chooses ``torch.no_grad``.
    """
    m = rows.input_ids.shape[0]
    if rows.prompts < 1 or m % rows.prompts:
        raise DataError(f"margin rows: {m} rows are not {rows.prompts} prompts' equal groups")
    per = m // rows.prompts  # rows per prompt, consecutive (prompt-major)
    out = []
    for s in range(0, rows.prompts, prompts):
        idx = list(range(s * per, min(rows.prompts, s + prompts) * per))
        out.append(_shared_prefix_losses(model, rows, idx, per))
    return torch.cat(out)


def _shared_prefix_losses(model: Any, rows: MarginRows, idx: list[int], per: int) -> torch.Tensor:
    """:func:`row_losses` of the rows ``idx`` (whole prompts, ``per`` rows each)."""
    n, t, r = len(idx), rows.input_ids.shape[1], rows.window
    seqs = [rows.input_ids[i][rows.attention_mask[i].bool()] for i in idx]  # unpadded rows
    cuts = []  # per prompt: tokens in the cached prefix (the last shared one starts each suffix,
    for g in range(n // per):  # as its logit predicts the opening's first token)
        group = seqs[g * per : (g + 1) * per]
        shared = min(_common_prefix(group[0], q) for q in group[1:])
        if shared < 2:
            raise DataError("margin rows: a prompt's rows share no template prefix")
        cuts.append(shared - 1)
    pre_ids, pre_mask = _pad([seqs[g * per][:c] for g, c in enumerate(cuts)], left=True)
    cache = model(
        input_ids=pre_ids,  # (n/per, Lp)
        attention_mask=pre_mask,
        position_ids=(pre_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    ).cache
    cache.batch_repeat_interleave(per)
    start = torch.tensor(cuts).repeat_interleave(per)  # (n,) first suffix token's position
    suffixes = [q[int(c) :] for q, c in zip(seqs, start, strict=True)]
    suf_ids, suf_mask = _pad(suffixes, left=False)  # (n, Ls), right-padded
    logits = model(
        input_ids=suf_ids,
        attention_mask=torch.cat([pre_mask.repeat_interleave(per, 0), suf_mask], 1),
        position_ids=start[:, None] + torch.arange(suf_ids.shape[1]),
        cache=cache,
    ).logits  # (n, Ls, V)
    # window position T - 1 - R + w of a padded row -> its suffix position
    pad = torch.tensor([t - len(q) for q in seqs])  # (n,)
    pos = (t - 1 - r + torch.arange(r))[None, :] - pad[:, None] - start[:, None]  # (n, R)
    w = rows.target_weights[idx].to(torch.float64)  # (n, R)
    lengths = suf_mask.sum(1, keepdim=True)  # (n, 1)
    if bool(((pos < 0) | (pos >= lengths))[w > 0].any()):
        raise DataError("margin rows: a weighted target lies in the shared prefix")
    picked = logits[torch.arange(n)[:, None], pos.clamp(0, suf_ids.shape[1] - 1)]  # (n, R, V)
    nll = torch.nn.functional.cross_entropy(
        picked.to(torch.float64).transpose(1, 2), rows.target_ids[idx], reduction="none"
    )  # (n, R)
    return (nll * w).sum(1) / w.sum(1)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    k = min(len(a), len(b))
    differ = (a[:k] != b[:k]).nonzero()
    return int(differ[0]) if len(differ) else k


def _pad(seqs: list[torch.Tensor], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded with 0 to the longest, and their 0/1 masks (N, L)."""
    width = max(len(q) for q in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, q in enumerate(seqs):
        span = slice(width - len(q), width) if left else slice(0, len(q))
        ids[i, span], mask[i, span] = q, 1
    return ids, mask


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
        if self.adapter is not None and not self.adapter:
            raise ConfigError("--adapter: empty; give a PEFT adapter folder or leave it out")
        return checked_prompts(self.prompts, count=self.count, max_length=self.max_length)


def checked_prompts(spec: str, *, count: int, max_length: int) -> tuple[str, ...]:
    """The score's prompts from the ``--prompts/--count/--max-length`` flags, checked."""
    check_count("--count", count, minimum=2)  # an interval needs two margins
    check_count("--max-length", max_length, minimum=8)
    return load_prompts(spec, count, field="--prompts")


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
