"""Products with a matrix that one computing party holds in the clear: the model owner's weights.

The model owner knows its frozen weights ``W``; secret-sharing them and multiplying with
Beaver's protocol treats ``W`` as unknown to everyone. Knowing that one party holds ``W``, the
product with a secret-shared ``x = x_o + x_p`` (owner's and other party's shares) needs only the
cross term ``x_p W``, a one-sided product (the dealer-aided form of the secure matrix products of
SecureML, Mohassel and Zhang, S&P 2017, with the trusted dealer of CrypTen's TTP provider):

* the dealer gives the other party a random ``A`` (shape of ``x``), the owner a random ``B``
  (shape of ``W``), and both additive shares of ``C = A B``;
* the other party sends ``e = x_p - A``, the owner sends ``d = W - B`` (one exchange);
* the owner's share is ``(x_o + e) W + C_o``, the other party's ``A d + C_p``, since
  ``x_p W = e W + A (d + B)``.

``e`` is masked by ``A`` (unknown to the owner) and ``d`` by ``B`` (unknown to the other
party), so each party learns nothing new, exactly as in Beaver's protocol. Per product each
party computes ONE ring matmul instead of two, the owner's with ``W`` itself, whose fixed-point
values are narrow (:func:`secfwt.mpc.ring.ring_matmul_narrow`: half a full ring matmul), and
only the owner sends a weight-sized message (Beaver: both parties).

Only values the owner put in unchanged may be :class:`OwnedMatrix`: anything computed in MPC
(updated or perturbed trainable weights) is unknown to the owner and must stay an MPCTensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ProtocolError
from secfwt.mpc import beaver
from secfwt.mpc.ring import NARROW_BOUND, ring_matmul, ring_matmul_narrow

#: Fractional bits of CrypTen's fixed point, which the owner's values are encoded with.
_FRAC_BITS = 16


@dataclasses.dataclass(frozen=True)
class OwnedMatrix:
    """A matrix (or a batch, leading dims) known in the clear to the computing party ``owner``.

    ``encoded`` is the owner's fixed-point value (CrypTen's encoding, int64) and None on the
    other party, which knows only ``shape``. ``narrow`` (owner only) says every encoded value is
    below :data:`~secfwt.mpc.ring.NARROW_BOUND` in magnitude; it is never sent anywhere.
    """

    owner: int
    shape: torch.Size
    encoded: torch.Tensor | None
    narrow: bool = False

    @classmethod
    def share(cls, value: torch.Tensor | None, *, owner: int, shape: tuple[int, ...]) -> OwnedMatrix:
        """Both parties call this; the owner passes its float matrix, the other None.

        Nothing is communicated: the other party only learns the (public) shape.
        """
        if len(shape) < 2:
            raise ValueError(f"an owned matrix needs at least 2 dims, got shape {tuple(shape)}")
        if crypten.communicator.get().get_rank() != owner:
            return cls(owner=owner, shape=torch.Size(shape), encoded=None)
        if value is None or tuple(value.shape) != tuple(shape):
            got = None if value is None else tuple(value.shape)
            raise ProtocolError(f"owned matrix: owner's value has shape {got}, agreed shape is {tuple(shape)}")
        from crypten.encoder import FixedPointEncoder

        # float32 first, as PartySession.share does: the same fixed-point values as a sharing
        encoded = FixedPointEncoder(precision_bits=_FRAC_BITS).encode(value.to(torch.float32))
        narrow = bool(encoded.abs().max() < NARROW_BOUND) if encoded.numel() else True
        return cls(owner=owner, shape=torch.Size(shape), encoded=encoded, narrow=narrow)

    def dim(self) -> int:
        return len(self.shape)

    def size(self) -> torch.Size:
        return self.shape

    def transpose(self, dim0: int, dim1: int) -> OwnedMatrix:
        shape = list(self.shape)
        shape[dim0], shape[dim1] = shape[dim1], shape[dim0]
        encoded = None if self.encoded is None else self.encoded.transpose(dim0, dim1)
        return dataclasses.replace(self, shape=torch.Size(shape), encoded=encoded)

    def t(self) -> OwnedMatrix:
        return self.transpose(-2, -1)

    def to_mpc(self) -> Any:
        """An ordinary secret sharing (CrypTen's, from the owner) of the same fixed-point values."""
        value = None if self.encoded is None else self.encoded.double() / 2**_FRAC_BITS  # exact
        return crypten.cryptensor(torch.zeros(self.shape) if value is None else value, src=self.owner)


def matmul(x: Any, w: OwnedMatrix) -> Any:
    """``x @ w`` for an MPCTensor ``x`` (16 fractional bits, ``(..., M, K)``) and an owned
    ``w`` (``(..., K, N)``), truncated back to 16 fractional bits like CrypTen's matmul.

    TTP provider only; with any other provider ``w`` is shared the ordinary way and multiplied
    with Beaver's protocol (same result up to the truncation's last bit).
    """
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty

    if not isinstance(crypten.mpc.get_default_provider(), TrustedThirdParty):
        return x.matmul(w.to_mpc())
    if x.encoder.scale != 2**_FRAC_BITS:
        raise ProtocolError(f"owned matmul expects {_FRAC_BITS} fractional bits, x has scale {x.encoder.scale}")
    z = product(x.share, w)
    # CrypTen's 2-party truncation of the product's extra 16 fractional bits (local, SecureML)
    return crypten.mpc.MPCTensor.from_shares(z.div_(2**_FRAC_BITS, rounding_mode="trunc"), precision=_FRAC_BITS)


def product(x_share: torch.Tensor, w: OwnedMatrix) -> torch.Tensor:
    """This party's share of the exact ring product ``x @ encoded(w)`` (not truncated)."""
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.provider.ttp_provider import TTPClient

    comm = crypten.communicator.get()
    rank = comm.get_rank()
    if comm.get_world_size() != 2:
        raise ProtocolError("owned matmul needs exactly 2 computing parties")
    size_x, size_w = x_share.size(), w.shape
    # Draw order matches TTPServer.secfwt_one_sided_matmul: A from the other party's generator,
    # B from the owner's, then rank 1's share of C.
    reply = beaver.dealer_request("secfwt_one_sided_matmul", size_x, size_w, w.owner) if rank == 0 else None
    generator = TTPClient.get().get_generator()
    other = 1 - rank
    if rank == w.owner:
        assert w.encoded is not None
        b = generate_random_ring_element(size_w, generator=generator)
        sending = comm.isend((w.encoded - b).contiguous(), other)  # d = W - B
        e = comm.recv(torch.empty(size_x, dtype=torch.long), other)  # e = x_p - A
        sending.wait()
        mine = x_share + e
        z = ring_matmul_narrow(mine, w.encoded.double()) if w.narrow else ring_matmul(mine, w.encoded)
    else:
        a = generate_random_ring_element(size_x, generator=generator)
        sending = comm.isend((x_share - a).contiguous(), other)
        d = comm.recv(torch.empty(size_w, dtype=torch.long), other)
        sending.wait()
        z = ring_matmul(a, d)
    if rank == 0:
        assert reply is not None
        return z.add_(reply())
    c_size = torch.Size((*beaver.broadcast_shapes(size_x[:-2], size_w[:-2]), size_x[-2], size_w[-1]))
    return z.add_(generate_random_ring_element(c_size, generator=generator))


def dealer_one_sided_matmul(generators: list[torch.Generator], size_x: torch.Size, size_w: torch.Size, owner: int) -> torch.Tensor:
    """The dealer's side of :func:`product`: rank 0's share ``A B - C_1`` of ``C = A B``.

    ``generators`` are the dealer's per-party generators (``TTPServer``'s, seeded in common with
    each party's ``TTPClient``); installed as ``TTPServer.secfwt_one_sided_matmul`` by
    :mod:`secfwt.crypten_compat`.
    """
    from crypten.common.rng import generate_random_ring_element

    a = generate_random_ring_element(size_x, generator=generators[1 - owner])
    b = generate_random_ring_element(size_w, generator=generators[owner])
    c = ring_matmul(a, b)
    return c.sub_(generate_random_ring_element(c.size(), generator=generators[1]))


__all__ = ["OwnedMatrix", "dealer_one_sided_matmul", "matmul", "product"]
