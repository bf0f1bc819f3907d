"""Translation between the ``secfwt.v1`` protobuf messages and the domain types of
:mod:`secfwt.server.protocol`. Malformed content (unknown enum values, bad identities) becomes
:class:`InvalidRequestError`."""

from __future__ import annotations

from typing import Any

from secfwt.errors import ConfigError
from secfwt.mpc.disclosure import DisclosureTerms, Revealable
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.roles import Role
from secfwt.server.errors import InvalidRequestError, MessageTooLargeError
from secfwt.server.protocol import (
    MAX_DIMENSIONS,
    MAX_SHORT_BYTES,
    MAX_TERMS,
    Commitments,
    DataCommitment,
    JobRecord,
    JobState,
    ModelCommitment,
    PeerInfo,
    ProgressEvent,
    Proposal,
    check_sha256,
    check_text,
)
from secfwt.v1 import party_pb2 as pb

_ROLE_TO_PB: dict[IdentityRole, Any] = {
    IdentityRole.MODEL_OWNER: pb.ROLE_MODEL_OWNER,
    IdentityRole.DATA_OWNER: pb.ROLE_DATA_OWNER,
    IdentityRole.DEALER: pb.ROLE_DEALER,
    IdentityRole.OPERATOR: pb.ROLE_OPERATOR,
}
_ROLE_FROM_PB: dict[Any, IdentityRole] = {v: k for k, v in _ROLE_TO_PB.items()}
_STATE_TO_PB = {s: getattr(pb, f"JOB_STATE_{s.name}") for s in JobState}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def role_to_pb(role: IdentityRole) -> Any:
    return _ROLE_TO_PB[role]


def role_from_pb(value: int, *, field: str) -> IdentityRole:
    try:
        return _ROLE_FROM_PB[value]
    except KeyError:
        raise InvalidRequestError(f"{field}: unknown role value {value}") from None


def identity_to_pb(ident: Identity) -> pb.Identity:
    return pb.Identity(role=role_to_pb(ident.role), party_id=ident.party_id)


def identity_from_pb(msg: pb.Identity, *, field: str) -> Identity:
    try:
        return Identity(role_from_pb(msg.role, field=field), msg.party_id)
    except ConfigError as exc:
        raise InvalidRequestError(f"{field}: {exc}") from None


def state_from_pb(value: int) -> JobState:
    try:
        return _STATE_FROM_PB[value]
    except KeyError:
        raise InvalidRequestError(f"unknown job state value {value}") from None


# -- hello ----------------------------------------------------------------------------------------


def info_to_pb(info: PeerInfo, cls: type = pb.HelloResponse):  # noqa: ANN201 (HelloRequest or HelloResponse)
    msg = cls(
        protocol_version=info.protocol_version,
        software_version=info.software_version,
        capabilities=list(info.capabilities),
    )
    if info.identity is not None:
        msg.identity.CopyFrom(identity_to_pb(info.identity))
    return msg


def info_from_pb(msg) -> PeerInfo:  # noqa: ANN001
    ident = identity_from_pb(msg.identity, field="identity") if msg.HasField("identity") else None
    return PeerInfo(
        protocol_version=msg.protocol_version,
        identity=ident,
        software_version=msg.software_version,
        capabilities=tuple(msg.capabilities),
    )


# -- commitments and proposals --------------------------------------------------------------------


def commitments_to_pb(c: Commitments) -> pb.Commitments:
    msg = pb.Commitments()
    if c.model is not None:
        msg.model.CopyFrom(
            pb.ModelCommitment(
                model_type=c.model.model_type,
                dimensions=dict(c.model.dimensions),
                weights_sha256=c.model.weights_sha256,
            )
        )
    if c.data is not None:
        msg.data.CopyFrom(
            pb.DataCommitment(
                rows=c.data.rows,
                num_classes=c.data.num_classes,
                input_shape=list(c.data.input_shape),
            )
        )
    return msg


def commitments_from_pb(msg: pb.Commitments) -> Commitments:
    model = data = None
    if msg.HasField("model"):
        m = msg.model
        if len(m.dimensions) > MAX_DIMENSIONS:
            raise InvalidRequestError(
                f"commitments.model.dimensions: {len(m.dimensions)} entries, the limit is "
                f"{MAX_DIMENSIONS}"
            )
        for k in m.dimensions:
            check_text(k, field="commitments.model.dimensions key", limit=MAX_SHORT_BYTES)
        check_text(m.model_type, field="commitments.model.model_type", limit=MAX_SHORT_BYTES)
        check_sha256(m.weights_sha256, field="commitments.model.weights_sha256")
        model = ModelCommitment(m.model_type, tuple(sorted(m.dimensions.items())), m.weights_sha256)
    if msg.HasField("data"):
        d = msg.data
        if len(d.input_shape) > 8:
            raise InvalidRequestError(
                f"commitments.data.input_shape: {len(d.input_shape)} dimensions, the limit is 8"
            )
        data = DataCommitment(d.rows, d.num_classes, tuple(d.input_shape))
    return Commitments(model=model, data=data)


