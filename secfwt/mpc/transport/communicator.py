"""CrypTen's communicator interface over the TLS mesh (:mod:`secfwt.mpc.transport.mesh`).

:class:`MeshCommunicator` is a drop-in for CrypTen's ``DistributedCommunicator``: the same
method names, argument orders, return values and in-place effects (``broadcast`` and
``irecv`` fill the given tensor; ``recv`` returns a new one; ``gather`` returns ``[None]``
off the root), the same groups (``main_group``, ``ttp_group``, ``ttp_comm_group``), and the
same statistics: CrypTen's own ``_logging`` decorator wraps every method, so bytes and rounds
are counted exactly as for gloo (elements x 8, per party).

Collectives are built from point-to-point messages (at most three parties, so direct algorithms
beat rings): ``all_reduce`` sends this party's tensor to every other member and combines all
contributions in rank order with torch's int64 ops, so SUM wraps around mod 2^64 exactly as gloo
does and BXOR is exact; a small batch of one dtype travels as one message
(:func:`secfwt.mpc.collectives.packable`, as over gloo). Tensors travel as their raw bytes; the
receiver reinterprets them with its template's dtype and shape, as gloo does, after checking
dtype and byte count so a protocol mismatch fails loudly instead of producing garbage.

``send_obj`` pickles (as CrypTen does); ``recv_obj`` reads with CrypTen's restricted
unpickler. Pickles travel only between mutually authenticated parties, which the trust model
takes as semi-honest; the restricted unpickler keeps a buggy peer from running code here.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Callable
from typing import Any

import torch
from crypten.common import serial
from crypten.communicator.communicator import Communicator, _logging
from torch.distributed import ReduceOp

import secfwt.crypten_compat  # noqa: F401  (CrypTen importable on this torch before the imports below)
from secfwt.errors import ProtocolError
from secfwt.mpc.collectives import packable
from secfwt.mpc.transport.identity import TlsSettings
from secfwt.mpc.transport.mesh import PeerMesh
from secfwt.mpc.transport.streams import Kind, Message

log = logging.getLogger(__name__)

_DTYPES = (
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
)  # fmt: skip
_CODES = {dt: i + 1 for i, dt in enumerate(_DTYPES)}

_REDUCE: dict[Any, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    ReduceOp.SUM: torch.Tensor.add_,  # int64: wraps mod 2^64 like gloo
    ReduceOp.PRODUCT: torch.Tensor.mul_,
    ReduceOp.BXOR: torch.Tensor.bitwise_xor_,
    ReduceOp.BAND: torch.Tensor.bitwise_and_,
    ReduceOp.BOR: torch.Tensor.bitwise_or_,
    ReduceOp.MIN: lambda acc, t: torch.minimum(acc, t, out=acc),
    ReduceOp.MAX: lambda acc, t: torch.maximum(acc, t, out=acc),
}


@dataclasses.dataclass(frozen=True)
class MeshGroup:
    """A process group: its global ranks and the channel that keeps its messages apart."""

    ranks: tuple[int, ...]
    channel: int


class _Work:
    """What ``isend``/``irecv`` return; ``wait()`` as in torch.distributed."""

    def __init__(self, finish: Callable[[], None] | None = None) -> None:
        self._finish = finish

    def wait(self, timeout: Any = None) -> bool:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return True

    def is_completed(self) -> bool:
        return self._finish is None


def _code(dtype: torch.dtype) -> int:
    try:
        return _CODES[dtype]
    except KeyError:
        raise ProtocolError(f"TLS transport: cannot send tensors of dtype {dtype}") from None


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of the tensor's data (no copy when it is already contiguous)."""
    t = tensor.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer


def _as_tensor(
    msg: Message, dtype: torch.dtype, shape: torch.Size | tuple[int, ...], *, what: str
) -> torch.Tensor:
    """The received bytes as a tensor of the receiver's dtype and shape (gloo's semantics)."""
    if msg.kind is not Kind.TENSOR:
        raise ProtocolError(
            f"TLS transport: {what}: expected a tensor, got a {msg.kind.name} message (the "
            "parties are out of step)"
        )
    if msg.code != _code(dtype):
        sent = _DTYPES[msg.code - 1] if 0 < msg.code <= len(_DTYPES) else msg.code
        raise ProtocolError(f"TLS transport: {what}: peer sent {sent}, this party expects {dtype}")
    numel = 1
    for d in shape:
        numel *= int(d)
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if msg.payload.numel() != expected:
        raise ProtocolError(
            f"TLS transport: {what}: peer sent {msg.payload.numel()} bytes, {tuple(shape)} "
            f"{dtype} needs {expected}"
        )
    return msg.payload.view(dtype).reshape(shape)


