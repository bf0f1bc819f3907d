"""Calls to a party daemon, for the ``secfwt job`` commands and for daemons asking their peers.

A :class:`PartyClient` dials one address over mutual TLS with the holder's certificate. When
the expected identity of the daemon is known (a pinned peer, or a ``[[parties]]`` entry of
client.toml), it is the TLS target name: the handshake then only succeeds if the server's
certificate was issued to exactly that identity (its ``PARTY_ID.ROLE.secfwt`` DNS SAN), so a
daemon cannot be impersonated by another holder of a certificate from the same CA. Without an
expected identity the server certificate is checked against the host in the address. gRPC
errors come back as :mod:`secfwt.server.errors` classes (numbered exit codes in the CLI).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import secfwt
from secfwt.errors import ConfigError
from secfwt.pki.certs import certificate_identity, read_tls_files
from secfwt.pki.identity import Identity
from secfwt.server.config import ClientConfig, PartyConfig
from secfwt.server.convert import (
    commitments_from_pb,
    info_from_pb,
    info_to_pb,
    progress_from_pb,
    proposal_to_pb,
)
from secfwt.server.errors import InvalidRequestError, error_for_status
from secfwt.server.protocol import PROTOCOL_VERSION, Commitments, PeerInfo, ProgressEvent, Proposal
from secfwt.server.service import IDENTITY_METADATA
from secfwt.v1 import party_pb2 as pb
from secfwt.v1 import party_pb2_grpc as pbg


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a client presents: its certificate (or, insecure, only an identity claim)."""

    identity: Identity
    cert_pem: bytes = b""
    key_pem: bytes = b""
    ca_pem: bytes = b""
    insecure: bool = False

    @classmethod
    def of_party(cls, cfg: PartyConfig) -> Credentials:
        if cfg.party.insecure:
            return cls(identity=cfg.identity, insecure=True)
        cert, key, ca = read_tls_files(
            cert=Path(cfg.tls.cert), key=Path(cfg.tls.key), ca=Path(cfg.tls.ca)
        )
        return cls(identity=cfg.identity, cert_pem=cert, key_pem=key, ca_pem=ca)

    @classmethod
    def of_client(cls, cfg: ClientConfig) -> Credentials:
        if cfg.client.insecure:
            return cls(identity=cfg.identity, insecure=True)
        missing = [k for k in ("cert", "key", "ca") if not getattr(cfg.tls, k)]
        if missing:
            raise ConfigError(
                f"client: no {', '.join(missing)}: pass --cert, --key and --ca (or a client.toml "
                "with [tls]); --insecure only for local development daemons"
            )
        cert, key, ca = read_tls_files(
            cert=Path(cfg.tls.cert), key=Path(cfg.tls.key), ca=Path(cfg.tls.ca)
        )
        return cls(
            identity=certificate_identity(Path(cfg.tls.cert)), cert_pem=cert, key_pem=key, ca_pem=ca
        )


def _safe_name(name: str) -> str:
    if (
        not name
        or name != os.path.basename(name)
        or name in (".", "..")
        or "\\" in name
        or name.startswith(".")
    ):
        raise InvalidRequestError(
            f"artifact name {name[:80]!r} is not a plain file name; refusing to write it"
        )
    return name


