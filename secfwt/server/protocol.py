"""Domain types of the party protocol (version 1): job states, commitments, proposals, progress.

Plain dataclasses, independent of gRPC: :mod:`secfwt.server.convert` maps them to and from the
``secfwt.v1`` messages, and :mod:`secfwt.server.party` runs the protocol on them. The field
limits the daemon enforces on requests live here too.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import time
from typing import Any

from secfwt.errors import ConfigError
from secfwt.mpc.disclosure import DisclosureTerms
from secfwt.pki.identity import Identity
from secfwt.roles import Role
from secfwt.server.errors import InvalidRequestError, MessageTooLargeError

#: Bumped on any incompatible change of the proto or of the rules below; a daemon refuses other
#: versions.
PROTOCOL_VERSION = 1

# Text limits count UTF-8 bytes, as they travel and are stored (a character may take four).
MAX_ID_CHARS = 64  # job ids are ASCII: characters are bytes
MAX_REASON_BYTES = 1024
MAX_TERMS = 32
MAX_CAPABILITIES = 32
MAX_SHORT_BYTES = 64
MAX_DIMENSIONS = 32
ARTIFACT_CHUNK_BYTES = 64 * 1024
# Matched with fullmatch: ``$`` would also match before a final newline ("job-1\n").
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class JobState(enum.Enum):
    PROPOSED = "proposed"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    STARTED = "started"  # both owners accepted the same digests; queued
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: the job ran, but its safety gate kept the tuned parameters back; every party deleted its
    #: shares of them (the reason gives the scores and the rule that failed)
    WITHHELD = "withheld"

    @property
    def terminal(self) -> bool:
        return self in (
            JobState.REFUSED,
            JobState.FINISHED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.WITHHELD,
        )


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidRequestError(
            f"job id {job_id[:80]!r}: use 1 to {MAX_ID_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return job_id


def check_text(value: str, *, field: str, limit: int) -> str:
    """``value`` if its UTF-8 encoding has at most ``limit`` bytes (MessageTooLargeError)."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise MessageTooLargeError(f"{field}: {size} bytes (UTF-8), the limit is {limit}")
    return value


