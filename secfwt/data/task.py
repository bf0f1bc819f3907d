"""What a job's data is for, and how an over-long example is treated: two choices of ``[data]``.

Kept apart from the loaders so the job config can name them without importing any loader.
"""

from __future__ import annotations

import enum


class DataTask(enum.StrEnum):
    """The kind of examples a job tunes on (the ``task`` field of a data config)."""

    CLASSIFICATION = "classification"  # a text and its class label (secfwt.data.datasets)
    INSTRUCTIONS = "instructions"  # a prompt and the reply to learn (secfwt.data.instructions)


class Truncation(enum.StrEnum):
    """What happens to an example longer than the job's public sequence length.

    Under MPC the sequence length is public and fixes the cost, so examples are cut or refused,
    never lengthened. Cutting silently may remove what the label or the reply depends on, so a
    job only cuts where it says so.
    """

    NONE = "none"  # an over-long example is a DataError naming it and the fix
    END = "end"  # keep the first max_length tokens (labelled texts)
    PROMPT_LEFT = "prompt_left"  # drop the prompt's first tokens; template and reply stay whole
    DROP = "drop"  # leave over-long instruction pairs out before the split (counted in the log)

    @staticmethod
    def default_for(task: DataTask) -> Truncation:
        """The policy when a job names none: labelled texts are cut at the end (short reviews
        lose little), instruction pairs are never cut unless the job asks."""
        return Truncation.END if task is DataTask.CLASSIFICATION else Truncation.NONE


class PaddingSide(enum.StrEnum):
    """Where padding goes in a fixed-length row of instruction tokens."""

    RIGHT = "right"  # tokens first, then padding (training and scoring)
    LEFT = "left"  # padding first, so every row's last position is its last token (generation)
