"""Two-party collectives as one direct exchange over gloo.

gloo runs CrypTen's ``all_reduce`` and ``broadcast`` with its general algorithms, several
times slower than a send/recv ping-pong for two members, and every opening of a Beaver
product, comparison round and reveal is one (the dealer's replies are a ``broadcast`` in a
two-member group). :func:`install` makes ``DistributedCommunicator.all_reduce`` (SUM or
BXOR) and ``broadcast`` in a group of two send each side's tensor and combine the other's
(int64 SUM wraps mod 2^64 as gloo's does): the same bytes and results bit for bit. Any
other group or op runs CrypTen's code. Installed by :func:`secfwt.mpc.engine.install`.

A batch of small tensors (a Beaver opening's ``eps`` and ``delta``, at most
:data:`PACK_MAX_ELEMENTS` elements in all) travels as one message each way: gloo pays about
0.2 ms per message on loopback whatever its size, so a two-tensor opening of a few values took
0.68 ms as two messages and 0.20 ms as one (measured on the 2-core bench machine). Larger
batches go tensor by tensor, which saves the copy into one buffer (2 x 100,000 elements: 1.19 ms
as two messages, 1.49 ms packed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from secfwt.crypten_compat import crypten  # noqa: F401  (CrypTen importable on this torch)

#: Batches of at most this many elements (of one dtype) are exchanged as one message.
PACK_MAX_ELEMENTS = 1 << 14


def packable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a batch travels as one message: several tensors of one dtype, at most
    :data:`PACK_MAX_ELEMENTS` elements in all (gloo here, and the TLS mesh's collectives)."""
    return (
        len(tensors) > 1
        and sum(t.numel() for t in tensors) <= PACK_MAX_ELEMENTS
        and len({t.dtype for t in tensors}) == 1
    )


def installed() -> bool:
    from crypten.communicator.distributed_communicator import DistributedCommunicator

    return getattr(DistributedCommunicator.all_reduce, "_secfwt_two_party", False)


def install() -> None:
    """Replace gloo's two-party ``all_reduce``/``broadcast`` by direct exchanges. Idempotent."""
    from crypten.communicator.communicator import _logging
    from crypten.communicator.distributed_communicator import DistributedCommunicator
    from torch.distributed import ReduceOp

    cls = DistributedCommunicator  # gloo's class, also while the TLS mesh is selected
    if getattr(cls.all_reduce, "_secfwt_two_party", False):
        return
    dist: Any = torch.distributed  # isend/irecv return a Work (typed Optional by torch)
    crypten_all_reduce = cls.all_reduce.__wrapped__  # CrypTen's, without its accounting wrapper
    crypten_broadcast = cls.broadcast.__wrapped__
    combine: dict[Any, Callable[..., torch.Tensor]] = {
        ReduceOp.SUM: torch.add,
        ReduceOp.BXOR: torch.bitwise_xor,
    }

    def peer_in(comm: Any, group: Any) -> int | None:
        ranks = dist.get_process_group_ranks(group)
        if len(ranks) != 2 or comm.rank not in ranks:
            return None
        return next(r for r in ranks if r != comm.rank)

    def all_reduce(self: Any, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        peer = peer_in(self, self.main_group)
        if peer is None or op not in combine:
            return crypten_all_reduce(self, input, op=op, batched=batched)
        mine = [t.data.contiguous() for t in (input if batched else [input])]
        theirs = exchange(mine, peer, self.main_group)
        # A new tensor, as CrypTen's clone.
        out = [combine[op](m, t) for m, t in zip(mine, theirs, strict=True)]
        return out if batched else out[0]

    def exchange(mine: list[torch.Tensor], peer: int, group: Any) -> list[torch.Tensor]:
        """Send ``mine`` to ``peer`` and receive its tensors of the same shapes."""
        if packable(mine):
            packed = torch.cat([t.reshape(-1) for t in mine])
            other = torch.empty_like(packed)
            send = dist.isend(packed, peer, group=group)
            dist.irecv(other, peer, group=group).wait()
            send.wait()
            parts = other.split([t.numel() for t in mine])
            return [p.view_as(t) for p, t in zip(parts, mine, strict=True)]
        theirs = [torch.empty_like(t) for t in mine]
        sends = [dist.isend(t, peer, group=group) for t in mine]
        for buf in theirs:
            dist.irecv(buf, peer, group=group).wait()
        for req in sends:
            req.wait()
        return theirs

    def broadcast(self: Any, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        group = self.main_group if group is None else group
        peer = peer_in(self, group)
        if peer is None:
            return crypten_broadcast(self, input, src, group=group, batched=batched)
        tensors = input if batched else [input]
        if self.rank == src:
            for req in [dist.isend(t.data.contiguous(), peer, group=group) for t in tensors]:
                req.wait()
        else:
            for t in tensors:
                buf = t.data
                if not buf.is_contiguous():
                    buf = torch.empty_like(t.data, memory_format=torch.contiguous_format)
                dist.irecv(buf, src, group=group).wait()
                if buf is not t.data:
                    t.data.copy_(buf)
        return input

    for fn in (all_reduce, broadcast):
        wrapped = _logging(fn)
        wrapped._secfwt_two_party = True  # type: ignore[attr-defined]
        setattr(cls, fn.__name__, wrapped)
