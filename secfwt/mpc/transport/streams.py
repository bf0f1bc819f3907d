"""The framed message streams of the TLS mesh: the frame format and the buffers at both ends.

One stream carries one party's messages to one peer, in order (:mod:`secfwt.mpc.transport.mesh`
owns the streams). This module holds what travels on it and what waits at its ends: the frame
header, cutting a message into frames and putting it back together, the outbox that feeds the
stream and the inbox that holds what arrived, so the mesh keeps only the connection logic.

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
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from secfwt.errors import ProtocolError
from secfwt.roles import Role

#: magic, kind, channel, dtype code, reserved, payload bytes (the whole message, over all frames)
HEADER = struct.Struct("<4sBBBBQ")
FRAME_MAGIC = b"SFM1"
#: Frames buffered per peer before ``send`` blocks (backpressure; 16 x 4 MiB by default).
OUTBOX_FRAMES = 16


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


@dataclasses.dataclass(frozen=True)
class Close:
    """A CLOSE frame: the peer ended its stream in order."""

    reason: str  # empty, or why: the peer lost another party


def role_name(rank: int) -> str:
    try:
        return Role.from_rank(rank).value
    except ValueError:
        return f"rank {rank}"


# -- frames --------------------------------------------------------------------------------------
def frames(
    *, kind: Kind, channel: int, code: int, payload: memoryview, chunk: int
) -> Iterator[bytes]:
    """The frames of one message, each copied from ``payload`` (a flat byte view) when reached."""
    n = len(payload)
    header = HEADER.pack(FRAME_MAGIC, int(kind), channel, code, 0, n)
    first = min(n, max(0, chunk - HEADER.size))
    yield b"".join((header, payload[:first]))
    for start in range(first, n, chunk):
        yield payload[start : start + chunk].tobytes()


def close_frame(reason: bytes) -> bytes:
    """The CLOSE frame that ends a stream; ``reason`` names the party lost, if any."""
    return HEADER.pack(FRAME_MAGIC, int(Kind.CLOSE), 0, 0, 0, len(reason)) + reason


def messages(
    src: int, stream: Iterable[bytes], limit: int
) -> Iterator[tuple[int, Message] | Close]:
    """Put ``src``'s frames back together: each whole message with its channel, each CLOSE.

    Raises :class:`ProtocolError` on a frame that breaks the format; errors of ``stream`` itself
    (a reset connection) pass through.
    """
    pending: tuple[Kind, int, int, torch.Tensor, memoryview] | None = None
    filled = 0
    for frame in stream:
        if pending is None:
            if len(frame) < HEADER.size:
                raise ProtocolError(
                    f"{role_name(src)} sent a {len(frame)}-byte frame, shorter than a header"
                )
            magic, kind, channel, code, _, nbytes = HEADER.unpack_from(frame)
            if magic != FRAME_MAGIC or kind not in _KINDS:
                raise ProtocolError(f"malformed frame from {role_name(src)}")
            if kind == Kind.CLOSE:
                # A CLOSE may carry why: the peer lost another party (see PeerMesh.close()).
                reason = bytes(frame[HEADER.size : HEADER.size + min(nbytes, 4096)])
                yield Close(reason.decode(errors="replace"))
                continue
            if nbytes > limit:
                raise ProtocolError(
                    f"{role_name(src)} announced a {nbytes}-byte message; the limit is {limit}"
                )
            buf = torch.empty(nbytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())  # type: ignore[arg-type]  # ndarray is a buffer
            body = memoryview(frame)[HEADER.size :]
            pending, filled = (Kind(kind), channel, code, buf, view), 0
        else:
            body = memoryview(frame)
        kind_, channel_, code_, buf_, view_ = pending
        end = filled + len(body)
        if end > len(view_):
            raise ProtocolError(
                f"{role_name(src)} sent more bytes than its message header announced"
            )
        view_[filled:end] = body
        filled = end
        if filled == len(view_):
            yield channel_, Message(kind=kind_, code=code_, payload=buf_)
            pending = None


# -- the ends of a stream ------------------------------------------------------------------------
class Flow:
    """Messages of one (src, channel) in arrival order, matched to posted receive tickets."""

    __slots__ = ("arrived", "n_arrived", "n_posted")

    def __init__(self) -> None:
        self.arrived: dict[int, Message] = {}
        self.n_arrived = 0
        self.n_posted = 0


class Inbox:
    """Everything received from one peer."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.flows: dict[int, Flow] = {}
        self.failed: str | None = None
        self.closed = False  # the peer ended its stream in order
        self.close_reason = ""  # why, when it closed because it lost another party

    def flow(self, channel: int) -> Flow:
        f = self.flows.get(channel)
        if f is None:
            f = self.flows[channel] = Flow()
        return f


def ended(inbox: Inbox) -> bool:
    return inbox.closed or inbox.failed is not None


class Outbox:
    """Frames queued for one peer, drained by gRPC's request-iterator thread."""

    def __init__(self) -> None:
        self.frames: queue.Queue[bytes | None] = queue.Queue(maxsize=OUTBOX_FRAMES)
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
