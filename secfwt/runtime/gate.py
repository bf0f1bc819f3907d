"""The safety gate of a causal-LM job: the refusal-margin score computed in MPC before and after
tuning, and the decision whether the tuned parameters may leave the parties.

The score (:mod:`secfwt.data.refusal_margin`) is a fixed linear combination of per-row response
losses on public rows: each of the model owner's public harmful prompts with three refusal and
three compliance openings. The model owner builds the rows from its policy's prompts and shares
them (the token ids are public, but only the model owner holds the tables in the clear in every
embedding mode, so it looks the embeddings up itself: no one-hot products). The rows run
through the same frozen prefix, range checks and upper layers as the job's own rows, with the
tuned parameters secret; only the score is revealed, to both owners (the ``safety_score``
term). Both parties then apply the same public rule (:meth:`SafetyGateSection.passes`) to the
same revealed numbers, so they reach the same decision without another round.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from secfwt.config import JobConfig, SafetyGateSection
from secfwt.data.refusal_margin import REFUSALS, load_prompts, margin_rows
from secfwt.data.tokenize import load_tokenizer
from secfwt.errors import DataError
from secfwt.models.checkpoint import load_config, max_input_tokens
from secfwt.models.decoder import DecoderModel
from secfwt.mpc.disclosure import Revealable
from secfwt.roles import Role
from secfwt.runtime.causal import LM_HEAD
from secfwt.runtime.range_checks import OUTPUT_BOUND, RANGE_BOUND, RangeChecks
from secfwt.runtime.session import PartySession
from secfwt.tuning.causal_lm import CausalLMForward, ResponseTargets, causal_prefix

log = logging.getLogger(__name__)

#: The job state of a job whose tuned parameters the gate kept back.
WITHHELD = "withheld: safety"


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """What both owners learn about the gate: the two scores, the decision and why."""

    score_before: float
    score_after: float
    released: bool
    reason: str
    prompts: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": "released" if self.released else WITHHELD}


class SafetyGate:
    """The score's rows as shares, with their own cached frozen prefix."""

    def __init__(
        self,
        sess: PartySession,
        section: SafetyGateSection,
        *,
        forward: CausalLMForward,
        signs: torch.Tensor,
        prompts: int,
        batch: int,
    ) -> None:
        self.sess, self.section, self.forward = sess, section, forward
        self.signs, self.prompts, self.batch = signs, prompts, batch

    def score(self, theta: Mapping[str, Any], *, note: str) -> float:
        """The score with parameters ``theta`` (shares), revealed to both owners."""
        k = len(REFUSALS)
        m = len(self.signs)
        total = None
        for s in range(0, m, self.batch):
            idx = list(range(s, min(m, s + self.batch)))
            losses = self.forward.example_losses([theta], idx)[0]  # (b,) mean NLL per row
            part = (losses * self.signs[s : s + len(idx)]).sum()  # +-1: exact in fixed point
            total = part if total is None else total + part
        assert total is not None
        mean = total * (1.0 / (k * self.prompts))
        both = [Role.MODEL_OWNER, Role.DATA_OWNER]
        got = self.sess.discloser.reveal(mean, value=Revealable.SAFETY_SCORE, to=both, note=note)
        assert got is not None  # revealed to both computing parties
        return float(got)

    def decide(self, before: float, after: float) -> GateDecision:
        released, reason = self.section.passes(before, after)
        return GateDecision(before, after, released, reason, self.prompts)


def gate_rows(cfg: JobConfig, model_dir: Path) -> Any:
    """The model owner's score rows (:class:`~secfwt.data.refusal_margin.MarginRows`)."""
    tok = load_tokenizer(model_dir)
    if tok is None:
        raise DataError(
            f"model.path: {model_dir} has no tokenizer files; the safety gate's rows need the "
            "chat model's tokenizer and its chat template"
        )
    g = cfg.safety_gate
    prompts = load_prompts(g.prompts, g.count)
    return margin_rows(
        prompts,
        tokenizer=tok,
        max_length=g.max_length,
        model_max_positions=max_input_tokens(load_config(model_dir)),
    )


def build_gate(
    sess: PartySession,
    cfg: JobConfig,
    *,
    job_forward: CausalLMForward,
    state: dict[str, torch.Tensor] | None,
    model_dir: Path,
    checks: RangeChecks,
    progress: Callable[..., None],
) -> SafetyGate:
    """Share the score's rows (the model owner's) and compute their frozen prefix, checked; they
    run through the job's own model, frozen values and cut (``job_forward``)."""
    mo = Role.MODEL_OWNER
    spec, cut = job_forward.spec, job_forward.cut
    rows = gate_rows(cfg, model_dir) if sess.role is mo else None
    facts = sess.broadcast(
        None
        if rows is None
        else {
            "shape": list(rows.input_ids.shape),
            "window": rows.window,
            "prompts": rows.prompts,
            "signs": rows.row_weights.sign().tolist(),
        },
        src=mo,
    )
    (m, t), r, h = facts["shape"], facts["window"], spec.hidden_size
    head = word = None
    if state is not None and rows is not None:
        table = state[spec.word_embeddings]
        head = table if spec.tie_word_embeddings else state[LM_HEAD]
        word = table[rows.input_ids]  # (M, T, H)
        head = head[rows.target_ids]  # (M, R, H)

    def share(x: torch.Tensor | None, shape: tuple[int, ...], name: str) -> Any:
        return sess.share(x, owner=mo, shape=shape, name=f"safety gate {name}")

    mask = share(None if rows is None else rows.attention_mask.float(), (m, t), "key mask")
    weights = share(None if rows is None else rows.target_weights.float(), (m, r), "weights")
    targets = share(head, (m, r, h), "target rows")
    model = DecoderModel(spec, job_forward.frozen, sess.ops, job_forward.settings)
    t0 = time.perf_counter()
    progress(kind="phase", phase=f"safety gate: {m} score rows through the frozen prefix")

    def compute(ix: list[int]) -> Any:
        sel = torch.tensor(ix)
        x = share(None if word is None else word[sel], (len(ix), t, h), "input embeddings")
        return causal_prefix(model, x, mask[sel], cut=cut, window=r)

    cache = checks.rows(
        compute, n=m, batch=cfg.run.eval_batch, what="safety gate prefix", bound=RANGE_BOUND
    )
    log.info("safety gate: %d rows, prefix %.1f s", m, time.perf_counter() - t0)
    forward = job_forward.on_rows(
        cache=cache,
        mask=mask,
        targets=ResponseTargets(rows=targets, weights=weights),
        window=r,
        guard=checks.guard(what="safety gate upper layers", bound=RANGE_BOUND),
        loss_guard=checks.guard(what="safety gate response losses", bound=OUTPUT_BOUND),
    )
    return SafetyGate(
        sess,
        cfg.safety_gate,
        forward=forward,
        signs=torch.tensor(facts["signs"]),
        prompts=facts["prompts"],
        batch=cfg.run.eval_batch,
    )