def clip_utf8(text: str, limit: int) -> str:
    """The longest start of ``text`` whose UTF-8 encoding fits in ``limit`` bytes."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def one_line(text: str) -> str:
    """``text`` with its line breaks as spaces: a reason is shown and logged as one line."""
    return " ".join(text.splitlines())


def check_sha256(value: str, *, field: str) -> str:
    if not _SHA256.fullmatch(value):
        raise InvalidRequestError(
            f"{field} {value[:80]!r}: expected 64 lower-case hex digits (SHA-256)"
        )
    return value


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """What Hello exchanges."""

    protocol_version: int
    identity: Identity | None
    software_version: str
    capabilities: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ModelCommitment:
    model_type: str
    dimensions: tuple[tuple[str, int], ...]  # sorted by name
    weights_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "dimensions": dict(self.dimensions),
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCommitment:
        return cls(
            d["model_type"],
            tuple(sorted((str(k), int(v)) for k, v in d["dimensions"].items())),
            d["weights_sha256"],
        )

    def differences(self, held: ModelCommitment) -> list[str]:
        out = []
        if self.model_type != held.model_type:
            out.append(
                f"model_type: proposal says {self.model_type!r}, this model owner holds "
                f"{held.model_type!r}"
            )
        if dict(self.dimensions) != dict(held.dimensions):
            a, b = dict(self.dimensions), dict(held.dimensions)
            diff = {
                k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            }
            out.append(
                "dimensions: "
                + ", ".join(f"{k} proposal {pa} vs held {pb}" for k, (pa, pb) in diff.items())
            )
        if self.weights_sha256 != held.weights_sha256:
            out.append(
                f"weights_sha256: proposal says {self.weights_sha256[:16]}..., this model owner "
                f"holds {held.weights_sha256[:16]}..."
            )
        return out


@dataclasses.dataclass(frozen=True)
class DataCommitment:
    rows: int
    num_classes: int
    input_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataCommitment:
        return cls(int(d["rows"]), int(d["num_classes"]), tuple(int(x) for x in d["input_shape"]))

    def differences(self, held: DataCommitment) -> list[str]:
        out = []
        for name in ("rows", "num_classes", "input_shape"):
            a, b = getattr(self, name), getattr(held, name)
            if a != b:
                out.append(
                    f"{name}: proposal says {list(a) if isinstance(a, tuple) else a}, this data "
                    f"owner holds {list(b) if isinstance(b, tuple) else b}"
                )
        return out


@dataclasses.dataclass(frozen=True)
class Commitments:
    model: ModelCommitment | None = None
    data: DataCommitment | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict() if self.model else None,
            "data": self.data.to_dict() if self.data else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Commitments:
        return cls(
            model=ModelCommitment.from_dict(d["model"]) if d.get("model") else None,
            data=DataCommitment.from_dict(d["data"]) if d.get("data") else None,
        )


@dataclasses.dataclass(frozen=True)
class Proposal:
    job_id: str
    protocol_version: int
    job_toml: str
    terms: DisclosureTerms
    terms_digest: str
    commitments: Commitments
    participants: tuple[Identity, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "protocol_version": self.protocol_version,
            "job_toml": self.job_toml,
            "terms": self.terms.to_list(),
            "terms_digest": self.terms_digest,
            "commitments": self.commitments.to_dict(),
            "participants": sorted(p.uri for p in self.participants),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Proposal:
        return cls(
            job_id=d["job_id"],
            protocol_version=int(d["protocol_version"]),
            job_toml=d["job_toml"],
            terms=DisclosureTerms.from_dict_list(d["terms"]),
            terms_digest=d["terms_digest"],
            commitments=Commitments.from_dict(d["commitments"]),
            participants=tuple(Identity.parse_uri(u) for u in d["participants"]),
        )

    def digest(self) -> str:
        """SHA-256 of everything the parties agree on: job file, terms, commitments,
        participants."""
        return sha256_json(self.to_dict())

    def participant(self, role: Role) -> Identity | None:
        for p in self.participants:
            if p.role.party_role is role:
                return p
        return None


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    seq: int
    time: float
    state: JobState
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    metrics: tuple[tuple[str, float], ...] = ()
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "state": self.state.value,
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "metrics": dict(self.metrics),
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProgressEvent:
        return cls(
            seq=int(d["seq"]),
            time=float(d["time"]),
            state=JobState(d["state"]),
            phase=d.get("phase", ""),
            step=int(d.get("step", 0)),
            total_steps=int(d.get("total_steps", 0)),
            metrics=tuple(sorted((str(k), float(v)) for k, v in d.get("metrics", {}).items())),
            message=d.get("message", ""),
        )


@dataclasses.dataclass
class JobRecord:
    """One job at one party, as persisted in ``STATE_DIR/jobs/ID/job.json``."""

    proposal: Proposal
    state: JobState
    proposed_by: str
    created: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    accepted_terms_digest: str = ""
    accepted_proposal_digest: str = ""
    accepted_by: str = ""
    reason: str = ""
    attempts: int = 0
    artifacts: tuple[str, ...] = ()
    resume_requested: bool = False
    last_progress: ProgressEvent | None = None
    #: who cancelled it, as an identity URI; an operator's is a veto (see Party.resume)
    cancelled_by: str = ""

    @property
    def job_id(self) -> str:
        return self.proposal.job_id

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["proposal"] = self.proposal.to_dict()
        d["state"] = self.state.value
        d["artifacts"] = list(self.artifacts)
        d["last_progress"] = self.last_progress.to_dict() if self.last_progress else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        try:
            d = dict(d)
            d["proposal"] = Proposal.from_dict(d["proposal"])
            d["state"] = JobState(d["state"])
            d["artifacts"] = tuple(d.get("artifacts", ()))
            d["last_progress"] = (
                ProgressEvent.from_dict(d["last_progress"]) if d.get("last_progress") else None
            )
            return cls(**d)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"job record is malformed: {exc}") from exc
