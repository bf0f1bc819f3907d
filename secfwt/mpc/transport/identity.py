"""Who a party is on the TLS mesh: certificate names, settings, throwaway test certificates.

The naming contract is the deployment's (:mod:`secfwt.pki.identity`, issued by
``secfwt certs issue``): a party certificate carries the DNS SAN ``PARTY_ID.ROLE.secfwt``
(role with dashes, e.g. ``hospital-a.data-owner.secfwt``), the URI SAN
``secfwt://ROLE/PARTY_ID``, and both serverAuth and clientAuth usages, signed by the
deployment CA every party trusts.

Each party checks the peer's identity, not only "signed by the CA": as a TLS client it
verifies the server's certificate against the name pinned for that rank (gRPC's hostname
check with ``grpc.ssl_target_name_override``), and as a server it maps the client
certificate's SAN names to a rank with :func:`rank_for_names` and refuses anything else
(including a certificate that names two pinned peers). Host names and addresses in the
certificate grant nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from secfwt.errors import ConfigError
from secfwt.roles import Role

#: Party id of the certificates :func:`ephemeral_tls_bundle` issues for local runs.
LOCAL_PARTY_ID = "local"


def peer_name(role: Role, party_id: str = LOCAL_PARTY_ID) -> str:
    """The DNS SAN a certificate must carry to act as ``role``/``party_id`` on the MPC mesh."""
    from secfwt.pki.identity import Identity, IdentityRole

    return Identity(IdentityRole.of(role), party_id).dns_name


def default_peer_names() -> dict[int, str]:
    """Rank -> required certificate name for the three roles of a local run."""
    return {role.rank: peer_name(role) for role in Role}


def rank_for_names(names: Iterable[str], peer_names: Mapping[int, str]) -> int | None:
    """The rank a certificate with SAN ``names`` may act as, or None (no pinned name, or
    several)."""
    present = set(names)
    ranks = [rank for rank, name in peer_names.items() if name in present]
    return ranks[0] if len(ranks) == 1 else None


@dataclasses.dataclass(frozen=True)
class TlsSettings:
    """What one party needs to join a TLS mesh. Key material stays in files; only paths travel.

    ``peers`` maps every other rank to ``host:port``; when it is empty, parties on one machine
    find each other's ports through files in ``rendezvous_dir`` (local simulation only).
    ``session_id`` must be equal on all parties of one run: a stream for another session is
    refused, so a stale party of an earlier job cannot attach.
    """

    ca_cert: Path
    cert: Path
    key: Path
    session_id: str
    listen: str = "127.0.0.1:0"
    peers: Mapping[int, str] = dataclasses.field(default_factory=dict)
    rendezvous_dir: Path | None = None
    peer_names: Mapping[int, str] = dataclasses.field(default_factory=default_peer_names)
    #: How long to wait for every peer to come up and authenticate.
    connect_timeout_s: float = 60.0
    #: A receive waits this long for its message (torch.distributed's gloo default is 30 min).
    recv_timeout_s: float = 1800.0
    #: HTTP/2 keepalive pings: a silent peer host is declared lost after about twice this
    #: (:func:`keepalive_for_heartbeat` maps a daemon's ``jobs.heartbeat_timeout_s`` onto it).
    keepalive_s: float = 10.0
    #: Payload bytes per gRPC message; larger tensors are split (streams.py says how it was chosen).
    chunk_bytes: int = 1 << 20
    #: Largest single message accepted from a peer (a header announcing more is refused).
    max_message_bytes: int = 64 << 30

    @property
    def heartbeat_timeout_s(self) -> float:
        """Longest a lost peer goes unnoticed: one ping interval plus one ping-ack timeout."""
        return 2 * self.keepalive_s

    def read_pem(self) -> tuple[bytes, bytes, bytes]:
        """(CA certificate, own certificate chain, own private key) as PEM bytes."""
        out = []
        for what, path in (
            ("CA certificate", self.ca_cert),
            ("certificate", self.cert),
            ("private key", self.key),
        ):
            try:
                out.append(Path(path).read_bytes())
            except OSError as exc:
                raise ConfigError(f"TLS {what} {path}: cannot read it: {exc}") from exc
        return out[0], out[1], out[2]


#: gRPC refuses to ping more often than this; shorter heartbeats are raised to it.
MIN_KEEPALIVE_S = 1.0


def keepalive_for_heartbeat(heartbeat_timeout_s: float) -> float:
    """The keepalive interval that declares a silent peer lost within ``heartbeat_timeout_s``.

    A peer that stops answering is noticed after at most one ping interval (the last ping
    before it vanished was just answered) plus the ping-ack timeout, both ``keepalive_s``
    (mesh.py sets them equal): ``2 * keepalive_s = heartbeat_timeout_s``. A killed process
    is noticed sooner (its kernel resets the connection at once).
    """
    if not heartbeat_timeout_s > 0:
        raise ConfigError(
            f"heartbeat_timeout_s = {heartbeat_timeout_s!r}: must be a positive number of seconds"
        )
    return max(MIN_KEEPALIVE_S, heartbeat_timeout_s / 2)


def tls_settings(
    *,
    role: Role,
    ca_cert: str | Path,
    cert: str | Path,
    key: str | Path,
    listen: str,
    peers: Mapping[Role, str],
    session_id: str,
    peer_names: Mapping[Role, str],
    own_name: str | None = None,
    connect_timeout_s: float = 60.0,
    keepalive_s: float = 10.0,
) -> TlsSettings:
    """Settings for a party daemon on its own host: its listen address, every peer's address.

    ``peers`` must name every other role of the job (the dealer too when the TTP provider is
    used), e.g. ``{Role.DATA_OWNER: "10.0.0.2:7710", Role.DEALER: "10.0.0.3:7710"}``.
    ``peer_names`` pins each of those roles to the DNS SAN its certificate must carry, e.g.
    ``{Role.DATA_OWNER: Identity(IdentityRole.DATA_OWNER, "hospital-a").dns_name, ...}``;
    ``own_name`` (optional) is this party's own name: with it, a peer certificate that also
    names this party is refused as ambiguous.
    """
    if role in peers:
        raise ConfigError(f"TLS peers: {role.value} is this party; list only the other parties")
    if not session_id:
        raise ConfigError(
            "TLS session_id: must be non-empty and equal on every party of the job (e.g. the job "
            "id)"
        )
    for r, addr in peers.items():
        if ":" not in addr:
            raise ConfigError(f"TLS peers: {r.value} address {addr!r} must be host:port")
        if r not in peer_names:
            raise ConfigError(f"TLS peers: no pinned certificate name for {r.value}")
    return TlsSettings(
        ca_cert=Path(ca_cert),
        cert=Path(cert),
        key=Path(key),
        session_id=session_id,
        listen=listen,
        peers={r.rank: addr for r, addr in peers.items()},
        peer_names={r.rank: n for r, n in peer_names.items()}
        | ({role.rank: own_name} if own_name else {}),
        connect_timeout_s=connect_timeout_s,
        keepalive_s=keepalive_s,
    )


@dataclasses.dataclass(frozen=True)
class TlsBundle:
    """Files of a throwaway CA and one certificate + key per role."""

    ca_cert: Path
    certs: Mapping[Role, Path]
    keys: Mapping[Role, Path]


def ephemeral_tls_bundle(
    directory: str | Path, *, roles: Iterable[Role] = tuple(Role), days: float = 1.0
) -> TlsBundle:
    """A throwaway CA and per-role certificates (party id :data:`LOCAL_PARTY_ID`) under
    ``directory``.

    For local simulation and tests. Issued with the deployment's own code
    (:mod:`secfwt.pki.certs`), so they follow the same naming contract; the CA key is
    deleted once the certificates are signed, so nothing else can ever be issued under it.
    """
    from secfwt.pki import certs
    from secfwt.pki.identity import IdentityRole

    out = Path(directory)
    ca = certs.init_ca(out / "ca", common_name="secfwt ephemeral CA", days=days)
    cert_paths: dict[Role, Path] = {}
    key_paths: dict[Role, Path] = {}
    try:
        for role in roles:
            files = certs.issue(
                ca_dir=out / "ca",
                role=IdentityRole.of(role),
                party_id=LOCAL_PARTY_ID,
                hosts=["127.0.0.1", "localhost"],
                out=out / role.value,
                days=days,
            )
            cert_paths[role], key_paths[role] = files.cert, files.key
    finally:
        os.remove(ca.key)
    return TlsBundle(ca_cert=ca.cert, certs=cert_paths, keys=key_paths)
