"""Disclosure terms, and the one function through which secret values are ever revealed.

A job lists every value that will be revealed and to whom: the MPC protocols hide everything
else, so this list is all a party learns beyond its own inputs and outputs. Both owners
accept the same terms (same :meth:`DisclosureTerms.digest`) before a job starts. In the code,
:meth:`Discloser.reveal` (a secret-shared value) and :meth:`Discloser.disclose_plain` (a value one
owner holds in the clear, e.g. the embedding table) are the only paths to plaintext: each checks
the accepted terms, raises :class:`DisclosureError` for anything not listed, and appends a line
to the party's audit log before any byte moves. Nothing else in secfwt calls CrypTen's
``get_plain_text``/``reveal`` (a test greps for it).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import DisclosureError
from secfwt.roles import COMPUTING_ROLES, Role

log = logging.getLogger(__name__)


class Revealable(enum.Enum):
    """Every kind of value secfwt can reveal. A job's terms pick from these."""

    EMBEDDING_TABLE = "embedding_table"  # word-embedding table (model owner's weights)
    TRAIN_OUTPUTS = (
        "train_outputs"  # model outputs (logits) for the data owner's own training batch
    )
    TRAIN_LOSS = "train_loss"  # mean training loss of a step
    EVAL_ACCURACY = "eval_accuracy"  # held-out accuracy (one number)
    EVAL_LOSS = "eval_loss"  # held-out mean response loss of a causal-LM job (one number)
    LM_HEAD_TABLE = "lm_head_table"  # an untied LM head's (V, H) table (model owner's weights)
    RANGE_CHECK = "range_check"  # per example and forward: did its hidden states leave the range
    EVAL_OUTPUTS = "eval_outputs"  # model outputs for the data owner's held-out examples
    #: tuned trainable parameters (prompt, head, LoRA, ...; Safe Delta's full deltas instead of
    #: the LoRA factors)
    FINAL_PARAMETERS = "final_parameters"
    VERIFY_OUTPUTS = "verify_outputs"  # secure forward outputs on sample input (verify-model)
    SAFETY_SCORE = "safety_score"  # the safety gate's score before and after tuning (one number)

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Revealable.EMBEDDING_TABLE: "the model owner's word-embedding table",
    Revealable.TRAIN_OUTPUTS: "model outputs for the data owner's own training batch",
    Revealable.TRAIN_LOSS: "the mean training loss of each step",
    Revealable.EVAL_ACCURACY: "held-out accuracy (a single number per evaluation)",
    Revealable.EVAL_LOSS: "held-out mean response loss (a single number per evaluation)",
    Revealable.LM_HEAD_TABLE: "the model owner's LM-head table (an untied output embedding)",
    Revealable.RANGE_CHECK: (
        "one bit per example and secure forward: whether its values (hidden states, or a "
        "classifier's logits and losses) left the value range (a fixed-point truncation "
        "failure) and were computed again"
    ),
    Revealable.EVAL_OUTPUTS: "model outputs for the data owner's held-out examples",
    Revealable.FINAL_PARAMETERS: (
        "the tuned trainable parameters (with Safe Delta: each LoRA module's corrected full "
        "weight delta instead of its factors)"
    ),
    Revealable.VERIFY_OUTPUTS: "secure forward outputs on verification input",
    Revealable.SAFETY_SCORE: (
        "the safety gate's refusal-margin score on the model owner's public harmful prompts "
        "(a single number before and one after tuning)"
    ),
}


@dataclasses.dataclass(frozen=True)
class DisclosureTerm:
    value: Revealable
    to: frozenset[Role]

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value.value, "to": sorted(r.value for r in self.to)}


