"""Full-ring random elements from AES-128-CTR keystreams (:mod:`secfwt.mpc.keystream`)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from crypten.common import rng
from crypten.mpc.primitives import arithmetic
from crypten.mpc.provider import ttp_provider
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import secfwt.crypten_compat  # noqa: F401  (CrypTen importable on this torch)
from secfwt.mpc import keystream


@pytest.fixture(autouse=True, scope="module")
def _installed() -> None:
    keystream.install()  # what secfwt.mpc.engine.install does when a party starts


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_crypten_caller_draws_from_the_keystream() -> None:
    for module in (rng, arithmetic, ttp_provider):
        assert getattr(module.generate_random_ring_element, "_secfwt_keystream", False), (
            module.__name__
        )


def test_the_stream_is_aes_ctr_of_the_seed_and_continues_across_calls() -> None:
    seed = 12345
    key = hashlib.sha256(
        b"secfwt/ring-elements/aes-128-ctr/" + seed.to_bytes(8, "little")
    ).digest()[:16]
    expected = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 10))
    g = _gen(seed)
    first = rng.generate_random_ring_element((2, 3), generator=g)
    rest = rng.generate_random_ring_element(4, generator=g)
    assert first.shape == (2, 3) and first.dtype == torch.int64
    assert torch.equal(
        torch.cat([first.reshape(-1), rest]),
        torch.frombuffer(bytearray(expected), dtype=torch.int64),
    )


def test_same_seed_same_stream_and_a_new_seed_restarts_it() -> None:
    a, b = _gen(7), _gen(7)
    x = rng.generate_random_ring_element((1000,), generator=a)
    assert torch.equal(
        x, rng.generate_random_ring_element((1000,), generator=b)
    )  # both holders of a seed agree
    assert not torch.equal(
        x, rng.generate_random_ring_element((1000,), generator=a)
    )  # the stream moves on
    a.manual_seed(8)
    c = rng.generate_random_ring_element((1000,), generator=a)
    assert torch.equal(c, rng.generate_random_ring_element((1000,), generator=_gen(8)))


def test_values_cover_the_whole_ring_uniformly() -> None:
    x = rng.generate_random_ring_element((200_000,), generator=_gen(3))
    bits = torch.stack([(x >> k) & 1 for k in range(64)])  # arithmetic shift: bit 63 is the sign
    freq = bits.double().mean(1)
    # each bit is a fair coin: 200k draws put the frequency within 0.5 +- 0.006 (about 5 sigma)
    assert (freq - 0.5).abs().max() < 0.006, freq
    assert (x < 0).any() and (x > 0).any()


def test_empty_scalar_and_other_ring_sizes() -> None:
    g = _gen(1)
    assert rng.generate_random_ring_element((0, 3), generator=g).shape == (0, 3)
    assert rng.generate_random_ring_element((), generator=g).shape == ()
    small = rng.generate_random_ring_element(
        (1000,), ring_size=2**8, generator=g
    )  # torch's generator
    assert small.min() >= -128 and small.max() < 128
