"""The gRPC face of a party: a thin servicer, and the one guard every PartyService call goes
through.

The guard (:func:`guarded_handlers`) wraps each method handler of the generated service:

1. the caller's identity is read from its verified client certificate (``auth_context``: the
   ``secfwt://ROLE/ID`` URI SAN) and must be pinned (:meth:`Party.authorize`), else
   PERMISSION_DENIED naming the identity;
2. a request that does not parse as its protobuf message is refused with INVALID_ARGUMENT
   (gRPC alone would answer INTERNAL and log a stack trace);
3. any exception becomes a status through :func:`secfwt.server.errors.status_code_for`, its
   message as one line of at most :data:`MAX_DETAIL_BYTES`; unexpected ones are logged with their
   (clipped) traceback and answered INTERNAL without details.

Message size limits are enforced by the server options (RESOURCE_EXHAUSTED before any parsing)
and field limits by the party behind :mod:`secfwt.server.party`. In insecure (development) mode
there are no certificates: the caller's identity is the unauthenticated ``x-secfwt-identity``
metadata claim.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from secfwt.errors import ConfigError
from secfwt.pki.identity import Identity, identity_from_pem
from secfwt.server.convert import (
    commitments_to_pb,
    info_from_pb,
    info_to_pb,
    progress_to_pb,
    proposal_from_pb,
    status_to_pb,
)
from secfwt.server.errors import (
    InvalidRequestError,
    JobNotFoundError,
    NotAuthorizedError,
    status_code_for,
)
from secfwt.server.logs import fields
from secfwt.server.party import Party
from secfwt.server.protocol import ARTIFACT_CHUNK_BYTES, clip_utf8, one_line
from secfwt.v1 import party_pb2 as pb
from secfwt.v1 import party_pb2_grpc as pbg

log = logging.getLogger("secfwt.server.rpc")

SERVICE_NAME = "secfwt.v1.PartyService"
#: Longest refusal reason sent back (UTF-8 bytes): the status travels in a header, which gRPC
#: clients cap at 8 KiB, percent-encoded (a byte may take three).
MAX_DETAIL_BYTES = 1024
IDENTITY_METADATA = "x-secfwt-identity"  # insecure mode only: an unauthenticated identity claim


def caller_identity(context: grpc.ServicerContext, *, insecure: bool) -> Identity | None:
    """The identity of the caller: from its verified certificate, or (insecure mode) its claim."""
    if insecure:
        claim = dict(context.invocation_metadata()).get(IDENTITY_METADATA)
        if not claim:
            return None
        try:
            return Identity.parse_uri(str(claim))
        except ConfigError:
            return None
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    try:
        return identity_from_pem(pem[0])
    except (ConfigError, ValueError):
        return None


class PartyServicer(pbg.PartyServiceServicer):
    """proto -> :class:`Party` call -> proto. No protocol logic here."""

    def __init__(self, party: Party, *, insecure: bool) -> None:
        self.party = party
        self.insecure = insecure

    def _caller(self, context: grpc.ServicerContext) -> Identity:
        ident = caller_identity(context, insecure=self.insecure)
        if ident is None:  # the guard refuses anonymous callers first; never reached
            raise NotAuthorizedError("the caller presented no secfwt identity")
        return ident

    def _status(self, rec) -> pb.JobStatus:  # noqa: ANN001
        return status_to_pb(rec, party=self.party.identity)

    def Hello(self, request, context):  # noqa: N802, ANN001, ANN201
        return info_to_pb(
            self.party.hello(self._caller(context), info_from_pb(request)), pb.HelloResponse
        )

    def GetCommitment(self, request, context):  # noqa: N802, ANN001, ANN201
        c = self.party.commitment_for(self._caller(context), request.job_toml)
        return pb.GetCommitmentResponse(commitments=commitments_to_pb(c))

    def Propose(self, request, context):  # noqa: N802, ANN001, ANN201
        if not request.HasField("proposal"):
            raise InvalidRequestError("Propose: the request carries no proposal")
        rec = self.party.propose(self._caller(context), proposal_from_pb(request.proposal))
        return pb.ProposeResponse(status=self._status(rec))

    def Accept(self, request, context):  # noqa: N802, ANN001, ANN201
        rec = self.party.accept(
            self._caller(context), request.job_id, request.terms_digest, request.proposal_digest
        )
        return pb.AcceptResponse(status=self._status(rec))

    def Refuse(self, request, context):  # noqa: N802, ANN001, ANN201
        return pb.RefuseResponse(
            status=self._status(
                self.party.refuse(self._caller(context), request.job_id, request.reason)
            )
        )

    def Start(self, request, context):  # noqa: N802, ANN001, ANN201
        return pb.StartResponse(
            status=self._status(self.party.start(self._caller(context), request.job_id))
        )

    def Status(self, request, context):  # noqa: N802, ANN001, ANN201
        return pb.StatusResponse(
            status=self._status(self.party.status(self._caller(context), request.job_id))
        )

    def WatchProgress(self, request, context):  # noqa: N802, ANN001, ANN201
        for ev in self.party.watch(
            self._caller(context), request.job_id, request.after_seq, active=context.is_active
        ):
            yield progress_to_pb(ev)

    def Cancel(self, request, context):  # noqa: N802, ANN001, ANN201
        return pb.CancelResponse(
            status=self._status(
                self.party.cancel(self._caller(context), request.job_id, request.reason)
            )
        )

    def Resume(self, request, context):  # noqa: N802, ANN001, ANN201
        return pb.ResumeResponse(
            status=self._status(self.party.resume(self._caller(context), request.job_id))
        )

    def Remove(self, request, context):  # noqa: N802, ANN001, ANN201
        freed = self.party.remove(self._caller(context), request.job_id)
        return pb.RemoveResponse(job_id=request.job_id, freed_bytes=freed)

    def FetchArtifacts(self, request, context):  # noqa: N802, ANN001, ANN201
        for path in self.party.artifact_files(self._caller(context), request.job_id):
            try:
                size, h, offset = path.stat().st_size, hashlib.sha256(), 0
                fh = open(path, "rb")  # closed below; once open it stays readable
            except FileNotFoundError:  # an operator removed the job meanwhile
                raise JobNotFoundError(
                    f"job {request.job_id}: its artifacts were removed while being sent"
                ) from None
            with fh:
                while True:
                    data = fh.read(ARTIFACT_CHUNK_BYTES)
                    h.update(data)
                    last = offset + len(data) >= size or not data
                    yield pb.ArtifactChunk(
                        name=path.name,
                        offset=offset,
                        data=data,
                        size=size,
                        last=last,
                        sha256=h.hexdigest() if last else "",
                    )
                    offset += len(data)
                    if last:
                        break


class _Malformed:
    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf DecodeError and friends
            return _Malformed(f"{type(exc).__name__}: {exc}")

    return parse


class _Capture:
    """Collects the method handlers the generated ``add_..._to_server`` would register."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, _name: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = handlers


