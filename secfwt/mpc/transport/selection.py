"""Which communicator CrypTen's next ``crypten.init()`` builds: gloo or the TLS mesh.

CrypTen's communicator is torch.distributed/gloo, plaintext on the wire in this torch build
(no gloo TLS: seeds and triple shares would cross it in the clear). The class is hard-wired:
``crypten.communicator``'s ``get``/``_init``/``uninit``/``is_initialized`` look up the module
name ``DistributedCommunicator``, and the TTP provider calls ``torch.distributed`` directly
(``isend``/``irecv``/``barrier`` when it hands out the dealer's PRG seeds). :func:`select`
binds that name to :class:`~secfwt.mpc.transport.communicator.MeshCommunicator` for TLS, and
:func:`install_ttp_transport` gives the TTP provider a ``torch.distributed`` stand-in that
sends those three calls over the mesh for mesh groups, so gloo runs execute CrypTen's code.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ConfigError
from secfwt.mpc.transport import TlsSettings, Transport

_active_transport = Transport.GLOO


class _TransportDist(types.ModuleType):
    """Stands in for ``torch.distributed`` inside ``crypten.mpc.provider.ttp_provider``.

    ``isend``/``irecv``/``barrier`` on a mesh group (TLS transport) go through the active
    :class:`MeshCommunicator` without CrypTen's accounting (gloo's direct calls are not
    counted either); every other call and every gloo group reach ``torch.distributed``.
    """

    def __init__(self) -> None:
        super().__init__("secfwt_ttp_dist", "torch.distributed, or the TLS mesh for mesh groups")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.distributed, name)

    @staticmethod
    def _mesh(group: Any) -> Any:
        if _active_transport is Transport.TLS:
            from secfwt.mpc.transport.communicator import MeshGroup

            if isinstance(group, MeshGroup):
                return crypten.communicator.get()
        return None

    def isend(self, tensor: Any, dst: int, group: Any = None, tag: int = 0) -> Any:
        mesh = self._mesh(group)
        if mesh is None:
            return torch.distributed.isend(tensor, dst, group=group, tag=tag)
        return mesh.p2p_isend(tensor, dst, group)

    def irecv(self, tensor: Any, src: int | None = None, group: Any = None, tag: int = 0) -> Any:
        mesh = self._mesh(group)
        if mesh is None:
            return torch.distributed.irecv(tensor, src=src, group=group, tag=tag)
        return mesh.p2p_irecv(tensor, src, group)

    def barrier(self, group: Any = None, **kwargs: Any) -> Any:
        mesh = self._mesh(group)
        if mesh is None:
            return torch.distributed.barrier(group=group, **kwargs)
        return mesh.group_barrier(group)


def install_ttp_transport() -> None:
    """Give the TTP provider the ``torch.distributed`` stand-in. Idempotent."""
    from crypten.mpc.provider import ttp_provider

    if not isinstance(ttp_provider.dist, _TransportDist):
        ttp_provider.dist = _TransportDist()  # type: ignore[attr-defined]


def select(transport: Transport, *, rank: int, world_size: int, tls: TlsSettings | None) -> None:
    """Make the next ``crypten.init()`` build the communicator of ``transport``."""
    import crypten.communicator as crypten_comm
    from crypten.communicator.distributed_communicator import DistributedCommunicator

    global _active_transport
    if transport is Transport.TLS:
        if tls is None:
            raise ConfigError(
                "transport 'tls' needs TLS settings (certificates, peers); "
                "see secfwt.mpc.transport.tls_settings"
            )
        from secfwt.mpc.transport.communicator import MeshCommunicator

        MeshCommunicator.prepare(rank=rank, world_size=world_size, settings=tls)
        crypten_comm.DistributedCommunicator = MeshCommunicator  # type: ignore[misc]
    else:
        crypten_comm.DistributedCommunicator = DistributedCommunicator  # type: ignore[misc]
    _active_transport = transport


def active_transport() -> Transport:
    """The transport this process's CrypTen session uses (or will use at ``crypten.init``)."""
    return _active_transport
