"""A full mesh of mutually authenticated TLS gRPC streams between the parties of one MPC run.

Every party runs one gRPC server (``require_client_auth=True``) and opens one long-lived
bidirectional stream to every other party: one stream per ordered pair (src -> dst), so
messages from one party to another arrive in the order they were sent. The stream's first
request is a HELLO (claimed rank, session id); the server answers one ACK after checking that
the client certificate names exactly the role of that rank, then only reads. As a client a
party checks the server's certificate against the expected role name (gRPC's hostname check
with ``grpc.ssl_target_name_override``). Everything on the wire is TLS records.

Why one persistent stream per peer and not one unary RPC per message: a unary call costs a
new HTTP/2 stream, metadata and a response; CrypTen sends thousands of small messages per
layer (one round each), and a persistent stream keeps the small-message latency to one hop.

Why a hand-written frame header instead of a protobuf message: the payload is a tensor's
raw bytes (tens of GB per job); a protobuf ``bytes`` field would copy it once more on each
side, and the header needs only five fixed fields. TLS gives integrity and the stream gives
order, so the header guards against programming errors between authenticated, semi-honest
peers (trust model), not against the network: magic, kind, channel and size are checked and
a bad frame ends the stream with a clear error. Object payloads (``send_obj``) are pickles
that CrypTen's restricted unpickler reads; tensors are never pickled.

Large messages are cut into frames of ``TlsSettings.chunk_bytes`` (1 MiB): the frames of one
message stay together in the stream, and at most 16 frames per peer wait in memory before
``send`` blocks. 256 KiB, 1 MiB and 4 MiB gave the same 100 MB ``all_reduce`` time within the
noise of the shared 2-core test machine (0.47-0.65 s); 1 MiB keeps each copy small.

Receives are matched by ticket: ``post(src, channel)`` reserves the next message of that flow
(what gloo does when an ``irecv`` is posted), ``take`` waits for it, so out-of-order waits on
posted receives get the right message.

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

import dataclasses
import enum
import functools
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from secfwt.errors import ProtocolError
from secfwt.mpc.transport.identity import TlsSettings, rank_for_names
from secfwt.roles import Role

log = logging.getLogger(__name__)

_METHOD = "/secfwt.mpc.v1.Mesh/Stream"
_HELLO = struct.Struct("<4sHH")  # magic, claimed rank, session id length; then the session id
_HELLO_MAGIC = b"SFH1"
_ACK = b"SFA1"
#: magic, kind, channel, dtype code, reserved, payload bytes (the whole message, over all frames)
_HEADER = struct.Struct("<4sBBBBQ")
_FRAME_MAGIC = b"SFM1"
#: Handshake errors that retrying cannot fix (gRPC's texts for a wrong or untrusted certificate).
_CERTIFICATE_FAILURES = (
    "Hostname Verification Check failed",
    "CERTIFICATE_VERIFY_FAILED",
    "certificate verify failed",
)
#: Frames buffered per peer before ``send`` blocks (backpressure; 16 x 4 MiB by default).
_OUTBOX_FRAMES = 16


class Kind(enum.IntEnum):
    TENSOR = 1
    OBJECT = 2
    TOKEN = 3  # barrier
    CLOSE = 4  # orderly end of a stream


_KINDS = frozenset(int(k) for k in Kind)


@dataclasses.dataclass
class Message:
    kind: Kind
    code: int  # dtype code of a tensor payload (see communicator.py), 0 otherwise
    payload: torch.Tensor  # uint8, writable, owned by the receiver


def _role_name(rank: int) -> str:
    try:
        return Role.from_rank(rank).value
    except ValueError:
        return f"rank {rank}"


def _rpc_text(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{getattr(code, 'name', code)}: {details}"


class _Flow:
    """Messages of one (src, channel) in arrival order, matched to posted receive tickets."""

    __slots__ = ("arrived", "n_arrived", "n_posted")

    def __init__(self) -> None:
        self.arrived: dict[int, Message] = {}
        self.n_arrived = 0
        self.n_posted = 0


class _Inbox:
    """Everything received from one peer."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.flows: dict[int, _Flow] = {}
        self.failed: str | None = None
        self.closed = False  # the peer ended its stream in order
        self.close_reason = ""  # why, when it closed because it lost another party

    def flow(self, channel: int) -> _Flow:
        f = self.flows.get(channel)
        if f is None:
            f = self.flows[channel] = _Flow()
        return f