def guarded_handlers(servicer: PartyServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The service's method handlers, each wrapped in the identity/parse/error guard."""
    cap = _Capture()
    pbg.add_PartyServiceServicer_to_server(servicer, cap)
    party, insecure = servicer.party, servicer.insecure

    def admit(method: str, request: Any, context: grpc.ServicerContext) -> Identity:
        caller = party.authorize(caller_identity(context, insecure=insecure), method)
        if isinstance(request, _Malformed):
            raise InvalidRequestError(
                f"{method}: the request is not a valid {method}Request message ({request.error})"
            )
        return caller

    def refuse(method: str, context: grpc.ServicerContext, exc: Exception) -> None:
        code = status_code_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("rpc failed", extra=fields(method=method, peer=context.peer()), exc_info=exc)
            context.abort(code, f"{method}: internal error in the daemon (see its log)")
        reason = one_line(str(exc))
        log.warning(
            "rpc refused",
            extra=fields(method=method, peer=context.peer(), code=code.name, reason=reason),
        )
        details = clip_utf8(reason, MAX_DETAIL_BYTES - 48)
        if details != reason:
            cut = len(reason.encode("utf-8", "surrogatepass")) - len(details.encode("utf-8"))
            details += f" ... [{cut} more bytes clipped]"
        context.abort(code, details)

    def wrap(method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if h.unary_unary is not None:
            inner_u = h.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    admit(method, request, context)
                    return inner_u(request, context)
                except Exception as exc:
                    refuse(method, context, exc)

            return h._replace(unary_unary=unary, request_deserializer=_safe(h.request_deserializer))
        inner_s = h.unary_stream

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                admit(method, request, context)
                yield from inner_s(request, context)
            except Exception as exc:
                refuse(method, context, exc)

        return h._replace(unary_stream=stream, request_deserializer=_safe(h.request_deserializer))

    return {name: wrap(name, h) for name, h in cap.handlers.items()}


def add_to_server(server: grpc.Server, servicer: PartyServicer) -> None:
    handlers = guarded_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
