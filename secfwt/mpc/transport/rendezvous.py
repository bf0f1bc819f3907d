"""How the parties of the TLS mesh find each other and open their authenticated streams.

Before any message flows, each party must learn where every peer listens and open one stream
to it that both ends trust; this module is that set-up, kept apart from the mesh's messaging
(:mod:`secfwt.mpc.transport.mesh`).

Addresses come from the settings (between hosts) or from a local rendezvous folder where each
party publishes the address it listens on (local runs, where ports are picked at random).

The stream's first request is a HELLO (claimed rank, session id); the server answers one ACK
after checking that the client certificate names exactly the role of that rank, then only
reads. As a client a party checks the server's certificate against the expected role name
(gRPC's hostname check with ``grpc.ssl_target_name_override``). A peer that is not up yet is
retried until the connect deadline; a refusal or a certificate that names the wrong role fails
at once, since retrying cannot fix it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

import grpc

from secfwt.errors import ProtocolError
from secfwt.mpc.transport.identity import TlsSettings
from secfwt.mpc.transport.streams import Outbox, role_name

# The mesh's logger: set-up and messaging are one story in the logs.
log = logging.getLogger("secfwt.mpc.transport.mesh")

METHOD = "/secfwt.mpc.v1.Mesh/Stream"
HELLO = struct.Struct("<4sHH")  # magic, claimed rank, session id length; then the session id
HELLO_MAGIC = b"SFH1"
ACK = b"SFA1"
#: Handshake errors that retrying cannot fix (gRPC's texts for a wrong or untrusted certificate).
_CERTIFICATE_FAILURES = (
    "Hostname Verification Check failed",
    "CERTIFICATE_VERIFY_FAILED",
    "certificate verify failed",
)


def _rpc_text(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{getattr(code, 'name', code)}: {details}"


def peer_addresses(
    settings: TlsSettings, *, rank: int, peers: list[int], address: str, deadline: float
) -> dict[int, str]:
    """Where each of ``peers`` listens; publishes our ``address`` first when using a folder."""
    s = settings
    if s.peers:
        missing = [p for p in peers if p not in s.peers]
        if missing:
            raise ProtocolError(
                f"TLS transport: no address for {', '.join(role_name(p) for p in missing)}"
            )
        return {p: s.peers[p] for p in peers}
    if s.rendezvous_dir is None:
        raise ProtocolError(
            "TLS transport: settings give neither peer addresses nor a local rendezvous folder"
        )
    folder = Path(s.rendezvous_dir)
    tmp = folder / f".address-{rank}.tmp"
    tmp.write_text(address)
    os.replace(tmp, folder / f"address-{rank}")  # atomic: readers never see half a line
    out: dict[int, str] = {}
    while len(out) < len(peers):
        for p in peers:
            f = folder / f"address-{p}"
            if p not in out and f.exists():
                # empty while a writer that does not replace atomically is still at it
                text = f.read_text().strip()
                if text:
                    out[p] = text
        if len(out) < len(peers):
            if time.monotonic() > deadline:
                absent = ", ".join(role_name(p) for p in peers if p not in out)
                raise ProtocolError(
                    f"TLS transport: {absent} did not publish an address in {folder} in time"
                )
            time.sleep(0.02)
    return out


def open_stream(
    channel: grpc.Channel,
    *,
    rank: int,
    peer: int,
    address: str,
    session: bytes,
    settings: TlsSettings,
    deadline: float,
) -> Outbox:
    """Open the stream to ``peer`` and wait for its ACK; retry while the peer is not up yet.

    Returns the stream's outbox, its ``call`` set.
    """
    hello = HELLO.pack(HELLO_MAGIC, rank, len(session)) + session
    stream = channel.stream_stream(METHOD)
    last = "no attempt"
    while True:
        box = Outbox()
        call = stream(box.iterate(hello))
        remaining = deadline - time.monotonic()
        timer = threading.Timer(max(0.1, remaining), call.cancel)
        timer.daemon = True
        timer.start()
        try:
            ack = next(call)
        except grpc.RpcError as err:
            box.frames.put(None)  # release gRPC's request thread of this attempt
            code = err.code() if hasattr(err, "code") else None
            last = _rpc_text(err)
            if code in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise ProtocolError(
                    f"TLS transport: {role_name(peer)} at {address} refused "
                    f"{role_name(rank)}: {last}"
                ) from None
            if any(marker in last for marker in _CERTIFICATE_FAILURES):
                raise ProtocolError(
                    f"TLS transport: {role_name(peer)} at {address} did not prove it is "
                    f"{settings.peer_names[peer]!r} "
                    f"(or does not trust our certificate): {last}"
                ) from None
            if time.monotonic() >= deadline:
                raise ProtocolError(
                    "TLS transport: could not open an authenticated stream to "
                    f"{role_name(peer)} at {address} within "
                    f"{settings.connect_timeout_s:.0f} s; last error {last} (peer down, "
                    "its certificate does not name "
                    f"{settings.peer_names[peer]!r}, or it does not trust our certificate)"
                ) from None
            log.debug("MPC TLS transport: stream to %s not open yet: %s", role_name(peer), last)
            time.sleep(0.05)
            continue
        except StopIteration:
            box.frames.put(None)
            raise ProtocolError(
                f"TLS transport: {role_name(peer)} at {address} closed the stream without an ACK"
            ) from None
        finally:
            timer.cancel()
        if ack != ACK:
            raise ProtocolError(
                f"TLS transport: {role_name(peer)} at {address} answered {ack[:16]!r}, not "
                "the mesh ACK"
            )
        box.call = call
        return box