class PartyClient:
    def __init__(
        self,
        address: str,
        creds: Credentials,
        *,
        expect: Identity | None = None,
        timeout_s: float = 30.0,
        max_message_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.address = address
        self.creds = creds
        self.expect = expect
        self.timeout = timeout_s
        opts: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if creds.insecure:
            self.channel = grpc.insecure_channel(address, options=opts)
        else:
            if expect is not None:
                opts.append(("grpc.ssl_target_name_override", expect.dns_name))
            tls = grpc.ssl_channel_credentials(
                root_certificates=creds.ca_pem,
                private_key=creds.key_pem,
                certificate_chain=creds.cert_pem,
            )
            self.channel = grpc.secure_channel(address, tls, options=opts)
        self.stub = pbg.PartyServiceStub(self.channel)
        self._metadata = ((IDENTITY_METADATA, creds.identity.uri),) if creds.insecure else None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PartyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request):  # noqa: ANN001, ANN202
        try:
            return getattr(self.stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_for_status(
                exc.code(), exc.details() or "", where=f"{self.address} {method}"
            ) from None

    def hello(self, capabilities: tuple[str, ...] = ()) -> PeerInfo:
        mine = PeerInfo(PROTOCOL_VERSION, self.creds.identity, secfwt.__version__, capabilities)
        return info_from_pb(self._call("Hello", info_to_pb(mine, pb.HelloRequest)))

    def commitment(self, job_toml: str) -> Commitments:
        return commitments_from_pb(
            self._call("GetCommitment", pb.GetCommitmentRequest(job_toml=job_toml)).commitments
        )

    def propose(self, proposal: Proposal) -> pb.JobStatus:
        return self._call("Propose", pb.ProposeRequest(proposal=proposal_to_pb(proposal))).status

    def accept(self, job_id: str, terms_digest: str, proposal_digest: str = "") -> pb.JobStatus:
        return self._call(
            "Accept",
            pb.AcceptRequest(
                job_id=job_id, terms_digest=terms_digest, proposal_digest=proposal_digest
            ),
        ).status

    def refuse(self, job_id: str, reason: str) -> pb.JobStatus:
        return self._call("Refuse", pb.RefuseRequest(job_id=job_id, reason=reason)).status

    def start(self, job_id: str) -> pb.JobStatus:
        return self._call("Start", pb.StartRequest(job_id=job_id)).status

    def status(self, job_id: str) -> pb.JobStatus:
        return self._call("Status", pb.StatusRequest(job_id=job_id)).status

    def cancel(self, job_id: str, reason: str = "") -> pb.JobStatus:
        return self._call("Cancel", pb.CancelRequest(job_id=job_id, reason=reason)).status

    def resume(self, job_id: str) -> pb.JobStatus:
        return self._call("Resume", pb.ResumeRequest(job_id=job_id)).status

    def remove(self, job_id: str) -> pb.RemoveResponse:
        return self._call("Remove", pb.RemoveRequest(job_id=job_id))

    def watch(
        self, job_id: str, *, after_seq: int = 0, timeout_s: float | None = None
    ) -> Iterator[ProgressEvent]:
        try:
            for msg in self.stub.WatchProgress(
                pb.WatchProgressRequest(job_id=job_id, after_seq=after_seq),
                timeout=timeout_s,
                metadata=self._metadata,
            ):
                yield progress_from_pb(msg)
        except grpc.RpcError as exc:
            raise error_for_status(
                exc.code(), exc.details() or "", where=f"{self.address} WatchProgress"
            ) from None

    def fetch(self, job_id: str, out_dir: Path) -> list[Path]:
        """Download every artifact into ``out_dir``, checking each one's SHA-256."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        fh, h, name = None, hashlib.sha256(), ""
        try:
            for chunk in self.stub.FetchArtifacts(
                pb.FetchArtifactsRequest(job_id=job_id),
                timeout=self.timeout,
                metadata=self._metadata,
            ):
                if fh is None:
                    name, h = _safe_name(chunk.name), hashlib.sha256()
                    fh = open(out_dir / f".{name}.part", "wb")
                elif chunk.name != name:
                    raise InvalidRequestError(
                        f"{self.address}: artifact {name!r} ended without its last chunk"
                    )
                fh.write(chunk.data)
                h.update(chunk.data)
                if chunk.last:
                    fh.close()
                    fh = None
                    if h.hexdigest() != chunk.sha256:
                        (out_dir / f".{name}.part").unlink()
                        raise InvalidRequestError(
                            f"{self.address}: artifact {name!r} arrived corrupted (SHA-256 differs)"
                        )
                    os.replace(out_dir / f".{name}.part", out_dir / name)
                    written.append(out_dir / name)
            if fh is not None:
                raise InvalidRequestError(
                    f"{self.address}: artifact {name!r} ended without its last chunk"
                )
        except grpc.RpcError as exc:
            raise error_for_status(
                exc.code(), exc.details() or "", where=f"{self.address} FetchArtifacts"
            ) from None
        finally:
            if fh is not None:
                fh.close()
                (out_dir / f".{name}.part").unlink(missing_ok=True)
        return written

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name, e.g. 'SERVING'."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            resp = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise error_for_status(
                exc.code(), exc.details() or "", where=f"{self.address} Health"
            ) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
