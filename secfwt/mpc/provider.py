"""Where Beaver triples and the other correlated randomness of an MPC session come from."""

from __future__ import annotations

import enum


class Provider(enum.Enum):
    """Source of correlated randomness; the value is CrypTen's name for it.

    A job file spells it in lower case (``provider = "ttp"``).
    """

    #: A dealer process (CrypTen's trusted third party) that holds no input.
    TTP = "TTP"
    #: Rank 0 generates all triples and learns every other party's input: development only.
    TFP = "TFP"
