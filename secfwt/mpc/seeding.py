"""Fixed seeds for reproducibility tests only (``insecure_fixed_seed``).

CrypTen's own ``manual_seed`` needs its debug mode, so a party started with a test seed has
its PRG seeds replaced here by values derived from that seed. Production never sets one:
seeds then come from ``os.urandom`` (CrypTen), ``secrets`` (the joint seed) and torch's
default generator, which torch seeds from the OS (the dealer's seeds). Anyone who knows a
fixed seed can unmask every share.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.mpc import beaver
from secfwt.mpc.provider import Provider

_insecure_fixed_seed: int | None = None
_fixed_draws: dict[str, int] = {}


def start(seed: int | None) -> None:
    """Set (or clear, with None) this party's test seed; called once when the party starts."""
    global _insecure_fixed_seed
    _insecure_fixed_seed = seed
    _fixed_draws.clear()


def fixed_seed() -> int | None:
    """This party's test seed, or None (always None in production)."""
    return _insecure_fixed_seed


def _derived_seed(label: str) -> int:
    text = f"secfwt-test-seed/{_insecure_fixed_seed}/{label}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def insecure_fixed_bytes(label: str, n: int = 32) -> bytes | None:
    """Test-only deterministic stand-in for ``secrets.token_bytes(n)``; None in production.

    Returns None unless this party was started with ``insecure_fixed_seed``; each call with the
    same label gives the next value of a deterministic stream, so repeated draws still differ.
    """
    if _insecure_fixed_seed is None:
        return None
    k = _fixed_draws.get(label, 0)
    _fixed_draws[label] = k + 1
    out = b""
    i = 0
    while len(out) < n:
        text = f"secfwt-test-bytes/{_insecure_fixed_seed}/{label}/{k}/{i}"
        out += hashlib.sha256(text.encode()).digest()
        i += 1
    return out[:n]


def fix_seeds(rank: int, world_size: int, *, label: str = "") -> None:
    """Replace the random PRG seeds of this party by ones derived from the test seed.

    Computing parties: CrypTen's pairwise prev/next, local and global generators (consistent
    across parties exactly as ``crypten._setup_prng`` makes them). Dealer: torch's default
    generator, from which ``TTPServer`` draws the per-party seeds it then sends.
    """
    if rank >= world_size:
        torch.manual_seed(_derived_seed("dealer") & (2**63 - 1))
        return
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    at = f"{label}/" if label else ""  # "" keeps the seeds of runs without reseeds unchanged
    for device in crypten.generators["prev"]:
        crypten.generators["prev"][device].manual_seed(_derived_seed(f"{at}pair/{prv}/{rank}"))
        crypten.generators["next"][device].manual_seed(_derived_seed(f"{at}pair/{rank}/{nxt}"))
        crypten.generators["local"][device].manual_seed(_derived_seed(f"{at}local/{rank}"))
        crypten.generators["global"][device].manual_seed(_derived_seed(f"{at}global"))


def insecure_reseed(label: str) -> bool:
    """Tests only: reseed every PRG of the session, the dealer's included, from (test seed, label).

    Called by the computing parties at the same protocol point (a checkpoint at step k), it
    makes the randomness after that point independent of what ran before, so a run resumed
    from that checkpoint draws exactly what the uninterrupted run drew (bit-identical shares).
    Does nothing and returns False unless the party was started with ``insecure_fixed_seed``;
    the dealer refuses the request in that case too (:func:`dealer_reseed`).
    """
    from crypten.mpc.provider.ttp_provider import TTPClient

    if _insecure_fixed_seed is None:
        return False
    comm = crypten.communicator.get()
    rank, world_size = comm.get_rank(), comm.get_world_size()
    fix_seeds(rank, world_size, label=label)
    beaver.reset_pools()  # pooled triples were drawn before this point
    if crypten.cfg.mpc.provider == Provider.TTP.value:
        client = TTPClient.get()
        client.generator.manual_seed(_derived_seed(f"ttp/{rank}/{label}"))
        if rank == 0:
            client.ttp_request("secfwt_insecure_reseed", None, label)
    return True


def dealer_reseed(server: Any, label: str) -> torch.Tensor:
    """The dealer's half of :func:`insecure_reseed` (``TTPServer.secfwt_insecure_reseed``)."""
    if _insecure_fixed_seed is None:
        # RuntimeError is what TTPServer's loop catches: the dealer stops instead of serving
        # predictable randomness to a party that asks for it outside a fixed-seed test.
        raise RuntimeError(
            "refused secfwt_insecure_reseed: the dealer was not started with insecure_fixed_seed"
        )
    for i, g in enumerate(server.generators):
        g.manual_seed(_derived_seed(f"ttp/{i}/{label}"))
    return torch.zeros(1, dtype=torch.long)
