"""Transports that carry CrypTen's MPC traffic between the parties.

* :attr:`Transport.GLOO`: CrypTen's own ``torch.distributed`` gloo communicator. Plaintext on
  the wire (torch's gloo backend in this build has no TLS): for local simulation and trusted
  networks only.
* :attr:`Transport.TLS`: :class:`secfwt.mpc.transport.communicator.MeshCommunicator`, every
  message over mutually authenticated TLS 1.3 gRPC streams, one per ordered pair of parties
  (:mod:`secfwt.mpc.transport.mesh`, which finds its peers through
  :mod:`secfwt.mpc.transport.rendezvous` and frames messages with
  :mod:`secfwt.mpc.transport.streams`); each party checks that the peer's certificate names the
  role it expects (:mod:`secfwt.mpc.transport.identity`). The default between hosts.

Both give bit-identical results on the same seeds and count bytes and rounds the same way
(CrypTen's own accounting decorator wraps both).

This package module imports neither torch nor grpc, so configs can name a transport cheaply;
:mod:`secfwt.mpc.transport.selection` loads the communicator when a party selects TLS.
"""

from __future__ import annotations

import enum

from secfwt.mpc.transport.identity import (
    TlsBundle,
    TlsSettings,
    ephemeral_tls_bundle,
    keepalive_for_heartbeat,
    peer_name,
    tls_settings,
)


class Transport(enum.Enum):
    """How MPC messages travel between the parties."""

    #: torch.distributed gloo over TCP, plaintext: local simulation and trusted networks only.
    GLOO = "gloo"
    #: gRPC streams over mutually authenticated TLS: the default between hosts.
    TLS = "tls"


__all__ = [
    "TlsBundle",
    "TlsSettings",
    "Transport",
    "ephemeral_tls_bundle",
    "keepalive_for_heartbeat",
    "peer_name",
    "tls_settings",
]
