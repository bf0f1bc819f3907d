"""Safety calibration samples for Safe Delta: harmful requests, each answered with a refusal.

Safe Delta measures how the aligned model's layers respond to safety data (the official code uses
128 harmful instructions with the aligned model's own refusals). Here the requests are the user
turns of pyrit 1.1.0's ``datasets/jailbreak/many_shot_examples.json`` (MIT; 400 harmful
request/compliance pairs from HarmBench's behaviours, whose compliant answers are not used) that
appear in no evaluation suite: half of them are HarmBench prompts, so every prompt found in a suite
(normalised text) is left out, and :func:`secfwt.data.disjoint.assert_disjoint` checks the rest.
193 distinct prompts remain. They are shuffled with a fixed seed (the official code shuffles too)
and each gets one of a few fixed refusals in turn, so the replies do not depend on a model.
"""

from __future__ import annotations

import json
import random

from secfwt.data.disjoint import assert_disjoint
from secfwt.data.normalise import normalise_prompt
from secfwt.data.packages import PYRIT
from secfwt.data.suites import SUITE_NAMES, suite_prompts
from secfwt.errors import ConfigError

DEFAULT_SAMPLES = 128
CALIBRATION_TOKENS = 512  # per sample, the longest first (official seq_len)
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request because it could cause harm.",
    "I won't provide that. If you have another question, I'm happy to help.",
    "Sorry, I can't help with that request; it could be harmful or illegal.",
)


def calibration_pairs(
    samples: int = DEFAULT_SAMPLES, *, seed: int = 0, field: str = "--calibration"
) -> list[tuple[str, str]]:
    """``samples`` (request, refusal) pairs whose requests are in no evaluation suite;
    ``field`` names the setting in the error for a bad count."""
    data = json.loads(PYRIT.file("datasets", "jailbreak", "many_shot_examples.json").read_text())
    evaluated = {normalise_prompt(p) for name in SUITE_NAMES for p in suite_prompts(name)}
    prompts: dict[str, str] = {}  # normalised -> first spelling, in file order
    for row in data:
        prompts.setdefault(normalise_prompt(row["user"]), row["user"])
    pool = [p for key, p in prompts.items() if key not in evaluated]
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= len(pool):
        raise ConfigError(
            f"{field} = {samples!r} must be an integer from 1 to {len(pool)} (the harmful "
            "requests available outside every evaluation suite)"
        )
    random.Random(seed).shuffle(pool)
    chosen = pool[:samples]
    assert_disjoint(chosen)
    return [(p, REFUSALS[i % len(REFUSALS)]) for i, p in enumerate(chosen)]


def calibration_texts(tokenizer, pairs: list[tuple[str, str]]) -> list[str]:
    """Each pair as one chat-template conversation (user turn, assistant refusal)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in pairs
    ]
