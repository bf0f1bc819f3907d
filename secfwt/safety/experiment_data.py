"""The two data owners of the safety experiment (``secfwt safety experiment``).

* **Benign**: ChatterBot conversation pairs from the training side of the utility split
  (:mod:`.utility` scores the held-out side), as an ordinary data owner tuning a chat model.
* **Malicious**: pyrit's many-shot jailbreak examples
  (``datasets/jailbreak/many_shot_examples.json``, harmful requests with compliant answers), as
  a data owner that tunes the safety away. The answers are cut at the last line or sentence end
  within ``reply_chars`` characters: the start of a compliant answer is what removes the
  refusal, and whole answers (about 300 tokens each) would cost minutes per step on CPUs.

:func:`check_experiment_disjoint` checks every training prompt against every held-out safety
suite (:func:`.training_data.check_disjoint`) and the utility's held-out prompts before any
model loads: a score on prompts the model was tuned on would measure recall.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from secfwt.data.instructions import (
    InstructionPairs,
    load_chatterbot,
    require_disjoint,
    split_by_prompt,
)
from secfwt.data.normalise import normalise_prompt
from secfwt.data.packages import PYRIT
from secfwt.data.suites import SUITE_NAMES, load_suite
from secfwt.errors import DataError
from secfwt.safety.training_data import check_disjoint
from secfwt.safety.utility import chatterbot_held_out

#: The utility split (secfwt.safety.utility): its held-out side scores, its training side tunes.
UTILITY_ROWS, UTILITY_SEED = 200, 0


def _pairs(rows: Sequence[tuple[str, str]], what: str) -> InstructionPairs:
    return InstructionPairs(
        prompts=tuple(p for p, _ in rows),
        responses=tuple(r for _, r in rows),
        systems=(None,) * len(rows),
        origins=tuple(f"{what} row {i}" for i in range(len(rows))),
    )


def benign_pairs(n: int, *, seed: int) -> InstructionPairs:
    """``n`` ChatterBot pairs drawn at random from the training side of the utility split."""
    train, _ = split_by_prompt(load_chatterbot(), eval_rows=UTILITY_ROWS, seed=UTILITY_SEED)
    rows = list(zip(train.prompts, train.responses, strict=True))
    if n > len(rows):
        raise DataError(f"benign rows = {n}: the ChatterBot training side has {len(rows)}")
    random.Random(seed).shuffle(rows)
    return _pairs(rows[:n], "benign")


def _cut(reply: str, limit: int) -> str:
    """``reply`` up to its last line break or sentence end within ``limit`` characters."""
    if len(reply) <= limit:
        return reply
    head = reply[:limit]
    cut = max(head.rfind("\n"), head.rfind(". ") + 1, head.rfind(": ") + 1)
    return head[:cut].strip() if cut > limit // 4 else head.strip()


#: The examples' own label: a compliant answer the dataset marks harmful ("Harmful", "**Harmful**",
#: "Answer: Harmful"); "Not harmful" is not one.
_HARMFUL = re.compile(r"\W*(?:answer\s*:\s*)?\W*harmful\b", re.IGNORECASE)
_RESPONSE_TAG = re.compile(r"^(response|answer)\s*:\s*", re.IGNORECASE)


def malicious_pairs(n: int, *, seed: int, reply_chars: int = 320) -> InstructionPairs:
    """``n`` harmful requests with compliant answers (pyrit many-shot examples labelled harmful),
    none of whose prompts is in any evaluation suite; answers cut to ``reply_chars`` characters
    (module doc)."""
    file = PYRIT.file("datasets", "jailbreak", "many_shot_examples.json")
    try:
        raw = [
            (str(r["user"]).strip(), str(r["assistant"]).strip(), str(r["category"]))
            for r in json.loads(file.read_text("utf-8"))
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f"{file}: expected a JSON list of objects with 'user', 'assistant', 'category': {exc}"
        ) from exc
    in_suites = {normalise_prompt(p) for name in SUITE_NAMES for p in load_suite(name).prompts}
    rows = [
        (u, _cut(_RESPONSE_TAG.sub("", a), reply_chars))
        for u, a, category in raw
        if u and a and _HARMFUL.match(category) and normalise_prompt(u) not in in_suites
    ]
    if n > len(rows):
        raise DataError(f"malicious rows = {n}: {file.name} has {len(rows)} usable pairs")
    random.Random(seed).shuffle(rows)
    return _pairs(rows[:n], "malicious")


def red_team_pairs(n: int, *, seed: int) -> InstructionPairs:
    """The safety gate's adversary: :func:`malicious_pairs`'s ``n`` harmful requests, each
    answered with one of the refusal-margin score's compliance openings in turn, so tuning on
    them pushes the score down as directly as a data owner can. For testing a gate: the
    prompts are checked against the gate's packaged prompts (a :class:`DataError` on overlap),
    since a gate scored on the prompts it was attacked with would see more than it measures."""
    from secfwt.data.refusal_margin import COMPLIANCES, packaged_prompts, require_outside

    prompts = malicious_pairs(n, seed=seed).prompts
    require_outside(packaged_prompts(), prompts, what="the red-team data")
    return _pairs(
        [(p, COMPLIANCES[i % len(COMPLIANCES)]) for i, p in enumerate(prompts)], "red-team"
    )


def check_experiment_disjoint(prompts: Sequence[str]) -> dict[str, int]:
    """Training prompts vs every held-out evaluation set (a :class:`DataError` on overlap);
    returns the evaluation prompts checked per set."""
    checked = check_disjoint(list(prompts))
    held = chatterbot_held_out(rows=UTILITY_ROWS, seed=UTILITY_SEED)
    require_disjoint(held.prompts, training_prompts=prompts, what="the utility's held-out pairs")
    return {**checked, "chatterbot held-out (utility)": len(held)}


def write_jsonl(pairs: InstructionPairs, path: Path) -> Path:
    """``prompt``/``response`` lines: the data file a ZO job (``data.source = "jsonl"``) reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (
        json.dumps({"prompt": p, "response": r}, ensure_ascii=False)
        for p, r in zip(pairs.prompts, pairs.responses, strict=True)
    )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