def _ended(inbox: _Inbox) -> bool:
    return inbox.closed or inbox.failed is not None


class _Outbox:
    """Frames queued for one peer, drained by gRPC's request-iterator thread."""

    def __init__(self) -> None:
        self.frames: queue.Queue[bytes | None] = queue.Queue(maxsize=_OUTBOX_FRAMES)
        self.lock = threading.Lock()  # keeps the frames of one message together
        self.failed: str | None = None
        self.done = threading.Event()
        self.call: Any = None

    def iterate(self, hello: bytes) -> Iterator[bytes]:
        yield hello
        while True:
            frame = self.frames.get()
            if frame is None:
                return
            yield frame


class PeerMesh:
    """This party's end of the mesh: a server for incoming streams, one stream out per peer."""

    def __init__(self, *, rank: int, ranks: Iterable[int], settings: TlsSettings) -> None:
        self.rank = rank
        self.peers = sorted(r for r in ranks if r != rank)
        self.settings = settings
        self._session = settings.session_id.encode()
        self._inboxes = {r: _Inbox() for r in self.peers}
        self._outboxes: dict[int, _Outbox] = {}
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
        log.info("MPC TLS transport: %s listening on %s", _role_name(self.rank), self.address)
        addresses = self._peer_addresses(deadline)
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
            self._connect(peer, addresses[peer], deadline)
        for peer in self.peers:
            if not self._incoming[peer].wait(max(0.0, deadline - time.monotonic())):
                why = "; ".join(self._refusals[-3:]) or "it never connected"
                raise ProtocolError(
                    f"TLS transport: {_role_name(peer)} did not open its authenticated stream to "
                    f"{_role_name(self.rank)} "
                    f"within {s.connect_timeout_s:.0f} s ({why})"
                )
        log.info(
            "MPC TLS transport: %s connected to %s",
            _role_name(self.rank),
            ", ".join(_role_name(p) for p in self.peers),
        )

    def _peer_addresses(self, deadline: float) -> dict[int, str]:
        s = self.settings
        if s.peers:
            missing = [p for p in self.peers if p not in s.peers]
            if missing:
                raise ProtocolError(
                    f"TLS transport: no address for {', '.join(_role_name(p) for p in missing)}"
                )
            return {p: s.peers[p] for p in self.peers}
        if s.rendezvous_dir is None:
            raise ProtocolError(
                "TLS transport: settings give neither peer addresses nor a local rendezvous folder"
            )
        folder = Path(s.rendezvous_dir)
        tmp = folder / f".address-{self.rank}.tmp"
        tmp.write_text(self.address)
        os.replace(tmp, folder / f"address-{self.rank}")  # atomic: readers never see half a line
        out: dict[int, str] = {}
        while len(out) < len(self.peers):
            for p in self.peers:
                f = folder / f"address-{p}"
                if p not in out and f.exists():
                    out[p] = f.read_text().strip()
            if len(out) < len(self.peers):
                if time.monotonic() > deadline:
                    absent = ", ".join(_role_name(p) for p in self.peers if p not in out)
                    raise ProtocolError(
                        f"TLS transport: {absent} did not publish an address in {folder} in time"
                    )
                time.sleep(0.02)
        return out

    def _connect(self, peer: int, address: str, deadline: float) -> None:
        """Open the stream to ``peer`` and wait for its ACK; retry while the peer is not up yet."""
        hello = _HELLO.pack(_HELLO_MAGIC, self.rank, len(self._session)) + self._session
        stream = self._channels[peer].stream_stream(_METHOD)
        last = "no attempt"
        while True:
            box = _Outbox()
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
                        f"TLS transport: {_role_name(peer)} at {address} refused "
                        f"{_role_name(self.rank)}: {last}"
                    ) from None
                if any(marker in last for marker in _CERTIFICATE_FAILURES):
                    raise ProtocolError(
                        f"TLS transport: {_role_name(peer)} at {address} did not prove it is "
                        f"{self.settings.peer_names[peer]!r} "
                        f"(or does not trust our certificate): {last}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise ProtocolError(
                        "TLS transport: could not open an authenticated stream to "
                        f"{_role_name(peer)} at {address} within "
                        f"{self.settings.connect_timeout_s:.0f} s; last error {last} (peer down, "
                        "its certificate does not name "
                        f"{self.settings.peer_names[peer]!r}, or it does not trust our certificate)"
                    ) from None
                log.debug(
                    "MPC TLS transport: stream to %s not open yet: %s", _role_name(peer), last
                )
                time.sleep(0.05)
                continue
            except StopIteration:
                box.frames.put(None)
                raise ProtocolError(
                    f"TLS transport: {_role_name(peer)} at {address} closed the stream without "
                    "an ACK"
                ) from None
            finally:
                timer.cancel()
            if ack != _ACK:
                raise ProtocolError(
                    f"TLS transport: {_role_name(peer)} at {address} answered {ack[:16]!r}, not "
                    "the mesh ACK"
                )
            box.call = call
            call.add_done_callback(lambda c, p=peer, b=box: self._on_outgoing_done(p, b, c))
            self._outboxes[peer] = box
            return

    def _on_outgoing_done(self, peer: int, box: _Outbox, call: Any) -> None:
        code = call.code()
        if code is not grpc.StatusCode.OK and not self._closing:
            box.failed = (
                f"stream to {_role_name(peer)} ended: {getattr(code, 'name', code)} "
                f"{call.details()}"
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
        if len(hello) < _HELLO.size or hello[:4] != _HELLO_MAGIC:
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "first message is not a mesh HELLO"
            )
        _, claimed, n = _HELLO.unpack_from(hello)
        session = hello[_HELLO.size : _HELLO.size + n]
        if claimed not in self._inboxes:
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"rank {claimed} is not a peer of {_role_name(self.rank)} in this session",
            )
        if cert_rank != claimed:
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate names {names or 'no role'}; acting as {_role_name(claimed)} "
                f"needs {self.settings.peer_names[claimed]!r}",
            )
        if session != self._session:
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{_role_name(claimed)} belongs to another session",
            )
        with self._lock:
            if self._incoming[claimed].is_set():
                self._refuse(
                    context,
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{_role_name(claimed)} already has a stream in this session",
                )
            self._incoming[claimed].set()
        log.debug(
            "MPC TLS transport: %s accepted stream from %s (%s)",
            _role_name(self.rank),
            _role_name(claimed),
            context.peer(),
        )
        yield _ACK
        problem = self._receive(claimed, requests)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, why: str) -> None:
        text = f"refused {context.peer()}: {why}"
        log.warning("MPC TLS transport: %s %s", _role_name(self.rank), text)
        self._refusals = [*self._refusals[-9:], text]
        context.abort(code, why)

    def _receive(self, src: int, requests: Iterator[bytes]) -> str | None:
        """Read ``src``'s frames into its inbox until its stream ends; returns a protocol
        problem."""
        inbox = self._inboxes[src]
        limit = self.settings.max_message_bytes
        pending: tuple[Kind, int, int, torch.Tensor, memoryview] | None = None
        filled = 0
        try:
            for frame in requests:
                if pending is None:
                    if len(frame) < _HEADER.size:
                        raise ProtocolError(
                            f"{_role_name(src)} sent a {len(frame)}-byte frame, shorter than a "
                            "header"
                        )
                    magic, kind, channel, code, _, nbytes = _HEADER.unpack_from(frame)
                    if magic != _FRAME_MAGIC or kind not in _KINDS:
                        raise ProtocolError(f"malformed frame from {_role_name(src)}")
                    if kind == Kind.CLOSE:
                        # A CLOSE may carry why: the peer lost another party (see close()).
                        reason = bytes(
                            frame[_HEADER.size : _HEADER.size + min(nbytes, 4096)]
                        ).decode(errors="replace")
                        with inbox.cond:
                            inbox.closed = True
                            inbox.close_reason = reason
                            inbox.cond.notify_all()
                        if reason:
                            self._session_lost(
                                f"{reason} (reported by {_role_name(src)})", skip=None
                            )
                        continue
                    if nbytes > limit:
                        raise ProtocolError(
                            f"{_role_name(src)} announced a {nbytes}-byte message; the limit is "
                            f"{limit}"
                        )
                    buf = torch.empty(nbytes, dtype=torch.uint8)
                    view = memoryview(buf.numpy())  # type: ignore[arg-type]  # ndarray is a buffer
                    body = memoryview(frame)[_HEADER.size :]
                    pending, filled = (Kind(kind), channel, code, buf, view), 0
                else:
                    body = memoryview(frame)
                kind_, channel_, code_, buf_, view_ = pending
                end = filled + len(body)
                if end > len(view_):
                    raise ProtocolError(
                        f"{_role_name(src)} sent more bytes than its message header announced"
                    )
                view_[filled:end] = body
                filled = end
                if filled == len(view_):
                    self._deliver(inbox, channel_, Message(kind=kind_, code=code_, payload=buf_))
                    pending = None
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

    def _deliver(self, inbox: _Inbox, channel: int, msg: Message) -> None:
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
            self._session_lost(f"{_role_name(src)}: {why}", skip=src)

    def _session_lost(self, what: str, *, skip: int | None) -> None:
        if self._lost is not None or self._closing:
            return
        self._lost = what
        log.warning("MPC TLS transport: %s lost %s", _role_name(self.rank), what)
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
                f"TLS transport: {_role_name(dst)} is not a peer of {_role_name(self.rank)}"
            )
        n = len(payload)
        chunk = self.settings.chunk_bytes
        header = _HEADER.pack(_FRAME_MAGIC, int(kind), channel, code, 0, n)
        first = min(n, max(0, chunk - _HEADER.size))
        with box.lock:
            self._put(box, dst, b"".join((header, payload[:first])))
            for start in range(first, n, chunk):
                self._put(box, dst, payload[start : start + chunk].tobytes())

    def _put(self, box: _Outbox, dst: int, frame: bytes | None, *, closing: bool = False) -> None:
        while True:
            if box.failed is not None:
                raise ProtocolError(
                    f"TLS transport: cannot send to {_role_name(dst)}: {box.failed}"
                )
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
                    raise ProtocolError(f"TLS transport: lost {_role_name(src)}: {inbox.failed}")
                if inbox.closed:
                    raise ProtocolError(
                        f"TLS transport: {_role_name(src)} closed its stream; the message "
                        f"{_role_name(self.rank)} waits for will never come"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProtocolError(
                        f"TLS transport: no message from {_role_name(src)} within "
                        f"{self.settings.recv_timeout_s:.0f} s"
                    )
                inbox.cond.wait(min(remaining, 5.0))
            return flow.arrived.pop(ticket)

    def recv(self, src: int, channel: int) -> Message:
        return self.take(src, channel, self.post(src, channel))

    def _inbox(self, src: int) -> _Inbox:
        inbox = self._inboxes.get(src)
        if inbox is None:
            raise ProtocolError(
                f"TLS transport: {_role_name(src)} is not a peer of {_role_name(self.rank)}"
            )
        return inbox

    # -- tear-down -------------------------------------------------------------------------------
    def close(self, timeout_s: float = 10.0) -> None:
        """Flush and close our streams, give the peers a moment to close theirs, stop the server."""
        deadline = time.monotonic() + timeout_s
        # After a loss the CLOSE says which party was lost, so a peer blocked on us (the dealer
        # waiting for the model owner's next request) names the lost party, not us.
        reason = b"" if self._lost is None else self._lost.encode()[:4096]
        close = _HEADER.pack(_FRAME_MAGIC, int(Kind.CLOSE), 0, 0, 0, len(reason)) + reason
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
                    _role_name(peer),
                )
        # Our messages are all delivered (each outgoing call completed after the peer read our
        # CLOSE). Waiting for the peers' own CLOSE only keeps the logs quiet: a peer still
        # running has nothing more for us.
        self._closing = True
        for inbox in self._inboxes.values():
            with inbox.cond:
                ended = functools.partial(_ended, inbox)
                inbox.cond.wait_for(ended, timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        for ch in self._channels.values():
            ch.close()
        if self._server is not None:
            self._server.stop(grace=0.5).wait(2.0)
        log.debug("MPC TLS transport: %s closed", _role_name(self.rank))
