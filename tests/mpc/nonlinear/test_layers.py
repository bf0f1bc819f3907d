"""Softmax, LayerNorm and RMSNorm against plaintext torch on wide score and variance ranges.

One party run (:func:`layers`) computes every output; see :mod:`.common` for the setup.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from secfwt.mpc import nonlinear as nl
from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role
from tests.mpc.nonlinear.common import _encoded, _max_err, _one_thread, _run, _share

log = logging.getLogger(__name__)

# --- Tolerances (max absolute error unless said); measured values (2 runs) in brackets ---------
#: softmax vs torch.softmax: scores in [-30, 30] at lengths 128 and 512, no / public / secret
#: padding mask [9.4e-5], additive -1e4 mask [4.9e-5], scores in [-1000, 1000] [5.6e-5];
#: the target is <= 1e-3.
SOFTMAX_ATOL = 1e-3
#: |row sum - 1| of softmax outputs [2.6e-4].
SOFTMAX_SUM_ATOL = 1e-3
#: LayerNorm / RMSNorm outputs, row variances 1e-4 .. 1e5 with outlier channels of +-50 in a third
#: of the rows, eps 1e-12: per row NORM_ATOL + 2^-16 / std(row) (the input's own resolution, which
#: the mean's rounding carries into the output) [max 1.1e-3 at variance 1e-4, at most 0.35 of the
#: per-row tolerance; RMSNorm 3.8e-4].
NORM_ATOL = 2e-3


def _layer_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    inputs: dict[str, torch.Tensor] = {}
    for length, heads in ((128, 4), (512, 1)):
        scores = (
            torch.rand(1, heads, 64 if length == 512 else length, length, generator=g) * 60 - 30
        )
        keep = torch.ones(1, 1, 1, length)
        keep[..., length // 2 :] = 0  # half the keys are padding
        inputs[f"scores{length}"] = scores
        inputs[f"keep{length}"] = keep
    additive = torch.rand(2, 128, 32, generator=g) * 60 - 30
    additive[:, 100:, :] = -1e4  # a Hugging Face style additive mask; keys along dim 1
    inputs["scores_additive"] = additive
    inputs["scores_wide"] = torch.rand(2, 16, 128, generator=g) * 2000 - 1000  # range safety
    all_masked = torch.ones(1, 1, 4, 8)
    all_masked[0, 0, 0, :] = 0  # query row 0 keeps no key at all
    inputs["keep_rows"] = all_masked
    inputs["scores_rows"] = torch.rand(1, 2, 4, 8, generator=g) * 60 - 30
    rows, d = 48, 384
    # row variances log-spaced over [1e-4, 1e5], the range LayerNorm must survive
    std = torch.exp(torch.linspace(math.log(1e-2), math.log(math.sqrt(1e5)), rows))
    hidden = torch.randn(rows, d, generator=g) * std.unsqueeze(1) + torch.randn(
        rows, 1, generator=g
    )
    hidden[1::3, 5] = 50.0  # outlier channels (BERT/MiniLM hidden states have them) in a third
    hidden[1::3, 77] = -50.0  # of the rows, small-variance ones included
    inputs["hidden"] = hidden
    return inputs


def _layer_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "weight": 1.0 + 0.2 * torch.randn(384, generator=g),
        "bias": 0.1 * torch.randn(384, generator=g),
    }


def _layers_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    _one_thread()
    data, weights, shapes = payload["data"], payload["weights"], payload["shapes"]
    out: dict[str, Any] = {}
    for length in (128, 512):
        scores = _share(data, f"scores{length}", shapes, src=1)
        out[f"softmax{length}"] = nl.softmax(scores, dim=-1).get_plain_text()
        # the padding mask: once public (sequence lengths disclosed to both parties) ...
        out[f"softmax{length}_masked"] = nl.softmax(
            scores, mask=payload["public_keep"][length]
        ).get_plain_text()
        # ... and once secret-shared by the data owner
        secret_keep = _share(data, f"keep{length}", shapes, src=1)
        out[f"softmax{length}_secret_mask"] = nl.softmax(scores, mask=secret_keep).get_plain_text()
    out["softmax_additive"] = nl.softmax(
        _share(data, "scores_additive", shapes, src=1), dim=1
    ).get_plain_text()
    out["softmax_wide"] = nl.softmax(_share(data, "scores_wide", shapes, src=1)).get_plain_text()
    rows = _share(data, "scores_rows", shapes, src=1)
    out["softmax_rows"] = nl.softmax(
        rows, mask=_share(data, "keep_rows", shapes, src=1)
    ).get_plain_text()
    hidden = _share(data, "hidden", shapes, src=1)
    w_secret = _share(weights, "weight", shapes, src=0)
    b_secret = _share(weights, "bias", shapes, src=0)
    out["layer_norm"] = nl.layer_norm(
        hidden, weight=w_secret, bias=b_secret, eps=1e-12
    ).get_plain_text()
    out["layer_norm_public"] = nl.layer_norm(
        hidden, weight=payload["public_weight"], bias=payload["public_bias"], eps=1e-12
    ).get_plain_text()
    out["layer_norm_dim0"] = nl.layer_norm(
        hidden.transpose(0, 1), weight=None, bias=None, eps=1e-5, dim=0
    ).get_plain_text()
    out["rms_norm"] = nl.rms_norm(hidden, weight=w_secret, eps=1e-6).get_plain_text()
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.fixture(scope="module")
def layers() -> dict[str, Any]:
    inputs, weights = _layer_inputs(), _layer_weights()
    outputs = _run(
        _layers_party,
        inputs,
        weights,
        public_weight=weights["weight"],
        public_bias=weights["bias"],
        public_keep={n: inputs[f"keep{n}"] for n in (128, 512)},
    )
    return {"inputs": inputs, "weights": weights, "outputs": outputs}


@pytest.mark.multiprocess
@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("variant", ["", "_masked", "_secret_mask"])
def test_softmax_matches_torch(layers: dict[str, Any], length: int, variant: str) -> None:
    scores = _encoded(layers["inputs"][f"scores{length}"])
    if variant:
        keep = layers["inputs"][f"keep{length}"]
        scores = scores.masked_fill(keep == 0, float("-inf"))
    want = torch.softmax(scores, dim=-1)
    got = layers["outputs"][f"softmax{length}{variant}"].double()
    assert _max_err(got, want, f"softmax{length}{variant}") <= SOFTMAX_ATOL
    assert (
        _max_err(got.sum(-1), torch.ones(()), f"softmax{length}{variant} row sums")
        <= SOFTMAX_SUM_ATOL
    )
    if variant:
        assert float(got[(keep == 0).expand_as(got)].abs().max()) == 0.0  # padding exactly 0


@pytest.mark.multiprocess
def test_softmax_with_additive_minus_1e4_mask_along_dim1(layers: dict[str, Any]) -> None:
    scores = _encoded(layers["inputs"]["scores_additive"])
    assert (
        _max_err(
            layers["outputs"]["softmax_additive"], torch.softmax(scores, dim=1), "softmax -1e4"
        )
        <= SOFTMAX_ATOL
    )


@pytest.mark.multiprocess
def test_softmax_on_wide_scores(layers: dict[str, Any]) -> None:
    scores = _encoded(
        layers["inputs"]["scores_wide"]
    )  # [-1000, 1000]: CrypTen's exp is garbage here
    assert (
        _max_err(layers["outputs"]["softmax_wide"], torch.softmax(scores, dim=-1), "softmax wide")
        <= SOFTMAX_ATOL
    )


@pytest.mark.multiprocess
def test_softmax_fully_masked_row_is_zero(layers: dict[str, Any]) -> None:
    keep = layers["inputs"]["keep_rows"]
    scores = _encoded(layers["inputs"]["scores_rows"]).masked_fill(keep == 0, float("-inf"))
    got = layers["outputs"]["softmax_rows"].double()
    assert float(got[:, :, 0].abs().max()) == 0.0
    assert (
        _max_err(got[:, :, 1:], torch.softmax(scores[:, :, 1:], dim=-1), "softmax rows")
        <= SOFTMAX_ATOL
    )


def _norm_tolerance(x: torch.Tensor, dim: int) -> torch.Tensor:
    """NORM_ATOL plus the input's own resolution relative to the row's spread (mean rounding)."""
    return NORM_ATOL + 2.0**-nl.FRAC_BITS / x.std(dim=dim, unbiased=False, keepdim=True)


def _assert_norm_close(
    got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, label: str
) -> None:
    err = (got.double() - want).abs()
    log.info(
        "%s: max abs error %.2e, max error / tolerance %.2f",
        label,
        float(err.max()),
        float((err / tol).max()),
    )
    assert bool((err <= tol).all())


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["layer_norm", "layer_norm_public"])
def test_layer_norm_over_wide_variances(layers: dict[str, Any], variant: str) -> None:
    x = _encoded(layers["inputs"]["hidden"])
    w, b = (layers["weights"][k].double() for k in ("weight", "bias"))
    if variant == "layer_norm":  # the weights were shared: compare with what was encoded
        w, b = _encoded(w), _encoded(b)
    want = F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-12)
    tol = _norm_tolerance(x, dim=-1) * w.abs().max()
    _assert_norm_close(layers["outputs"][variant], want, tol, variant)


@pytest.mark.multiprocess
def test_layer_norm_along_dim0(layers: dict[str, Any]) -> None:
    x = _encoded(layers["inputs"]["hidden"])
    want = F.layer_norm(x, (x.shape[-1],), eps=1e-5).t()
    _assert_norm_close(
        layers["outputs"]["layer_norm_dim0"], want, _norm_tolerance(x, -1).t(), "dim0"
    )


@pytest.mark.multiprocess
def test_rms_norm(layers: dict[str, Any]) -> None:
    x = _encoded(layers["inputs"]["hidden"])
    w = _encoded(layers["weights"]["weight"])
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    _assert_norm_close(layers["outputs"]["rms_norm"], want, NORM_ATOL * w.abs().max(), "rms_norm")
