"""A full mesh of mutually authenticated TLS gRPC streams between the parties of one MPC run.

Every party runs one gRPC server (``require_client_auth=True``) and opens one long-lived
bidirectional stream to every other party: one stream per ordered pair (src -> dst), so
messages from one party to another arrive in the order they were sent. How the parties find
each other and authenticate each stream is :mod:`secfwt.mpc.transport.rendezvous`; the frames
on a stream and the buffers at its ends are :mod:`secfwt.mpc.transport.streams`. This module
is the mesh that owns them: it starts and stops the server and the streams, routes messages
to and from the right peer, and fails the whole session when a peer is lost. Everything on
the wire is TLS records.

Why one persistent stream per peer and not one unary RPC per message: a unary call costs a
new HTTP/2 stream, metadata and a response; CrypTen sends thousands of small messages per
layer (one round each), and a persistent stream keeps the small-message latency to one hop.

A lost peer (stream ended without CLOSE, connection reset, keepalive timeout) fails every
pending and future receive and send of this party, from and to **every** peer, with a
:class:`ProtocolError` naming the lost role: an MPC session cannot go on without any of its
parties, and a party blocked on a live peer (the dealer waiting for the model owner's next
request when the data owner dies) would otherwise wait for a message that never comes.
Detection time: a killed process's sockets are closed by its kernel, so the peers see the
reset at once; a host that vanishes (power, network) sends nothing, and is declared lost by
HTTP/2 keepalive after at most ``keepalive_s`` (ping interval) + ``keepalive_s`` (ping ack
timeout), i.e. ``2 * keepalive_s`` plus scheduling delay (:func:`keepalive_for_heartbeat`).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc

from secfwt.errors import ProtocolError
from secfwt.mpc.transport.identity import TlsSettings, rank_for_names
from secfwt.mpc.transport.rendezvous import ACK, HELLO, HELLO_MAGIC, open_stream, peer_addresses
from secfwt.mpc.transport.streams import (
    Close,
    Inbox,
    Kind,
    Message,
    Outbox,
    close_frame,
    ended,
    frames,
    messages,
    role_name,
)

log = logging.getLogger(__name__)


class PeerMesh:
    """This party's end of the mesh: a server for incoming streams, one stream out per peer."""

    def __init__(self, *, rank: int, ranks: Iterable[int], settings: TlsSettings) -> None:
        self.rank = rank
        self.peers = sorted(r for r in ranks if r != rank)
        self.settings = settings
        self._session = settings.session_id.encode()
        self._inboxes = {r: Inbox() for r in self.peers}
        self._outboxes: dict[int, Outbox] = {}
        self._incoming: dict[int, threading.Event] = {r: threading.Event() for r in self.peers}
        self._refusals: list[str] = []
        self._lock = threading.Lock()
        self._closing = False
        self._lost: str | None = None  # "ROLE: why" of the first peer lost without an orderly close
        self._server: grpc.Server | None = None
        self._channels: dict[int, grpc.Channel] = {}
        self.address = ""

    # -- set-up ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, connect to every peer, and wait until every peer has connected to us."""
        s = self.settings
        ca, chain, key = s.read_pem()
        deadline = time.monotonic() + s.connect_timeout_s
        keepalive_ms = int(s.keepalive_s * 1000)
        server_opts = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            (
                "grpc.http2.ping_timeout_ms",
                keepalive_ms,
            ),  # gRPC core times pings out after 60 s unless told (see keepalive_for_heartbeat)
            ("grpc.http2.min_recv_ping_interval_without_data_ms", max(1000, keepalive_ms // 2)),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        # One handler thread per incoming stream, plus one spare so an extra (refused) attempt
        # never starves a real peer.
        # Streams beyond that are refused (RESOURCE_EXHAUSTED) instead of queueing.
        workers = len(self.peers) + 2
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="secfwt-mesh"),
            options=server_opts,
            maximum_concurrent_rpcs=workers,
        )
        handler = grpc.method_handlers_generic_handler(
            "secfwt.mpc.v1.Mesh",
            {"Stream": grpc.stream_stream_rpc_method_handler(self._serve_stream)},
        )
        server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=True
        )
        try:
            port = server.add_secure_port(s.listen, creds)
        except RuntimeError as exc:
            raise ProtocolError(f"TLS transport: cannot listen on {s.listen}: {exc}") from exc
        if port == 0:
            raise ProtocolError(
                f"TLS transport: cannot listen on {s.listen} (address in use or invalid)"
            )
        server.start()
        self._server = server
        host = s.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        log.info("MPC TLS transport: %s listening on %s", role_name(self.rank), self.address)
        addresses = peer_addresses(
            s, rank=self.rank, peers=self.peers, address=self.address, deadline=deadline
        )
        channel_opts = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            (
                "grpc.http2.ping_timeout_ms",
                keepalive_ms,
            ),  # gRPC core times pings out after 60 s unless told (see keepalive_for_heartbeat)
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=chain
        )
        for peer in self.peers:
            opts = [*channel_opts, ("grpc.ssl_target_name_override", s.peer_names[peer])]
            self._channels[peer] = grpc.secure_channel(addresses[peer], channel_creds, options=opts)
        for peer in self.peers:
            box = open_stream(
                self._channels[peer],
                rank=self.rank,
                peer=peer,
                address=addresses[peer],
                session=self._session,
                settings=s,
                deadline=deadline,
            )
            box.call.add_done_callback(lambda c, p=peer, b=box: self._on_outgoing_done(p, b, c))
            self._outboxes[peer] = box
        for peer in self.peers:
            if not self._incoming[peer].wait(max(0.0, deadline - time.monotonic())):
                why = "; ".join(self._refusals[-3:]) or "it never connected"
                raise ProtocolError(
                    f"TLS transport: {role_name(peer)} did not open its authenticated stream to "
                    f"{role_name(self.rank)} "
                    f"within {s.connect_timeout_s:.0f} s ({why})"
                )
        log.info(
            "MPC TLS transport: %s connected to %s",
            role_name(self.rank),
            ", ".join(role_name(p) for p in self.peers),
        )

    def _on_outgoing_done(self, peer: int, box: Outbox, call: Any) -> None:
        code = call.code()
        if code is not grpc.StatusCode.OK and not self._closing:
            box.failed = (
                f"stream to {role_name(peer)} ended: {getattr(code, 'name', code)} {call.details()}"
            )
            log.warning("MPC TLS transport: %s", box.failed)
            self._fail_inbox(peer, box.failed)
        box.done.set()

    # -- server side -----------------------------------------------------------------------------
    def _serve_stream(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        auth = context.auth_context()
        names = [n.decode(errors="replace") for n in auth.get("x509_subject_alternative_name", [])]
        cert_rank = rank_for_names(names, self.settings.peer_names)
        try:
            hello = next(requests)
        except StopIteration:
            return
        if len(hello) < HELLO.size or hello[:4] != HELLO_MAGIC:
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "first message is not a mesh HELLO"
            )
        _, claimed, n = HELLO.unpack_from(hello)
        session = hello[HELLO.size : HELLO.size + n]
        if claimed not in self._inboxes:
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"rank {claimed} is not a peer of {role_name(self.rank)} in this session",
            )
        if cert_rank != claimed:
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate names {names or 'no role'}; acting as {role_name(claimed)} "
                f"needs {self.settings.peer_names[claimed]!r}",
            )
        if session != self._session:
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{role_name(claimed)} belongs to another session",
            )
        with self._lock:
            if self._incoming[claimed].is_set():
                self._refuse(
                    context,
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{role_name(claimed)} already has a stream in this session",
                )
            self._incoming[claimed].set()
        log.debug(
            "MPC TLS transport: %s accepted stream from %s (%s)",
            role_name(self.rank),
            role_name(claimed),
            context.peer(),
        )
        yield ACK
        problem = self._receive(claimed, requests)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, why: str) -> None:
        text = f"refused {context.peer()}: {why}"
        log.warning("MPC TLS transport: %s %s", role_name(self.rank), text)
        self._refusals = [*self._refusals[-9:], text]
        context.abort(code, why)

    def _receive(self, src: int, requests: Iterator[bytes]) -> str | None:
        """Read ``src``'s frames into its inbox until its stream ends; returns a protocol
        problem."""
        inbox = self._inboxes[src]
        try:
            for item in messages(src, requests, self.settings.max_message_bytes):
                if isinstance(item, Close):
                    with inbox.cond:
                        inbox.closed = True
                        inbox.close_reason = item.reason
                        inbox.cond.notify_all()
                    if item.reason:
                        self._session_lost(
                            f"{item.reason} (reported by {role_name(src)})", skip=None
                        )
                    continue
                channel, msg = item
                self._deliver(inbox, channel, msg)
        except ProtocolError as exc:
            log.warning("MPC TLS transport: %s", exc)
            self._fail_inbox(src, str(exc))
            return str(exc)
        except Exception as exc:  # noqa: BLE001  (a reset connection surfaces as various errors)
            if not inbox.closed:
                self._fail_inbox(src, f"connection lost: {type(exc).__name__}: {exc}")
            return None
        if not inbox.closed:
            self._fail_inbox(
                src, "stream ended without an orderly close (peer exited or was killed)"
            )
        return None

    def _deliver(self, inbox: Inbox, channel: int, msg: Message) -> None:
        with inbox.cond:
            flow = inbox.flow(channel)
            flow.arrived[flow.n_arrived] = msg
            flow.n_arrived += 1
            inbox.cond.notify_all()

    def _fail_inbox(self, src: int, why: str) -> None:
        inbox = self._inboxes[src]
        with inbox.cond:
            if inbox.failed is None:
                inbox.failed = why
            inbox.cond.notify_all()
            lost = not inbox.closed and not self._closing  # an orderly closed peer is not lost
        if lost:
            self._session_lost(f"{role_name(src)}: {why}", skip=src)

    def _session_lost(self, what: str, *, skip: int | None) -> None:
        if self._lost is not None or self._closing:
            return
        self._lost = what
        log.warning("MPC TLS transport: %s lost %s", role_name(self.rank), what)
        for other, box in self._inboxes.items():
            if other != skip:
                with box.cond:
                    box.cond.notify_all()  # wake receives waiting on live peers

    @property
    def lost(self) -> str | None:
        """``"ROLE: why"`` once a peer was lost without an orderly close, else None."""
        return self._lost

    # -- messaging -------------------------------------------------------------------------------
    def send(self, dst: int, *, kind: Kind, channel: int, code: int, payload: memoryview) -> None:
        """Queue one message for ``dst``: copies ``payload`` (a flat byte view) into frames."""
        box = self._outboxes.get(dst)
        if box is None:
            raise ProtocolError(
                f"TLS transport: {role_name(dst)} is not a peer of {role_name(self.rank)}"
            )
        with box.lock:
            for frame in frames(
                kind=kind,
                channel=channel,
                code=code,
                payload=payload,
                chunk=self.settings.chunk_bytes,
            ):
                self._put(box, dst, frame)

    def _put(self, box: Outbox, dst: int, frame: bytes | None, *, closing: bool = False) -> None:
        while True:
            if box.failed is not None:
                raise ProtocolError(f"TLS transport: cannot send to {role_name(dst)}: {box.failed}")
            if self._lost is not None and not closing:
                raise ProtocolError(
                    f"TLS transport: lost {self._lost}; the MPC session cannot continue"
                )
            try:
                box.frames.put(frame, timeout=0.5)
                return
            except queue.Full:
                continue

    def post(self, src: int, channel: int) -> int:
        """Reserve the next message of (src, channel); returns the ticket for :meth:`take`."""
        inbox = self._inbox(src)
        with inbox.cond:
            flow = inbox.flow(channel)
            ticket = flow.n_posted
            flow.n_posted += 1
            return ticket

    def take(self, src: int, channel: int, ticket: int) -> Message:
        """Wait for the message with ``ticket`` from ``src`` on ``channel``."""
        inbox = self._inbox(src)
        deadline = time.monotonic() + self.settings.recv_timeout_s
        with inbox.cond:
            flow = inbox.flow(channel)
            while ticket not in flow.arrived:
                if self._lost is not None:  # first: it names the party lost first
                    raise ProtocolError(
                        f"TLS transport: lost {self._lost}; the MPC session cannot continue"
                    )
                if inbox.failed is not None:
                    raise ProtocolError(f"TLS transport: lost {role_name(src)}: {inbox.failed}")
                if inbox.closed:
                    raise ProtocolError(
                        f"TLS transport: {role_name(src)} closed its stream; the message "
                        f"{role_name(self.rank)} waits for will never come"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProtocolError(
                        f"TLS transport: no message from {role_name(src)} within "
                        f"{self.settings.recv_timeout_s:.0f} s"
                    )
                inbox.cond.wait(min(remaining, 5.0))
            return flow.arrived.pop(ticket)

    def recv(self, src: int, channel: int) -> Message:
        return self.take(src, channel, self.post(src, channel))

    def _inbox(self, src: int) -> Inbox:
        inbox = self._inboxes.get(src)
        if inbox is None:
            raise ProtocolError(
                f"TLS transport: {role_name(src)} is not a peer of {role_name(self.rank)}"
            )
        return inbox

    # -- tear-down -------------------------------------------------------------------------------
    def close(self, timeout_s: float = 10.0) -> None:
        """Flush and close our streams, give the peers a moment to close theirs, stop the server."""
        deadline = time.monotonic() + timeout_s
        # After a loss the CLOSE says which party was lost, so a peer blocked on us (the dealer
        # waiting for the model owner's next request) names the lost party, not us.
        reason = b"" if self._lost is None else self._lost.encode()[:4096]
        close = close_frame(reason)
        for peer, box in self._outboxes.items():
            try:
                with box.lock:
                    self._put(box, peer, close, closing=True)
            except ProtocolError as exc:
                log.debug("MPC TLS transport: close: %s", exc)
            # Always end the request iterator, or gRPC's thread feeding this stream waits forever.
            try:
                box.frames.put(None, timeout=max(0.0, min(2.0, deadline - time.monotonic())))
            except queue.Full:
                if box.call is not None:
                    box.call.cancel()  # the peer stopped reading: drop the stream
        for peer, box in self._outboxes.items():
            if not box.done.wait(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "MPC TLS transport: %s did not confirm the end of our stream in time",
                    role_name(peer),
                )
        # Our messages are all delivered (each outgoing call completed after the peer read our
        # CLOSE). Waiting for the peers' own CLOSE only keeps the logs quiet: a peer still
        # running has nothing more for us.
        self._closing = True
        for inbox in self._inboxes.values():
            with inbox.cond:
                done = functools.partial(ended, inbox)
                inbox.cond.wait_for(done, timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        for ch in self._channels.values():
            ch.close()
        if self._server is not None:
            self._server.stop(grace=0.5).wait(2.0)
        log.debug("MPC TLS transport: %s closed", role_name(self.rank))
