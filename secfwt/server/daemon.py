"""A party daemon: the gRPC server (PartyService + grpc.health.v1), its TLS, signals and shutdown.

Security defaults: mutual TLS with the deployment CA as the only trust root
(``require_client_auth=True``), this party's certificate must carry the identity its
``party.toml`` names, and every call's caller must be pinned (checked in
:mod:`secfwt.server.service`). Plaintext needs ``--insecure`` on the command line AND
``party.insecure = true`` in the config, and is announced on stderr and in the log.

``SIGTERM``/``SIGINT``: health turns NOT_SERVING, the party stops taking jobs and cancels the
running one (it becomes resumable), calls in flight get ``jobs.shutdown_grace_s``, and the
process exits 0 with every job record already on disk.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from secfwt.errors import ConfigError
from secfwt.pki.certs import CertificateError, certificate_identity
from secfwt.roles import Role
from secfwt.server import logs
from secfwt.server.client import Credentials, PartyClient
from secfwt.server.config import PartyConfig, PeerEntry, load_party_config
from secfwt.server.convert import state_from_pb
from secfwt.server.logs import fields
from secfwt.server.negotiation import RemoteStatus
from secfwt.server.party import Party
from secfwt.server.runner import JobRunner, MpcJobRunner
from secfwt.server.service import SERVICE_NAME, PartyServicer, add_to_server

log = logging.getLogger("secfwt.server")

INSECURE_BANNER = (
    "\n"
    "!!! WARNING: secfwt party daemon running with --insecure !!!\n"
    "!!! plaintext gRPC: no TLS, no certificates, caller identities are unauthenticated claims.\n"
    "!!! Anyone on the network can read and forge traffic. "
    "Local development only; never with real data.\n"
)


def _check_own_certificate(cfg: PartyConfig) -> None:
    cert_path = Path(cfg.tls.cert)
    ident = certificate_identity(cert_path)
    if ident != cfg.identity:
        raise ConfigError(
            f"{cfg.source}: tls.cert {cert_path} is issued to {ident} "
            f"but [party] says {cfg.identity}; issue a certificate for this party"
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise CertificateError(
            f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "issue a new one with `secfwt certs issue`"
        )
    if cert.not_valid_before_utc > now:
        raise CertificateError(
            f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this host's clock)"
        )


class PartyDaemon:
    """Builds and binds the server in the constructor (``address`` is known before ``start``)."""

    def __init__(
        self,
        config: PartyConfig,
        *,
        runner: JobRunner | None = None,
        insecure_confirmed: bool = False,
    ) -> None:
        self.config = config
        self.insecure = config.party.insecure
        if self.insecure:
            if not insecure_confirmed:
                raise ConfigError(
                    f"{config.source}: party.insecure = true also needs --insecure "
                    "on the command line (plaintext is for local development only)"
                )
            print(INSECURE_BANNER, file=sys.stderr, flush=True)
            log.warning(
                "INSECURE MODE: plaintext gRPC, unauthenticated identities; local development only",
                extra=fields(party=str(config.identity)),
            )
        else:
            _check_own_certificate(config)
        self.creds = Credentials.of_party(config)
        self._peers: dict[PeerEntry, PartyClient] = {}
        self._peers_lock = threading.Lock()
        self.party = Party(
            config=config,
            runner=runner or MpcJobRunner(),
            peer_status=self._peer_status,
            peer_cancel=self._peer_cancel,
        )
        lim = config.limits
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=lim.worker_threads, thread_name_prefix=f"secfwt-rpc-{config.party.id}"
            ),
            maximum_concurrent_rpcs=lim.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", lim.max_message_bytes),
                ("grpc.max_send_message_length", lim.max_message_bytes),
                (
                    "grpc.so_reuseport",
                    0,
                ),  # a second daemon on the same port fails instead of sharing it
            ],
        )
        add_to_server(self.server, PartyServicer(self.party, insecure=self.insecure))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        listen = config.party.listen
        err: RuntimeError | None = None
        try:
            if self.insecure:
                port = self.server.add_insecure_port(listen)
            else:
                creds = grpc.ssl_server_credentials(
                    [(self.creds.key_pem, self.creds.cert_pem)],
                    root_certificates=self.creds.ca_pem,
                    require_client_auth=True,
                )
                port = self.server.add_secure_port(listen, creds)
        except RuntimeError as exc:
            port, err = 0, exc
        if not port:
            self.party.close(timeout=1.0)
            raise ConfigError(
                f"{config.source}: cannot listen on {listen} "
                f"({err or 'address in use or not local'})"
            )
        self.port = port
        self.address = f"{listen.rpartition(':')[0]}:{port}"
        self._stopped = False

    def _peer_client(self, peer: PeerEntry) -> PartyClient:
        with self._peers_lock:
            client = self._peers.get(peer)
            if client is None:
                client = self._peers[peer] = PartyClient(
                    peer.address,
                    self.creds,
                    expect=peer.identity,
                    timeout_s=self.config.jobs.peer_timeout_s,
                    max_message_bytes=self.config.limits.max_message_bytes,
                )
            return client

    def _peer_status(self, peer: PeerEntry, job_id: str) -> RemoteStatus:
        st = self._peer_client(peer).status(job_id)
        return RemoteStatus(
            state_from_pb(st.state),
            st.accepted_terms_digest,
            st.accepted_proposal_digest,
            st.reason,
            st.cancelled_by,
        )

    def _peer_cancel(self, peer: PeerEntry, job_id: str, reason: str) -> None:
        self._peer_client(peer).cancel(job_id, reason)

    def start(self) -> None:
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        info = {
            "address": self.address,
            "pid": os.getpid(),
            "party": str(self.config.identity),
            "insecure": self.insecure,
        }
        (self.config.state_dir / "daemon.json").write_text(json.dumps(info))
        log.info(
            "listening",
            extra=fields(
                **info,
                peers=[str(p.identity) for p in self.config.peers],
                operators=[o.id for o in self.config.operators],
            ),
        )

    def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.jobs.shutdown_grace_s if grace is None else grace
        log.info("shutting down", extra=fields(grace_s=grace))
        self.health.enter_graceful_shutdown()
        self.party.close(timeout=grace)
        self.server.stop(grace).wait(grace + 5)
        with self._peers_lock:
            for c in self._peers.values():
                c.close()
            self._peers.clear()
        log.info("stopped")


def serve(
    config: PartyConfig, *, runner: JobRunner | None = None, insecure_confirmed: bool = False
) -> int:
    """Run a daemon until SIGTERM or SIGINT; returns the exit code (0 after a clean shutdown)."""
    daemon = PartyDaemon(config, runner=runner, insecure_confirmed=insecure_confirmed)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received", extra=fields(signal=signal.Signals(signum).name))
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.start()
        while not stop.wait(1.0):
            pass
    finally:
        daemon.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


INSECURE_SEED_BANNER = (
    "\n"
    "!!! WARNING: --insecure-fixed-seed: "
    "every MPC seed of every job is derived from a known number !!!\n"
    "!!! Anyone who knows it can unmask every secret share. "
    "Reproducibility tests only; never with real data.\n"
)


def run_party(
    role: Role,
    config_path: str | Path,
    *,
    insecure: bool = False,
    verbose: bool = False,
    insecure_fixed_seed: int | None = None,
) -> int:
    """``secfwt party ROLE --config party.toml`` and ``parties/ROLE.py``: load, check, serve."""
    cfg = load_party_config(config_path)
    if cfg.party.role is not role:
        raise ConfigError(
            f"{config_path}: party.role is {cfg.party.role.value} "
            f"but this is the {role.value} daemon"
        )
    if insecure and not cfg.party.insecure:
        raise ConfigError(
            f"{config_path}: --insecure was given but party.insecure is not true; "
            "plaintext needs both (local development only)"
        )
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    logs.configure(
        level=logging.DEBUG if verbose else logging.INFO, file=cfg.state_dir / "daemon.log"
    )
    runner = None
    if insecure_fixed_seed is not None:
        print(INSECURE_SEED_BANNER, file=sys.stderr, flush=True)
        log.warning(
            "INSECURE: fixed MPC seeds (--insecure-fixed-seed); "
            "every share is predictable. Tests only.",
            extra=fields(seed=insecure_fixed_seed),
        )
        runner = MpcJobRunner(insecure_fixed_seed=insecure_fixed_seed)
    return serve(cfg, runner=runner, insecure_confirmed=insecure)