class MeshCommunicator(Communicator):
    """CrypTen communicator whose every message goes over the parties' TLS mesh."""

    BYTES_PER_ELEMENT = 8
    instance: MeshCommunicator | None = None
    _pending: tuple[int, int, TlsSettings] | None = None

    # -- life cycle (CrypTen calls these through crypten.communicator) -----------------------------
    @classmethod
    def prepare(cls, *, rank: int, world_size: int, settings: TlsSettings) -> None:
        """Remember this party's rank and TLS settings for the coming ``crypten.init()``."""
        cls._pending = (rank, world_size, settings)

    @classmethod
    def is_initialized(cls) -> bool:
        return cls.instance is not None

    @classmethod
    def initialize(cls, rank: int, world_size: int, init_ttp: bool = False) -> None:
        # crypten.communicator._init passes rank 0 and world size 1 (DistributedCommunicator reads
        # the real values from the environment); ours come from prepare().
        if cls._pending is None:
            raise ProtocolError(
                "TLS transport: call secfwt.mpc.session.init_party(transport=TLS) "
                "before crypten.init()"
            )
        my_rank, my_world, settings = cls._pending
        cls.instance = cls(rank=my_rank, world_size=my_world, settings=settings, init_ttp=init_ttp)

    @classmethod
    def get(cls) -> MeshCommunicator | None:
        return cls.instance

    @classmethod
    def shutdown(cls) -> None:
        inst = cls.instance
        if inst is None:
            return
        try:
            if inst.rank == 0 and inst.ttp_initialized and inst.mesh.lost is None:
                inst.send_obj("terminate", inst.get_ttp_rank(), inst.ttp_group)
        except ProtocolError as exc:  # the dealer is gone too: nothing to stop
            log.debug("TLS transport: could not tell the dealer to stop: %s", exc)
        finally:
            inst.mesh.close()
            cls.instance = None

    def __init__(
        self, *, rank: int, world_size: int, settings: TlsSettings, init_ttp: bool
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.reset_communication_stats()
        self._name = f"rank{rank}"
        total = world_size + 1 if init_ttp else world_size
        # The same groups as DistributedCommunicator, each on its own channel.
        self.main_group = MeshGroup(tuple(range(world_size)), 0)
        self.ttp_group = MeshGroup(tuple(range(total)), 1)
        self.ttp_comm_group = MeshGroup((0, total - 1), 2)
        self.ttp_initialized = init_ttp
        self.mesh = PeerMesh(rank=rank, ranks=range(total), settings=settings)
        self.mesh.start()
        log.info(
            "MeshCommunicator rank %d of %d (%s)",
            rank,
            world_size,
            "with dealer" if init_ttp else "no dealer",
        )

    # -- point to point (unlogged building blocks) -------------------------------------------------
    def _group(self, group: Any) -> MeshGroup:
        if group is None:
            return self.main_group
        if not isinstance(group, MeshGroup):
            raise ProtocolError(f"TLS transport: {group!r} is not a group of this communicator")
        return group

    def _send_tensor(self, tensor: torch.Tensor, dst: int, group: MeshGroup) -> None:
        self.mesh.send(
            dst,
            kind=Kind.TENSOR,
            channel=group.channel,
            code=_code(tensor.dtype),
            payload=_bytes_of(tensor),
        )

    def _recv_tensor(
        self, dtype: torch.dtype, shape: Any, src: int, group: MeshGroup, what: str
    ) -> torch.Tensor:
        return _as_tensor(
            self.mesh.recv(src, group.channel), dtype, shape, what=f"{what} from rank {src}"
        )

    def _others(self, group: MeshGroup) -> list[int]:
        return [r for r in group.ranks if r != self.rank]

    def p2p_isend(self, tensor: torch.Tensor, dst: int, group: Any = None) -> _Work:
        """``isend`` in ``group`` without CrypTen's accounting (for the TTP's direct calls)."""
        self._send_tensor(tensor.data, dst, self._group(group))
        return _Work()

    def p2p_irecv(self, tensor: torch.Tensor, src: int | None, group: Any = None) -> _Work:
        """``irecv`` into ``tensor`` in ``group`` without accounting (for the TTP's direct
        calls)."""
        if src is None:
            raise ProtocolError(
                "TLS transport: receiving from any source is not supported; name the sender"
            )
        g = self._group(group)
        ticket = self.mesh.post(src, g.channel)

        def finish() -> None:
            got = _as_tensor(
                self.mesh.take(src, g.channel, ticket),
                tensor.dtype,
                tensor.shape,
                what=f"irecv from rank {src}",
            )
            tensor.data.copy_(got)

        return _Work(finish)

    def group_barrier(self, group: Any = None) -> None:
        """Barrier over ``group`` without accounting (for the TTP's direct calls)."""
        g = self._group(group)
        for r in self._others(g):
            self.mesh.send(r, kind=Kind.TOKEN, channel=g.channel, code=0, payload=memoryview(b""))
        for r in self._others(g):
            msg = self.mesh.recv(r, g.channel)
            if msg.kind is not Kind.TOKEN:
                raise ProtocolError(
                    f"TLS transport: barrier: rank {r} sent a {msg.kind.name} message (the "
                    "parties are out of step)"
                )

    # -- CrypTen's interface -----------------------------------------------------------------------
    @_logging
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Sends the specified tensor to the destination dst."""
        self._send_tensor(tensor.data, dst, self.main_group)

    @_logging
    def recv(self, tensor: torch.Tensor, src: int | None = None) -> torch.Tensor:
        """Receives a tensor shaped like ``tensor`` from ``src``; returns a new tensor."""
        if src is None:
            raise ProtocolError(
                "TLS transport: receiving from any source is not supported; name the sender"
            )
        return self._recv_tensor(tensor.dtype, tensor.size(), src, self.main_group, "recv")

    @_logging
    def isend(self, tensor: torch.Tensor, dst: int) -> _Work:
        """Sends ``tensor`` to ``dst`` (its bytes are copied before this returns)."""
        return self.p2p_isend(tensor, dst, self.main_group)

    @_logging
    def irecv(self, tensor: torch.Tensor, src: int | None = None) -> _Work:
        """Posts a receive into ``tensor``; ``wait()`` fills it."""
        return self.p2p_irecv(tensor, src, self.main_group)

    @_logging
    def scatter(
        self, scatter_list: list[torch.Tensor], src: int, size: Any = None, device: Any = None
    ) -> torch.Tensor:
        """Scatters a list of tensors to all parties."""
        g = self.main_group
        if src != self.rank:
            if size is None:
                size = scatter_list[self.rank].size()
            return self._recv_tensor(torch.long, size, src, g, "scatter")
        for r in self._others(g):
            self._send_tensor(scatter_list[r].data, r, g)
        return scatter_list[self.rank].data

    def _combine(
        self, tensors: list[torch.Tensor], op: Any, *, root: int | None
    ) -> list[torch.Tensor] | None:
        """Reduce ``tensors`` over the main group at ``root`` (None: at every member)."""
        fn = _REDUCE.get(op)
        if fn is None:
            raise ProtocolError(f"TLS transport: reduce op {op} is not supported")
        g = self.main_group
        targets = self._others(g) if root is None else ([root] if root != self.rank else [])
        # a small batch (a Beaver opening's eps and delta) as one message, as over gloo
        pack = packable(tensors)
        wire = [torch.cat([t.data.reshape(-1) for t in tensors])] if pack else tensors
        for dst in targets:
            for t in wire:
                self._send_tensor(t.data, dst, g)
        if root is not None and root != self.rank:
            return None
        received = {
            r: [self._recv_tensor(t.dtype, t.size(), r, g, "reduce") for t in wire]
            for r in self._others(g)
        }
        if pack:
            sizes = [t.numel() for t in tensors]
            received = {
                r: [p.view_as(t) for p, t in zip(got[0].split(sizes), tensors, strict=True)]
                for r, got in received.items()
            }
        out = []
        for i, t in enumerate(tensors):
            if t.dtype.is_floating_point or t.dtype.is_complex or not received:
                # Rounding depends on the order: combine in rank order on every party.
                order = list(g.ranks)
                acc = t.data.clone() if order[0] == self.rank else received[order[0]][i]
            else:
                # Exact ring / bitwise ops: any order gives the same bits, so accumulate into
                # the first received buffer (ours, fresh) and save a clone of the input.
                order = [*self._others(g), self.rank]
                acc = received[order[0]][i]
            for r in order[1:]:
                fn(acc, t.data if r == self.rank else received[r][i])
            out.append(acc)
        return out

    @_logging
    def reduce(self, input: Any, dst: int, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        """Reduces the input data across all parties."""
        tensors = self._batch(input, batched, "reduce")
        out = self._combine(tensors, op, root=dst)
        if out is None:
            return None
        return out if batched else out[0]

    @_logging
    def all_reduce(self, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        """Reduces the input data across all parties; all get the final result."""
        out = self._combine(self._batch(input, batched, "all_reduce"), op, root=None)
        assert out is not None
        return out if batched else out[0]

    @staticmethod
    def _batch(input: Any, batched: bool, what: str) -> list[torch.Tensor]:
        if batched:
            if not isinstance(input, list):
                raise ProtocolError(f"TLS transport: batched {what} needs a list of tensors")
            return input
        if not torch.is_tensor(input.data):
            raise ProtocolError(f"TLS transport: unbatched {what} needs a tensor")
        return [input]

    @_logging
    def gather(self, tensor: torch.Tensor, dst: int) -> list[torch.Tensor | None]:
        """Gathers a list of tensors in a single party."""
        g = self.main_group
        if self.rank != dst:
            self._send_tensor(tensor.data, dst, g)
            return [None]
        return [
            tensor.data.clone()
            if r == self.rank
            else self._recv_tensor(tensor.dtype, tensor.size(), r, g, "gather")
            for r in g.ranks
        ]

    @_logging
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gathers tensors from all parties in a list."""
        g = self.main_group
        for r in self._others(g):
            self._send_tensor(tensor.data, r, g)
        return [
            tensor.data.clone()
            if r == self.rank
            else self._recv_tensor(tensor.dtype, tensor.size(), r, g, "all_gather")
            for r in g.ranks
        ]

    @_logging
    def broadcast(self, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        """Broadcasts the tensor(s) from ``src``; receivers' tensors are filled in place."""
        g = self._group(group)
        tensors = self._batch(input, batched, "broadcast")
        if self.rank == src:
            for r in self._others(g):
                for t in tensors:
                    self._send_tensor(t.data, r, g)
        else:
            for t in tensors:
                t.data.copy_(self._recv_tensor(t.dtype, t.size(), src, g, "broadcast"))
        return input

    @_logging
    def barrier(self) -> None:
        """Synchronizes all processes of the main group."""
        self.group_barrier(self.main_group)

    @_logging
    def send_obj(self, obj: Any, dst: int, group: Any = None) -> None:
        """Sends the specified object to the destination ``dst``."""
        g = self._group(group)
        self.mesh.send(
            dst, kind=Kind.OBJECT, channel=g.channel, code=0, payload=memoryview(pickle.dumps(obj))
        )

    def _recv_object(self, src: int, g: MeshGroup) -> Any:
        msg = self.mesh.recv(src, g.channel)
        if msg.kind is not Kind.OBJECT:
            raise ProtocolError(
                f"TLS transport: expected an object from rank {src}, got a {msg.kind.name} "
                "message (the parties are out of step)"
            )
        return serial.restricted_loads(msg.payload.numpy().tobytes())

    @_logging
    def recv_obj(self, src: int, group: Any = None) -> Any:
        """Receives an object from a source ``src``."""
        return self._recv_object(src, self._group(group))

    @_logging
    def broadcast_obj(self, obj: Any, src: int, group: Any = None) -> Any:
        """Broadcasts a given object to all parties."""
        g = self._group(group)
        if self.rank == src:
            if obj is None:
                raise ProtocolError(
                    "TLS transport: broadcast_obj: the source party must provide the object"
                )
            buf = memoryview(pickle.dumps(obj))
            for r in self._others(g):
                self.mesh.send(r, kind=Kind.OBJECT, channel=g.channel, code=0, payload=buf)
            return obj
        return self._recv_object(src, g)

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        return self.world_size

    def set_name(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Improper name provided to process on rank {self.rank}")
        self._name = name

    def get_name(self) -> str:
        return self._name

    def get_distributed_backend(self) -> str:
        return "tls"
