"""Random ring elements from AES-128-CTR keystreams instead of Mersenne Twister.

CrypTen draws every random ring element (triples, masks, zero sharings) with
``torch.randint`` from a ``torch.Generator``: Mersenne Twister, not a cryptographic generator
(its state follows from 624 outputs), and a range that stops one short of the ring's top value.
:func:`install` makes ``generate_random_ring_element`` (full 64-bit ring, CPU) read an
AES-128-CTR keystream per generator (key = SHA-256 of the generator's seed): uniform over the
whole ring, cryptographically pseudorandom, and faster than torch's draw. Both holders of a
seed draw the same stream, as with torch; a ``manual_seed`` to a new value restarts it. Other
ring sizes and devices keep torch's generator. Installed by :func:`secfwt.mpc.engine.install`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from secfwt.crypten_compat import crypten

_DOMAIN = b"secfwt/ring-elements/aes-128-ctr/"


def installed() -> bool:
    import crypten.common.rng as rng

    return getattr(rng.generate_random_ring_element, "_secfwt_keystream", False)


def install() -> None:
    """Route CrypTen's full-ring CPU draws through the keystream. Idempotent."""
    import crypten.common.rng as rng
    from crypten.mpc.primitives import arithmetic
    from crypten.mpc.provider import tfp_provider, ttp_provider
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if installed():
        return
    crypten_draw = rng.generate_random_ring_element
    streams: dict[int, tuple[torch.Generator, int, Any]] = {}
    zeros = [b""]  # plaintext of the keystream, grown as needed (AES-CTR of zeros = keystream)

    def keystream(generator: torch.Generator, n: int) -> torch.Tensor:
        seed = generator.initial_seed()
        entry = streams.get(id(generator))
        if entry is None or entry[0] is not generator or entry[1] != seed:
            key = hashlib.sha256(_DOMAIN + seed.to_bytes(8, "little")).digest()[:16]
            cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16)))
            entry = (generator, seed, cipher.encryptor())
            streams[id(generator)] = entry  # holds the generator: its id is never reused meanwhile
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        nbytes = 8 * n
        if len(zeros[0]) < nbytes:
            zeros[0] = bytes(nbytes)
        out = bytearray(nbytes + 15)  # update_into wants room for a block
        entry[2].update_into(memoryview(zeros[0])[:nbytes], out)
        return torch.frombuffer(out, dtype=torch.int64, count=n)

    def generate_random_ring_element(
        size: Any, ring_size: int = 2**64, generator: Any = None, **kwargs: Any
    ) -> Any:
        device = kwargs.get("device")
        other_device = device is not None and torch.device(device).type != "cpu"
        if ring_size != 2**64 or set(kwargs) - {"device"} or other_device:
            return crypten_draw(size, ring_size=ring_size, generator=generator, **kwargs)
        if generator is None:
            generator = crypten.generators["local"][torch.device("cpu")]
        shape = torch.Size([size] if isinstance(size, int) else size)
        return keystream(generator, math.prod(shape)).reshape(shape)

    draw: Any = generate_random_ring_element
    draw._secfwt_keystream = True
    for module in (rng, arithmetic, ttp_provider, tfp_provider):
        module.generate_random_ring_element = draw
