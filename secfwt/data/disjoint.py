"""Training data must not contain evaluation prompts: a safety score measured on prompts the
model was tuned on measures recall, not behaviour.

Later training steps (safety alignment, benign tuning) call :func:`assert_disjoint` with their
training prompts before they start. Matching is on normalised text (:func:`normalise_prompt`:
case, Unicode form, whitespace and punctuation ignored). The error shows an example from the
suite, which is public; it never shows training data that is not also in the suite.
"""

from __future__ import annotations

from collections.abc import Iterable

from secfwt.data.normalise import normalise_prompt
from secfwt.data.suites import SUITE_NAMES, Suite, load_suite
from secfwt.errors import DataError


def assert_disjoint(
    train_prompts: Iterable[str], suites: Iterable[str | Suite] = SUITE_NAMES
) -> None:
    """Raise :class:`DataError` naming the first suite that shares a prompt with
    ``train_prompts``, how many it shares, and one shared prompt as it appears in the suite.

    ``suites``: suite names (every known suite by default) or loaded :class:`Suite` objects.
    """
    train = {normalise_prompt(p) for p in train_prompts}
    train.discard("")
    for item in suites:
        suite = load_suite(item) if isinstance(item, str) else item
        shared = [i for i, p in enumerate(suite.prompts) if normalise_prompt(p) in train]
        if shared:
            example = suite.prompts[shared[0]]
            raise DataError(
                f"training prompts overlap the evaluation suite {suite.name!r}: {len(shared)} of "
                f"its {len(suite)} prompts are training prompts (compared without case, "
                f"whitespace or punctuation), e.g. suite prompt {shared[0]}: {example!r}; remove "
                "them from the training data so the safety evaluation does not measure recall"
            )
