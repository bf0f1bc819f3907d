"""Errors of the party daemons and their clients, and the one table mapping errors to gRPC codes.

Daemon code raises these (or any :class:`secfwt.errors.SecfwtError`); the service guard turns
them into a gRPC status with :func:`status_code_for`, the message unchanged. A client turns a
gRPC status back into the matching class with :func:`error_for_status`, so the CLI exits with
the same numbered code (:func:`secfwt.errors.exit_code_for`) whichever side found the problem.
"""

from __future__ import annotations

import grpc

from secfwt.errors import (
    ConfigError,
    DataError,
    DisclosureError,
    ModelError,
    ProtocolError,
    SecfwtError,
)


class InvalidRequestError(ProtocolError):
    """A request is malformed: a bad job id, an unparsable job file, a field out of range."""


class MessageTooLargeError(ProtocolError):
    """A request or one of its fields exceeds the daemon's size limits."""


class NotAuthorizedError(ProtocolError):
    """The caller's identity is not pinned by this daemon, or its role may not make this call."""

    exit_code = 9


class PeerUnavailableError(ProtocolError):
    """A daemon could not be reached, or the TLS handshake with it failed."""

    exit_code = 10


class JobNotFoundError(ProtocolError):
    """No job with this id at this party."""

    exit_code = 11


class JobExistsError(ProtocolError):
    """A job id was proposed again; ids are never reused (replay protection)."""

    exit_code = 12


class VersionMismatchError(ProtocolError):
    """Caller and daemon speak different protocol versions."""


class CommitmentMismatchError(ProtocolError):
    """A proposal's commitments differ from what this party holds (weights, dataset facts)."""


class TermsMismatchError(ProtocolError):
    """Digests disagree: the proposal's own terms, the operator's review, or another owner's
    acceptance."""


class JobStateError(ProtocolError):
    """The job is not in a state that allows this request (e.g. start before acceptance)."""


class BusyError(ProtocolError):
    """The party's job queue is full; try again when a job finished."""

    exit_code = 13


class TooManyProposalsError(ProtocolError):
    """The caller already has ``limits.max_proposals_per_caller`` jobs here that this party never
    accepted; they expire after ``jobs.proposal_ttl_s``, or an operator removes them."""

    exit_code = 13


#: The one mapping from error classes to gRPC status codes, most specific first.
_STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotAuthorizedError, grpc.StatusCode.PERMISSION_DENIED),
    (PeerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (JobNotFoundError, grpc.StatusCode.NOT_FOUND),
    (JobExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyProposalsError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MessageTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (VersionMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (CommitmentMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (TermsMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (JobStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (DisclosureError, grpc.StatusCode.PERMISSION_DENIED),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (DataError, grpc.StatusCode.FAILED_PRECONDITION),
    (ProtocolError, grpc.StatusCode.FAILED_PRECONDITION),
    (SecfwtError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """gRPC status code for an error raised while serving a call; INTERNAL for unexpected ones."""
    for cls, code in _STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


#: Client side: which error class a status code comes back as.
_FROM_STATUS: dict[grpc.StatusCode, type[SecfwtError]] = {
    grpc.StatusCode.PERMISSION_DENIED: NotAuthorizedError,
    grpc.StatusCode.UNAUTHENTICATED: NotAuthorizedError,
    grpc.StatusCode.UNAVAILABLE: PeerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: PeerUnavailableError,
    grpc.StatusCode.NOT_FOUND: JobNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: JobExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BusyError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: ProtocolError,
}


def error_for_status(code: grpc.StatusCode, details: str, *, where: str) -> SecfwtError:
    """The error a client raises for a failed call to ``where`` (an address)."""
    cls = _FROM_STATUS.get(code, ProtocolError)
    if code is grpc.StatusCode.UNAVAILABLE:
        details = (
            f"{details or 'unreachable'} (is the daemon running there, and do its certificate and "
            "ours come "
            "from the same deployment CA, unexpired, with this host in its SAN list?)"
        )
    return cls(f"{where}: {code.name}: {details}")
