"""A party process's MPC session: join it (the engine installed first), serve, leave, count.

Nothing else in secfwt writes CrypTen's global config (``crypten.cfg``) or calls
``crypten.init``/``uninit``.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ConfigError
from secfwt.mpc import engine, ring_tuning, seeding
from secfwt.mpc.device import warm_up
from secfwt.mpc.provider import Provider
from secfwt.mpc.traffic import Traffic, TrafficMeter
from secfwt.mpc.transport import TlsSettings, Transport, selection

log = logging.getLogger(__name__)


def configure(*, provider: Provider, comm_stats: bool = True) -> None:
    """Set CrypTen's global options. The only writer of ``crypten.cfg`` in secfwt.

    CrypTen's config accepts any key and defaults to the TFP provider (rank 0 generates every
    triple and so learns the other party's inputs), so the provider is always set explicitly.
    """
    crypten.cfg.mpc.provider = provider.value
    # CrypTen counts rounds and bytes only in verbose mode.
    crypten.cfg.communicator.verbose = comm_stats


def init_party(
    *,
    rank: int,
    world_size: int,
    provider: Provider,
    rendezvous: str = "",
    comm_stats: bool = True,
    transport: Transport = Transport.GLOO,
    tls: TlsSettings | None = None,
    insecure_fixed_seed: int | None = None,
    device: torch.device | None = None,
) -> None:
    """Join this process's MPC session: install the engine, set CrypTen's config and the
    transport, then ``crypten.init``.

    ``transport``: :attr:`Transport.GLOO` (``rendezvous`` is its torch.distributed init URL,
    e.g. ``file:///tmp/x``; plaintext, trusted networks only) or :attr:`Transport.TLS`
    (``tls`` from :func:`secfwt.mpc.transport.tls_settings`, or the launcher's local bundle).
    CrypTen reads gloo's rendezvous from environment variables; they are set here, in the
    party's own process, and nowhere else.

    ``insecure_fixed_seed`` is for reproducibility tests only: it replaces every random seed
    of the MPC session (CrypTen's PRGs, the dealer's, secfwt's joint seed) by values derived
    from it, so anyone who knows it can unmask the shares. Never set it on real data.

    ``device``: where this process's ring products may also run (:mod:`secfwt.mpc.device`).
    """
    engine.install()
    ring_tuning.set_device(device)
    if device is not None and device.type == "cuda":
        warm_up(device)
    if transport is Transport.GLOO:
        if not rendezvous:
            raise ConfigError(
                "transport 'gloo' needs a rendezvous URL (e.g. file:///tmp/secfwt-rdv)"
            )
        os.environ.update(
            {
                "WORLD_SIZE": str(world_size),
                "RANK": str(rank),
                "RENDEZVOUS": rendezvous,
                "DISTRIBUTED_BACKEND": "gloo",
            }
        )
        if rank == 0 and not rendezvous.startswith("file://"):
            # A file rendezvous means one machine; anything else may cross a network.
            log.warning(
                "MPC transport gloo: shares and seeds cross the network in plaintext; "
                "use transport 'tls' between hosts"
            )
    selection.select(transport, rank=rank, world_size=world_size, tls=tls)
    configure(provider=provider, comm_stats=comm_stats)
    if provider is Provider.TFP:
        log.warning(
            "INSECURE: the TFP provider lets the model owner (rank 0) generate every Beaver "
            "triple and so learn the data owner's inputs. Development only."
        )
    seeding.start(insecure_fixed_seed)
    if insecure_fixed_seed is not None and rank >= world_size:
        seeding.fix_seeds(rank, world_size)  # before TTPServer draws the seeds it hands out
    crypten.init()
    if insecure_fixed_seed is not None:
        log.warning(
            "INSECURE: fixed test seeds (insecure_fixed_seed); every share is predictable. "
            "Tests only."
        )
        if rank < world_size:
            seeding.fix_seeds(rank, world_size)


def run_dealer() -> None:
    """Serve correlated randomness until rank 0 shuts the session down (the dealer's loop)."""
    with warnings.catch_warnings():
        # TTPServer calls crypten.init() again on an initialised dealer; harmless, and noisy.
        warnings.filterwarnings(
            "ignore", message="CrypTen is already initialized", category=RuntimeWarning
        )
        try:
            crypten.mpc.provider.TTPServer()
        except BaseException:
            close_after_failure()
            raise
    if selection.active_transport() is Transport.TLS:
        # Close the dealer's streams in order, so the computing parties' shutdown need not wait
        # for them to time out (gloo needs nothing: the process just exits).
        crypten.uninit()


def close_after_failure() -> None:
    """Best effort, once this party failed: close its TLS streams in order instead of dying with
    them open, so a peer blocked on us learns which party was lost first (the mesh's CLOSE
    carries it) rather than blaming us. gloo has nothing to say: the process just exits."""
    if selection.active_transport() is not Transport.TLS:
        return
    if not crypten.communicator.is_initialized():
        return
    try:
        crypten.uninit()
    except Exception as exc:  # noqa: BLE001  (the session is already broken)
        log.debug("closing the MPC session after a failure: %s", exc)


def communication_stats() -> dict[str, int]:
    """Rounds and bytes this party sent since the last reset (counted when ``comm_stats``)."""
    stats = crypten.communicator.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}


#: This process's traffic meter (:func:`count_traffic`), read by :func:`traffic_now`.
_meter: TrafficMeter | None = None


def count_traffic() -> TrafficMeter:
    """Count this process's traffic from now on, by direction and with the dealer apart (the
    launcher, in every party process once its session is joined)."""
    global _meter
    _meter = TrafficMeter(crypten.communicator.get())
    return _meter


def traffic_now() -> Traffic | None:
    """This process's traffic so far, for a job to count its phases; None where nothing counts
    it (a party started without :func:`count_traffic`)."""
    return None if _meter is None else _meter.snapshot()


def reset_communication_stats() -> None:
    crypten.communicator.get().reset_communication_stats()


def shutdown_party() -> None:
    crypten.uninit()
