"""The three roles of a secfwt job and their CrypTen ranks."""

from __future__ import annotations

import enum


class Role(enum.Enum):
    """Who a party is. Ranks are fixed so every party agrees on them without negotiation."""

    MODEL_OWNER = "model_owner"
    DATA_OWNER = "data_owner"
    DEALER = "dealer"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    @classmethod
    def from_rank(cls, rank: int) -> Role:
        for role, r in _RANKS.items():
            if r == rank:
                return role
        raise ValueError(f"no role has rank {rank}")

    @classmethod
    def parse(cls, text: str) -> Role:
        norm = text.strip().lower().replace("-", "_")
        for role in cls:
            if role.value == norm:
                return role
        choices = ", ".join(r.value for r in cls)
        raise ValueError(f"unknown role {text!r}; expected one of: {choices}")


#: The two computing parties hold ranks 0 and 1; CrypTen puts its trusted third party (our
#: dealer) at rank ``world_size``, i.e. 2.
_RANKS = {Role.MODEL_OWNER: 0, Role.DATA_OWNER: 1, Role.DEALER: 2}

#: Computing parties, in rank order.
COMPUTING_ROLES = (Role.MODEL_OWNER, Role.DATA_OWNER)
