"""Where a party's ring products run: the job's ``run.device``.

``"cpu"`` (the default) keeps every product on the host, as :mod:`secfwt.mpc.ring_tuning`
measures best there. ``"cuda"`` or ``"cuda:N"`` adds a way for every product of the shares (the
Beaver protocol's local products, the dealer's triples, the owner's weight products): the exact
float64 limb GEMMs of :mod:`secfwt.mpc.ring` on that device, which CUDA has in hardware while it
has no int64 GEMM at all. The shares themselves, the masks and every message stay in host
memory, and the elementwise steps of the protocols run on the host; a product's operands are
copied to the device and its int64 result back, and fixed operands (an owner's weights, a
session's masks) are copied and split once. Every party process of the job applies the setting,
the dealer's included; the results are the same bits on any device, so parties may differ in
hardware without changing a share.
"""

from __future__ import annotations

import logging
import re

import torch

from secfwt.errors import ConfigError

log = logging.getLogger(__name__)

_SYNTAX = re.compile(r"^(cpu|cuda)(:(\d+))?$")


def check(value: str, *, field: str = "run.device", source: str = "") -> None:
    """Refuse a value that is neither ``cpu``, ``cuda`` nor ``cuda:N`` (no machine check).
    ``field`` names the setting in the message, ``source`` where it came from (a job file)."""
    m = _SYNTAX.match(value.strip().lower()) if isinstance(value, str) else None
    if m is None or (m.group(1) == "cpu" and m.group(2)):
        raise ConfigError(
            f'{_at(source)}{field} = {value!r}: expected "cpu" (the default), "cuda" or "cuda:N" '
            "(a CUDA device index)"
        )


def resolve(value: str, *, field: str = "run.device", source: str = "") -> torch.device | None:
    """The device the products may run on (None: the host only), checked on this machine."""
    check(value, field=field, source=source)
    m = _SYNTAX.match(value.strip().lower())
    assert m is not None
    if m.group(1) == "cpu":
        return None
    said = f"{_at(source)}{field} = {value!r}"
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{said}: torch {torch.__version__} on this machine sees no CUDA device; set "
            f'{field} = "cpu", or install a CUDA build of torch where a GPU is present'
        )
    count = torch.cuda.device_count()
    index = int(m.group(3)) if m.group(3) is not None else torch.cuda.current_device()
    if index >= count:
        raise ConfigError(f"{said}: this machine has {count} CUDA device(s), 0..{count - 1}")
    return torch.device("cuda", index)


def _at(source: str) -> str:
    return f"{source}: " if source else ""


def warm_up(dev: torch.device) -> None:
    """Create the device's context and BLAS handle now, so that the first product's timing
    (:mod:`secfwt.mpc.ring_tuning`) measures the product, not CUDA's start."""
    x = torch.ones(8, 8, dtype=torch.float64, device=dev)
    (x @ x).sum().item()
    log.info("ring products may run on %s", dev)


__all__ = ["check", "resolve", "warm_up"]
