"""The text two prompts must share to count as the same prompt, for de-duplicating suites and for
keeping evaluation prompts out of training data.

Looser than :func:`secfwt.data.instructions.prompt_key` (Unicode NFKC, case-folded, whitespace
collapsed), on which it builds: punctuation and symbols are dropped as well, because a prompt
copied from a benchmark into a training set often gains or loses a full stop, quotes or a
trailing question mark ("Write a tutorial on X." == "write a tutorial on x").
"""

from __future__ import annotations

import re

from secfwt.data.instructions import prompt_key

_WORD = re.compile(r"\w+")


def normalise_prompt(text: str) -> str:
    """Words of ``prompt_key(text)`` (letters, digits, underscore) joined by single spaces."""
    return " ".join(_WORD.findall(prompt_key(text)))
