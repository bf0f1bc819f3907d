"""Causal Random Feature Attention on the MPC backend equals its float64 plaintext reference.

The data owner shares queries, keys and values (and, in one variant, the padding mask); the
plaintext reference runs the same code on PlainOps over the fixed-point encoding CrypTen shared.
Both the one-chunk (quadratic masked) and the multi-chunk (prefix sums over chunks) paths run.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from secfwt.models.attention import RFASettings, causal_rfa_attention, rfa_projection
from secfwt.models.ops import PlainOps
from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role
from tests.mpc.nonlinear.common import _encoded, _max_err, _one_thread, _run, _share

log = logging.getLogger(__name__)

#: Max absolute error at real positions [measured, 2 runs x 4 variants: 1.4e-3 .. 1.7e-3]: l2
#: normalisation (inv_sqrt, 1e-4 relative), the bounded exp (about 5e-4 relative at its bound)
#: and the normaliser's reciprocal (1e-4 relative) on outputs of size |v| ~ 1.
ATOL = 5e-3
N, NH, T, DH = 2, 2, 20, 16
SETTINGS = RFASettings(num_features=32, sigma=1.5, seed=11)
CHUNKS = (None, 4)  # None: the default (one chunk of all 20 positions here); 4: five chunks


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    mask = torch.ones(N, T)
    mask[0, 15:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    return {
        "q": 2.0 * torch.randn(N, NH, T, DH, generator=g),
        "k": 2.0 * torch.randn(N, NH, T, DH, generator=g),
        "v": torch.randn(N, NH, T, DH, generator=g),
        "mask": mask,
    }


def _party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    _one_thread()
    from secfwt.models.ops import SecureOps

    data, shapes = payload["data"], payload["shapes"]
    q, k, v = (_share(data, name, shapes, src=Role.DATA_OWNER.rank) for name in "qkv")
    secret_mask = _share(data, "mask", shapes, src=Role.DATA_OWNER.rank)
    w = rfa_projection(layer=0, head_dim=DH, settings=SETTINGS)
    out = {}
    for chunk in CHUNKS:
        for name, mask in (("secret", secret_mask), ("public", payload["public_mask"])):
            got = causal_rfa_attention(
                SecureOps(), q, k, v, mask, w=w, settings=SETTINGS, chunk=chunk
            )
            out[(chunk, name)] = got.get_plain_text()
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.mark.multiprocess
def test_secure_causal_rfa_matches_plaintext() -> None:
    inputs = _inputs()
    outputs = _run(_party, inputs, {}, public_mask=inputs["mask"])
    q, k, v = (_encoded(inputs[name]) for name in "qkv")
    mask = inputs["mask"].double()
    w = rfa_projection(layer=0, head_dim=DH, settings=SETTINGS)
    real = mask.bool()[:, None, :, None].expand(N, NH, T, DH)
    for chunk in CHUNKS:
        want = causal_rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=SETTINGS, chunk=chunk)
        for name in ("secret", "public"):
            got = outputs[(chunk, name)].double()
            assert _max_err(got[real], want[real], f"causal rfa chunk={chunk} {name}") < ATOL
