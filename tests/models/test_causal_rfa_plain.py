"""Causal Random Feature Attention (plaintext backend) against its definition.

The reference is the O(T^2) form written from the formula alone: kernel
K[t, j] = exp(sigma W q^_t) . exp(sigma W k^_j) (the features' centring constant and 1/sqrt(D)
cancel in the ratio), out_t = sum_{j<=t} m_j K[t, j] v_j / sum_{j<=t} m_j K[t, j].
"""

from __future__ import annotations

import pytest
import torch

from secfwt.models.attention import (
    RFASettings,
    causal_rfa_attention,
    default_causal_chunk,
    rfa_attention,
    rfa_projection,
)
from secfwt.models.ops import PlainOps

#: float64 against float64 with another summation order.
TOL = 1e-12
N, NH, T, DH = 2, 3, 11, 8
SETTINGS = RFASettings(num_features=16, sigma=1.5, seed=5)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(N, NH, T, DH, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(N, T, dtype=torch.float64)
    mask[0, 8:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    mask[1, 6] = 0  # and a hole
    return q, k, v, mask


def _quadratic_reference(q, k, v, mask, w, sigma):
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    phi_q, phi_k = torch.exp(sigma * qn @ w.t()), torch.exp(sigma * kn @ w.t())  # (N, nh, T, D)
    kernel = phi_q @ phi_k.transpose(-1, -2)  # (N, nh, T, T)
    t = q.shape[-2]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & mask[:, None, None, :].bool()
    kernel = kernel * allowed
    return (kernel @ v) / kernel.sum(-1, keepdim=True)


@pytest.mark.parametrize("chunk", [None, 1, 3, 4, T, 64])
def test_causal_rfa_equals_quadratic_causal_masked_rfa(chunk: int | None) -> None:
    q, k, v, mask = _inputs()
    w = rfa_projection(layer=1, head_dim=DH, settings=SETTINGS)
    got = causal_rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=SETTINGS, chunk=chunk)
    want = _quadratic_reference(q, k, v, mask, w, SETTINGS.sigma)
    real = mask.bool()[:, None, :, None].expand_as(got)
    assert float((got - want)[real].abs().max()) < TOL
    assert bool(torch.isfinite(got).all())  # also at padded positions, left padding included


def test_last_real_position_equals_bidirectional_rfa() -> None:
    """With right padding, the last real query sees every real key: rfa_attention's output."""
    q, k, v, mask = _inputs()
    w = rfa_projection(layer=0, head_dim=DH, settings=SETTINGS)
    causal = causal_rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=SETTINGS, chunk=4)
    full = rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=SETTINGS)
    assert float((causal[0, :, 7] - full[0, :, 7]).abs().max()) < TOL
    assert float((causal[0, :, 3] - full[0, :, 3]).abs().max()) > 1e-3  # earlier ones do not


@pytest.mark.parametrize("chunk", [1, 4, None])
@pytest.mark.parametrize("t", [0, 4, 5, 9])
def test_output_at_t_does_not_depend_on_later_positions(chunk: int | None, t: int) -> None:
    q, k, v, mask = _inputs()
    w = rfa_projection(layer=2, head_dim=DH, settings=SETTINGS)
    base = causal_rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=SETTINGS, chunk=chunk)
    q2, k2, v2, _ = _inputs(seed=9)  # every input after t replaced, the mask flipped there
    for x, y in ((q, q2), (k, k2), (v, v2)):
        y[:, :, : t + 1] = x[:, :, : t + 1]
    mask2 = torch.cat([mask[:, : t + 1], 1 - mask[:, t + 1 :]], dim=1)
    moved = causal_rfa_attention(PlainOps(), q2, k2, v2, mask2, w=w, settings=SETTINGS, chunk=chunk)
    assert torch.equal(moved[:, :, : t + 1], base[:, :, : t + 1])
    assert float((moved[:, :, t + 1 :] - base[:, :, t + 1 :]).abs().max()) > 1e-3


def test_default_chunk_and_bad_chunk() -> None:
    assert default_causal_chunk(num_features=64, head_dim=64, length=256) == 256  # one chunk
    assert default_causal_chunk(num_features=64, head_dim=64, length=1024) == 64
    assert default_causal_chunk(num_features=16, head_dim=8, length=300) == 16  # sqrt(144) -> 16
    q, k, v, mask = _inputs()
    w = rfa_projection(layer=0, head_dim=DH, settings=SETTINGS)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        causal_rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=SETTINGS, chunk=0)
