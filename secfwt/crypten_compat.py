"""The one place that adapts CrypTen 0.4.1 (PyPI, 2022) to torch 2.13.

Nothing else in secfwt imports ``crypten`` before this module has run, patches CrypTen or
touches its global config. Every adaptation says what breaks without it.

1. ``torch.onnx._internal.registration`` no longer exists in torch 2.x releases after 2.5;
   ``crypten.nn.onnx_converter`` imports it at import time, so ``import crypten`` fails with
   ``No module named 'torch.onnx._internal.registration'``. We never use CrypTen's ONNX
   converter (BERT blocks do not convert, see NOTES.md; secfwt builds its layers on CrypTen
   tensors directly), so an empty stub module is registered in ``sys.modules``.
2. ``crypten.load`` calls ``torch.load`` which now defaults to ``weights_only=True`` and
   refuses CrypTen's pickled objects. :func:`load_closure` passes ``weights_only=False``;
   use it only on files this party wrote itself.
3. CrypTen's config singleton accepts any key and defaults to the TFP provider, in which
   rank 0 generates every Beaver triple and so learns the other party's inputs (CrypTen
   issues #450, #505). :func:`configure` sets the provider explicitly from a typed enum and
   is the only writer of ``crypten.cfg``.
"""

from __future__ import annotations

import enum
import logging
import sys
import types
from typing import Any

import torch

log = logging.getLogger(__name__)

_STUB_NAME = "torch.onnx._internal.registration"


def _install_onnx_stub() -> None:
    try:
        __import__(_STUB_NAME)
        return
    except ImportError:
        pass
    stub = types.ModuleType(_STUB_NAME)
    stub.registry = None  # type: ignore[attr-defined]  # the only name crypten imports from it
    sys.modules[_STUB_NAME] = stub


_install_onnx_stub()

import crypten  # noqa: E402  (must follow the stub)
import crypten.communicator as crypten_comm  # noqa: E402,F401
import crypten.mpc  # noqa: E402,F401


class Provider(enum.Enum):
    """Source of Beaver triples and other correlated randomness."""

    #: A dealer process (CrypTen's trusted third party) that holds no input.
    TTP = "TTP"
    #: Rank 0 generates all triples and learns every other party's input: development only.
    TFP = "TFP"


def configure(*, provider: Provider, comm_stats: bool = True) -> None:
    """Set CrypTen's global options. The only writer of ``crypten.cfg`` in secfwt."""
    crypten.cfg.mpc.provider = provider.value
    # Rounds and bytes are only counted in verbose mode (NOTES.md).
    crypten.cfg.communicator.verbose = comm_stats


def load_closure(f: Any) -> Any:
    """``torch.load`` for files written by ``crypten.save`` on this party (adaptation 2)."""
    return torch.load(f, weights_only=False)


__all__ = ["Provider", "configure", "crypten", "load_closure"]


def init_party(*, rank: int, world_size: int, rendezvous: str, provider: Provider, comm_stats: bool = True) -> None:
    """Join the MPC session of this process: set CrypTen's config, then ``crypten.init``.

    CrypTen reads its rendezvous from environment variables; they are set here, in the party's
    own process, and nowhere else.
    """
    import os

    os.environ.update(
        {
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "RENDEZVOUS": rendezvous,
            "DISTRIBUTED_BACKEND": "gloo",
        }
    )
    configure(provider=provider, comm_stats=comm_stats)
    if provider is Provider.TFP:
        log.warning(
            "INSECURE: the TFP provider lets the model owner (rank 0) generate every Beaver triple "
            "and so learn the data owner's inputs. Development only."
        )
    crypten.init()


def run_dealer() -> None:
    """Serve correlated randomness until rank 0 shuts the session down (the dealer's loop)."""
    crypten.mpc.provider.TTPServer()


def communication_stats() -> dict[str, int]:
    stats = crypten.communicator.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"])}


def reset_communication_stats() -> None:
    crypten.communicator.get().reset_communication_stats()


def shutdown_party() -> None:
    crypten.uninit()
