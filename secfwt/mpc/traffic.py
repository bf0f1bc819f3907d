"""What a party process sends and receives, counted apart by direction and by counterpart.

CrypTen's own counter (``communication_stats``) adds what a party sends and what it receives
into one "bytes" figure (an all_reduce is logged as 2x its size) and mixes dealer traffic in.
:class:`TrafficMeter` counts the two directions apart and separates the dealer, by wrapping
the communication methods of this process's communicator *instance* (CrypTen's and the TLS
mesh alike; instance attributes shadow the class methods CrypTen calls). The launcher installs
one in every party process, the dealer's included, and returns its counts with the party's
result; the benchmark's party function adds its own for measured sections. Counting changes
no result: every call is forwarded unchanged. Bytes are payload bytes (8 per int64 element,
CrypTen's convention); object messages are counted by their pickled length.

Two computing parties are assumed (secfwt's setting): in every collective, what one party
sends is what the other receives (gloo's two-party ring all_reduce sends and receives one
tensor each way). On the dealer, the other end of every message is rank 0, the only party that
asks it for anything; ``served`` counts the requests it answered.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from typing import Any

_BYTES_PER_ELEMENT = 8
#: The message rank 0 sends the dealer at the end of a session (CrypTen's TTPClient).
_TERMINATE = "terminate"


@dataclasses.dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    rounds: int = 0
    dealer_bytes: int = 0  # received from the dealer
    dealer_sent: int = 0  # requests sent to the dealer
    dealer_requests: int = 0
    served: int = 0  # requests answered (the dealer's own count)

    def minus(self, other: Traffic) -> Traffic:
        return Traffic(
            **{
                f.name: getattr(self, f.name) - getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )


def _terminates(obj: Any) -> bool:
    """The end-of-session message to the dealer: sent and counted, but not a request."""
    return isinstance(obj, str) and obj == _TERMINATE


def _nel(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nel(t) for t in x)
    return int(x.nelement()) * _BYTES_PER_ELEMENT


def _obj_bytes(obj: Any) -> int:
    try:
        return len(pickle.dumps(obj))
    except Exception:  # noqa: BLE001  (an unpicklable object: count nothing rather than fail)
        return 0


class TrafficMeter:
    """Counts this party's traffic with the other computing party and with the dealer."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = comm.get_rank()
        self.dealer = comm.get_ttp_rank() if hasattr(comm, "get_ttp_rank") else None
        self.t = Traffic()
        self._open_send = False
        self._install()

    def snapshot(self) -> Traffic:
        return dataclasses.replace(self.t)

    # -- accounting ----------------------------------------------------------------------------
    def _peer(self, *, sent: int = 0, received: int = 0, exchange: bool = False) -> None:
        """One message flight with the other computing party. ``exchange``: a point-to-point
        send not yet answered; the receive that follows it is the same round (both parties
        send at once, as in :func:`secfwt.mpc.owned.product`), not a second one."""
        self.t.sent += sent
        self.t.received += received
        if not (self._open_send and received and not sent):
            self.t.rounds += 1
        self._open_send = exchange

    def _with(
        self,
        other: int | None,
        *,
        sent: int = 0,
        received: int = 0,
        exchange: bool = False,
        request: bool = True,
    ) -> None:
        if other is not None and other == self.dealer:
            self.t.dealer_bytes += received
            self.t.dealer_sent += sent
            if sent and request:
                self.t.dealer_requests += 1
        else:
            self._peer(sent=sent, received=received, exchange=exchange)

    def _install(self) -> None:
        comm = self.comm
        wrap = self._wrap

        wrap("send", lambda a, k, r: self._with(_arg(a, k, 1, "dst"), sent=_nel(a[0])))
        wrap(
            "isend",
            lambda a, k, r: self._with(_arg(a, k, 1, "dst"), sent=_nel(a[0]), exchange=True),
        )
        wrap("recv", lambda a, k, r: self._with(_arg(a, k, 1, "src"), received=_nel(a[0])))
        wrap("irecv", lambda a, k, r: self._with(_arg(a, k, 1, "src"), received=_nel(a[0])))
        wrap("all_reduce", lambda a, k, r: self._peer(sent=_nel(a[0]), received=_nel(a[0])))
        wrap("all_gather", lambda a, k, r: self._peer(sent=_nel(a[0]), received=_nel(a[0])))
        wrap("reduce", lambda a, k, r: self._rooted(_arg(a, k, 1, "dst"), _nel(a[0]), to_root=True))
        wrap("gather", lambda a, k, r: self._rooted(_arg(a, k, 1, "dst"), _nel(a[0]), to_root=True))
        wrap(
            "broadcast",
            lambda a, k, r: self._rooted(_arg(a, k, 1, "src"), _nel(a[0]), to_root=False),
        )
        wrap("scatter", lambda a, k, r: self._rooted(_arg(a, k, 1, "src"), _nel(r), to_root=False))
        wrap(
            "send_obj",
            lambda a, k, r: self._with(
                _arg(a, k, 1, "dst"), sent=_obj_bytes(a[0]), request=not _terminates(a[0])
            ),
        )
        wrap("recv_obj", lambda a, k, r: self._received_obj(_arg(a, k, 0, "src"), r))
        wrap(
            "broadcast_obj",
            lambda a, k, r: self._rooted(_arg(a, k, 1, "src"), _obj_bytes(r), to_root=False),
        )
        del comm

    def _received_obj(self, src: int | None, obj: Any) -> None:
        self._with(src, received=_obj_bytes(obj))
        if self.rank == self.dealer and not _terminates(obj):
            self.t.served += 1  # every other object the dealer receives is a request

    def _rooted(self, root: int | None, nbytes: int, *, to_root: bool) -> None:
        """A two-party collective with a root: data flows to it (reduce, gather) or from it."""
        if root == self.rank:
            if to_root:
                self._peer(received=nbytes)
            else:
                self._peer(sent=nbytes)
        elif root is not None and root == self.dealer:
            self._with(root, received=nbytes)
        else:
            if to_root:
                self._peer(sent=nbytes)
            else:
                self._peer(received=nbytes)

    def _wrap(
        self, name: str, account: Callable[[tuple[Any, ...], dict[str, Any], Any], None]
    ) -> None:
        method = getattr(self.comm, name, None)
        if method is None:
            return

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            account(args, kwargs, result)
            return result

        setattr(self.comm, name, counted)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


__all__ = ["Traffic", "TrafficMeter"]