@dataclasses.dataclass(frozen=True)
class DisclosureTerms:
    terms: tuple[DisclosureTerm, ...]
    #: SHA-256 of the safety policy the job carries (its gate and defences), "" for none: part
    #: of :meth:`digest`, so accepting the terms accepts the policy
    policy: str = ""

    @classmethod
    def of(
        cls, pairs: Iterable[tuple[Revealable, Iterable[Role]]], *, policy: str = ""
    ) -> DisclosureTerms:
        merged: dict[Revealable, set[Role]] = {}
        for value, to in pairs:
            merged.setdefault(value, set()).update(to)
        return cls(
            tuple(
                DisclosureTerm(v, frozenset(r))
                for v, r in sorted(merged.items(), key=lambda kv: kv[0].value)
            ),
            policy=policy,
        )

    @classmethod
    def from_dict_list(cls, items: Iterable[dict[str, Any]]) -> DisclosureTerms:
        return cls.of((Revealable(d["value"]), [Role.parse(r) for r in d["to"]]) for d in items)

    def allows(self, value: Revealable, to: Role) -> bool:
        return any(t.value is value and to in t.to for t in self.terms)

    def recipients(self, value: Revealable) -> frozenset[Role]:
        out: set[Role] = set()
        for t in self.terms:
            if t.value is value:
                out |= t.to
        return frozenset(out)

    def to_list(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.terms]

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: what both owners accept. Terms without a policy
        keep the digest they had before policies existed."""
        form: Any = self.to_list()
        if self.policy:
            form = {"terms": form, "safety_policy": self.policy}
        blob = json.dumps(form, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def describe(self) -> list[str]:
        lines = [
            f"{t.value.description} -> {', '.join(sorted(r.value for r in t.to))}"
            for t in self.terms
        ]
        if self.policy:
            lines.append(f"safety policy (gate and defences) digest {self.policy}")
        return lines


class Discloser:
    """One party's gate to plaintext. Holds the accepted terms and the audit log."""

    def __init__(self, *, role: Role, terms: DisclosureTerms, audit_path: Path | None) -> None:
        self.role = role
        self.terms = terms
        self.audit_path = audit_path
        self._lock = threading.Lock()
        self.count = 0

    def _check(self, value: Revealable, to: Iterable[Role], *, what: str) -> frozenset[Role]:
        recipients = frozenset(to)
        for r in recipients:
            if r not in COMPUTING_ROLES:
                raise DisclosureError(
                    f"{what}: {value.value} cannot be revealed to {r.value}; only the owners "
                    "receive values"
                )
            if not self.terms.allows(value, r):
                raise DisclosureError(
                    f"{what}: revealing {value.value} to {r.value} is not in the accepted "
                    "disclosure terms "
                    f"(terms digest {self.terms.digest()[:12]}); add it to the job's "
                    "[[disclosure]] list if both owners agree"
                )
        return recipients

    def _audit(
        self, value: Revealable, to: frozenset[Role], shape: tuple[int, ...], note: str
    ) -> None:
        entry = {
            "time": time.time(),
            "party": self.role.value,
            "value": value.value,
            "to": sorted(r.value for r in to),
            "shape": list(shape),
            "note": note,
            "terms": self.terms.digest(),
        }
        self.count += 1
        if self.audit_path is None:
            return
        with self._lock, open(self.audit_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def record(self, event: str, **details: Any) -> None:
        """Append an event that reveals nothing (e.g. a release withheld) to the audit log, so
        the log tells the whole story of what left this party and what did not."""
        entry = {
            "time": time.time(),
            "party": self.role.value,
            "event": event,
            **details,
            "terms": self.terms.digest(),
        }
        log.info("audit: %s %s", event, details)
        if self.audit_path is None:
            return
        with self._lock, open(self.audit_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def reveal(
        self, x: Any, *, value: Revealable, to: Iterable[Role], note: str = ""
    ) -> torch.Tensor | None:
        """Reveal a secret-shared tensor to ``to``. Every computing party calls this together.

        Returns the plaintext on recipients and None elsewhere.
        """
        recipients = self._check(value, to, what="reveal")
        self._audit(value, recipients, tuple(x.shape), note)
        if recipients == frozenset(COMPUTING_ROLES):
            return x.get_plain_text()
        (only,) = tuple(recipients)
        out = x.get_plain_text(dst=only.rank)
        return out if self.role is only else None

    def disclose_plain(
        self,
        x: torch.Tensor | None,
        *,
        owner: Role,
        value: Revealable,
        to: Role,
        shape: tuple[int, ...],
        note: str = "",
    ) -> torch.Tensor | None:
        """Send a value ``owner`` holds in the clear to ``to``. Both parties call this together."""
        from secfwt.crypten_compat import crypten

        recipients = self._check(value, [to], what="disclose")
        self._audit(value, recipients, shape, note)
        comm = crypten.communicator.get()
        if self.role is owner:
            if x is None or tuple(x.shape) != tuple(shape):
                raise DisclosureError(
                    f"disclose {value.value}: owner has no value of shape {shape}"
                )
            comm.send(x.contiguous(), to.rank)
            return x
        if self.role is to:
            return comm.recv(
                torch.empty(shape, dtype=x.dtype if x is not None else torch.float32), owner.rank
            )
        return None