def terms_to_pb(terms: DisclosureTerms) -> list[pb.DisclosureTerm]:
    return [
        pb.DisclosureTerm(
            value=t.value.value,
            to=[role_to_pb(IdentityRole.of(r)) for r in sorted(t.to, key=lambda r: r.value)],
        )
        for t in terms.terms
    ]


def terms_from_pb(items) -> DisclosureTerms:  # noqa: ANN001
    pairs = []
    for i, t in enumerate(items):
        try:
            value = Revealable(t.value)
        except ValueError:
            raise InvalidRequestError(
                f"terms[{i}].value {t.value[:64]!r} is not a revealable value; known: "
                f"{', '.join(v.value for v in Revealable)}"
            ) from None
        to = []
        for r in t.to:
            role = role_from_pb(r, field=f"terms[{i}].to").party_role
            if role is None:
                raise InvalidRequestError(
                    f"terms[{i}].to: operators never receive values; name a party role"
                )
            to.append(role)
        pairs.append((value, to))
    return DisclosureTerms.of(pairs)


def proposal_to_pb(p: Proposal) -> pb.JobProposal:
    return pb.JobProposal(
        job_id=p.job_id,
        protocol_version=p.protocol_version,
        job_toml=p.job_toml,
        terms=terms_to_pb(p.terms),
        terms_digest=p.terms_digest,
        commitments=commitments_to_pb(p.commitments),
        participants=[identity_to_pb(i) for i in p.participants],
    )


def proposal_from_pb(msg: pb.JobProposal) -> Proposal:
    if len(msg.terms) > MAX_TERMS:
        raise MessageTooLargeError(f"terms: {len(msg.terms)} entries, the limit is {MAX_TERMS}")
    if len(msg.participants) > len(Role):
        raise InvalidRequestError(
            f"participants: {len(msg.participants)} entries; a job has exactly {len(Role)}"
        )
    return Proposal(
        job_id=msg.job_id,
        protocol_version=msg.protocol_version,
        job_toml=msg.job_toml,
        terms=terms_from_pb(msg.terms),
        terms_digest=msg.terms_digest,
        commitments=commitments_from_pb(msg.commitments),
        participants=tuple(
            identity_from_pb(i, field=f"participants[{n}]") for n, i in enumerate(msg.participants)
        ),
    )


# -- status and progress --------------------------------------------------------------------------


def progress_to_pb(ev: ProgressEvent) -> pb.ProgressEvent:
    return pb.ProgressEvent(
        seq=ev.seq,
        time_unix=ev.time,
        state=_STATE_TO_PB[ev.state],
        phase=ev.phase,
        step=ev.step,
        total_steps=ev.total_steps,
        metrics=dict(ev.metrics),
        message=ev.message,
    )


def progress_from_pb(msg: pb.ProgressEvent) -> ProgressEvent:
    return ProgressEvent(
        seq=msg.seq,
        time=msg.time_unix,
        state=state_from_pb(msg.state),
        phase=msg.phase,
        step=msg.step,
        total_steps=msg.total_steps,
        metrics=tuple(sorted(msg.metrics.items())),
        message=msg.message,
    )


def status_to_pb(rec: JobRecord, *, party: Identity) -> pb.JobStatus:
    msg = pb.JobStatus(
        job_id=rec.job_id,
        state=_STATE_TO_PB[rec.state],
        party=identity_to_pb(party),
        terms_digest=rec.proposal.terms_digest,
        proposal_digest=rec.proposal.digest(),
        accepted_terms_digest=rec.accepted_terms_digest,
        accepted_proposal_digest=rec.accepted_proposal_digest,
        reason=rec.reason,
        artifacts=list(rec.artifacts),
        created_unix=rec.created,
        updated_unix=rec.updated,
        attempts=rec.attempts,
        cancelled_by=rec.cancelled_by if rec.state is JobState.CANCELLED else "",
    )
    if rec.last_progress is not None:
        msg.last_progress.CopyFrom(progress_to_pb(rec.last_progress))
    return msg


def status_to_dict(msg: pb.JobStatus) -> dict[str, Any]:
    """The client's JSON view of a status answer."""
    out: dict[str, Any] = {
        "job_id": msg.job_id,
        "party": f"{role_from_pb(msg.party.role, field='party').value}/{msg.party.party_id}",
        "state": state_from_pb(msg.state).value,
        "terms_digest": msg.terms_digest,
        "proposal_digest": msg.proposal_digest,
        "accepted_terms_digest": msg.accepted_terms_digest,
        "accepted_proposal_digest": msg.accepted_proposal_digest,
        "reason": msg.reason,
        "artifacts": list(msg.artifacts),
        "attempts": msg.attempts,
        "cancelled_by": msg.cancelled_by,
        "created_unix": msg.created_unix,
        "updated_unix": msg.updated_unix,
    }
    if msg.HasField("last_progress"):
        out["last_progress"] = progress_from_pb(msg.last_progress).to_dict()
    return out
