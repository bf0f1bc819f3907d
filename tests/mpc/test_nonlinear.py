"""Reference tests of secfwt.mpc.nonlinear: secure results against plaintext torch.

Multi-process tests run the real protocol (model owner rank 0, data owner rank 1, dealer = CrypTen
TTP at rank 2). Start-up costs ~5 s per run, so each run checks several functions: one run for
the element-wise functions, one for softmax and the normalisation layers. The data owner provides
the activations (``src=1``), the model owner the LayerNorm weights (``src=0``). References are
computed on the fixed-point encoding CrypTen actually shares (it truncates toward zero), so the
errors below are those of the protocols, not of the input encoding.

Measured cost (``test_timings``, marked slow): 2 parties + TTP dealer on the 2 cores of the dev VM,
one torch thread per party, one run on an otherwise idle machine; the ratio to CrypTen in the same
run and the bytes are the stable numbers. Bytes are CrypTen's count (elements x 8, sent plus
received) on the data owner. The CrypTen column runs CrypTen's functions on secfwt's Beaver
products (:mod:`secfwt.mpc.beaver`). Bit-sliced comparisons (against CrypTen's A2B adder on
packed lanes) took the bytes per element from 331 / 563 / 501 / 565 / 84 / 2416 to
203 / 298 / 246 / 310 / 69 / 710; the one-opening bit select and the opened-once polynomial
factors took them to the values below.

    function, size               secfwt us/elem  B/elem  rounds | CrypTen (its function)  us/elem  B/elem  rounds
    exp [12,128,128]                       0.82     139      12 | x.exp()                     0.53     128       8
    softmax [12,128,128]                   2.09     218      78 | x.softmax(-1)               7.63    1488     116
    gelu (erf) [128,1536]                  0.95     166      11 | tanh GELU via x.tanh()      2.75     848      26
    silu [128,1536]                        1.05     198      12 | x * x.sigmoid()             2.54     784      24
    layer_norm [128,768]                   1.10      69      19 | (x-mu)*(var+eps).inv_sqrt() 1.06      32      19
    reciprocal [1536] on [1, 512]         37.07     710      16 | x.reciprocal()            132.91    1104      38

CrypTen's functions are not accurate on these ranges (NOTES.md): its exp is garbage below -256,
its softmax from length ~256 or with a -1e4 mask, its reciprocal above ~300, its inv_sqrt (so its
LayerNorm) for variances above ~500, and it has no usable erf. secfwt's exp pays ~1.5x CrypTen's
time and 1.1x its bytes for range safety (one comparison); everything else is cheaper or on par. The reciprocal row
is latency-bound (16 vs 38 rounds for 1536 elements).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secfwt.mpc.provider import Provider
from secfwt.mpc import nonlinear as nl
from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.roles import Role

log = logging.getLogger(__name__)

# --- Tolerances (max absolute error unless said); measured values (2 runs) in brackets ---------
#: exp on [-20, 0], -1e4 and -300: fixed-point noise amplified 4x by the squarings [2.0e-4].
EXP_ATOL = 5e-4
#: erf GELU and tanh GELU on randn*5 plus +-50, +-1000 [1.6e-4, 1.3e-4]; the brief asks <= 2e-3.
GELU_ATOL = 1e-3
#: SiLU on the same inputs [5.7e-4, at the cut 9.8]; the brief asks ~2e-3.
SILU_ATOL = 2e-3
#: reciprocal / inv_sqrt: |error| <= RTOL * |1/x| + ATOL over [2^-10, 2^20] [relative 6.3e-5 and
#: 5.9e-5 where the result is >= 1/4]; the output's own resolution is 2^-16 absolute, so small
#: results are held to ATOL.
RECIPROCAL_RTOL = 1e-4
RECIPROCAL_ATOL = 2 * 2.0**-16
#: softmax vs torch.softmax: scores in [-30, 30] at lengths 128 and 512, no / public / secret
#: padding mask [9.4e-5], additive -1e4 mask [4.9e-5], scores in [-1000, 1000] [5.6e-5];
#: the brief asks <= 1e-3.
SOFTMAX_ATOL = 1e-3
#: |row sum - 1| of softmax outputs [2.6e-4].
SOFTMAX_SUM_ATOL = 1e-3
#: LayerNorm / RMSNorm outputs, row variances 1e-4 .. 1e5 with outlier channels of +-50 in a third
#: of the rows, eps 1e-12: per row NORM_ATOL + 2^-16 / std(row) (the input's own resolution, which
#: the mean's rounding carries into the output) [max 1.1e-3 at variance 1e-4, at most 0.35 of the
#: per-row tolerance; RMSNorm 3.8e-4].
NORM_ATOL = 2e-3

TIMEOUT_S = 600.0


def _encoded(t: torch.Tensor) -> torch.Tensor:
    """The value CrypTen shares for ``t``: ``(2^16 t).long()`` truncates toward zero."""
    return torch.trunc(t.double() * 2**nl.FRAC_BITS) / 2**nl.FRAC_BITS


# ================================================================================================
# Inputs
# ================================================================================================


def _elementwise_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    outliers = torch.tensor([50.0, -50.0, 1000.0, -1000.0, 4.0, -4.0, 3.97, -3.97, 9.8, -9.8, 0.0])
    return {
        # x <= 0: softmax range, the cut at -15.5, and values CrypTen's exp turns into garbage
        "exp": torch.cat(
            [
                -torch.rand(30000, generator=g) * 20,
                -torch.rand(10000, generator=g),
                torch.tensor([-1e4, -300.0, -15.6, -15.4, 0.0]),
            ]
        ),
        "act": torch.cat([torch.randn(30000, generator=g) * 5, outliers]),
        # log-uniform over the full stated range [2^-10, 2^20]
        "pos": torch.exp2(torch.rand(20000, generator=g) * 30 - 10),
        # signs: the whole comparison range, its edges and the ambiguous band around 0
        "signs": torch.cat(
            [
                (torch.rand(3000, generator=g) * 2 - 1) * (nl.CMP_RANGE - 1),
                torch.tensor([nl.CMP_RANGE - 2**-5, -nl.CMP_RANGE + 2**-5, nl.CMP_RESOLUTION]),
                torch.tensor([-nl.CMP_RESOLUTION, -(2.0**-16), 0.0, 2.0**-16, -1.0, 1.0]),
                torch.randn(3000, generator=g) * 0.1,
            ]
        ).reshape(3, 2003),
    }


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


# ================================================================================================
# Party functions (run in spawned processes)
# ================================================================================================


def _one_thread() -> None:
    """Three party processes share 2 cores: torch's default 2 intra-op threads per process then
    wait at every op's barrier (a 1.6 MB copy took 8 ms instead of 0.1 ms under load), so each
    party computes on one thread. (The launcher is the right place for this; see the report.)"""
    torch.set_num_threads(1)


def _share(
    tensors: dict[str, torch.Tensor], name: str, shapes: dict[str, tuple[int, ...]], src: int
) -> Any:
    """Share ``tensors[name]`` from party ``src``; the other party only knows the shape."""
    from secfwt.crypten_compat import crypten

    value = tensors.get(name)
    return crypten.cryptensor(value if value is not None else torch.zeros(shapes[name]), src=src)


def _elementwise_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    _one_thread()
    from secfwt.crypten_compat import crypten
    from secfwt.errors import FixedPointRangeError

    data, shapes = payload["data"], payload["shapes"]
    out: dict[str, Any] = {}
    act = _share(data, "act", shapes, src=1)
    pos = _share(data, "pos", shapes, src=1)
    out["exp"] = nl.exp(_share(data, "exp", shapes, src=1)).get_plain_text()
    # the comparison itself, on an odd-sized 2-D tensor (bit planes are padded to 64 elements)
    signs = _share(data, "signs", shapes, src=1)
    out["negative_bits"] = crypten.mpc.MPCTensor.from_shares(
        nl._negative_bits(signs.share), precision=0
    ).get_plain_text()
    out["greater_exact"] = crypten.mpc.MPCTensor.from_shares(
        nl._greater_than_exact(signs.share, [0, round(1000.5 * 2**nl.FRAC_BITS), -(2**62)]),
        precision=0,
    ).get_plain_text()
    out["gelu"] = nl.gelu(act).get_plain_text()
    out["gelu_tanh"] = nl.gelu_tanh(act).get_plain_text()
    out["silu"] = nl.silu(act).get_plain_text()
    out["reciprocal"] = nl.reciprocal(pos, lo=2.0**-10, hi=2.0**20).get_plain_text()
    out["inv_sqrt"] = nl.inv_sqrt(pos, lo=2.0**-10, hi=2.0**20).get_plain_text()
    # invalid options must raise clear errors, not compute garbage
    raised: list[str | None] = []
    for call in (
        lambda: nl.reciprocal(pos, lo=0.0, hi=1.0),
        lambda: nl.inv_sqrt(pos, lo=2.0, hi=1.0),
        lambda: nl.reciprocal(pos, lo=1.0, hi=2.0**40),
        lambda: nl.exp(crypten.cryptensor(torch.zeros(2), src=1, precision=20)),
        lambda: nl.softmax(act[:4], mask=torch.tensor([1.0, 0.5, 1.0, 1.0])),
        lambda: nl.softmax(act[:4], mask=torch.ones(5)),
        lambda: nl.gelu(torch.zeros(3)),
    ):
        try:
            call()
            raised.append(None)
        except (TypeError, ValueError, FixedPointRangeError) as exc:
            raised.append(type(exc).__name__)
    out["raised"] = raised
    return out if ctx.role is Role.DATA_OWNER else None


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


def _run(
    target: Any, data: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], **extra: Any
) -> dict[str, Any]:
    shapes = {k: tuple(v.shape) for k, v in {**data, **weights}.items()}
    payloads = {
        Role.DATA_OWNER: {"data": data, "weights": {}, "shapes": shapes, **extra},
        Role.MODEL_OWNER: {"data": {}, "weights": weights, "shapes": shapes, **extra},
    }
    results = run_parties(target, payloads=payloads, provider=Provider.TTP, timeout_s=TIMEOUT_S)
    return results[Role.DATA_OWNER].value


@pytest.fixture(scope="module")
def elementwise() -> dict[str, Any]:
    inputs = _elementwise_inputs()
    return {"inputs": inputs, "outputs": _run(_elementwise_party, inputs, {})}


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


def _max_err(got: torch.Tensor, ref: torch.Tensor, label: str) -> float:
    err = float((got.double() - ref.double()).abs().max())
    log.info("%s: max abs error %.2e", label, err)
    return err


# ================================================================================================
# Multi-process reference tests
# ================================================================================================


@pytest.mark.multiprocess
def test_exp_matches_torch_down_to_minus_infinity(elementwise: dict[str, Any]) -> None:
    x = _encoded(elementwise["inputs"]["exp"])
    got = elementwise["outputs"]["exp"]
    assert _max_err(got, torch.exp(x), "exp") <= EXP_ATOL
    assert float(got[x < -16].abs().max()) == 0.0  # exactly zero far below, never garbage


@pytest.mark.multiprocess
def test_negative_bits_are_exact_in_range(elementwise: dict[str, Any]) -> None:
    x = _encoded(elementwise["inputs"]["signs"])
    got = elementwise["outputs"]["negative_bits"]
    decided = x.abs() >= nl.CMP_RESOLUTION
    assert bool(((got == 0) | (got == 1)).all())  # bits, also in the undecided band
    assert torch.equal(got[decided], (x[decided] < 0).float())
    exact = elementwise["outputs"]["greater_exact"]  # every value, no resolution or range limit
    for i, t in enumerate([0.0, 1000.5, -(2.0**46)]):
        assert torch.equal(exact[i], (x > t).float()), t


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("name", "reference", "atol"),
    [
        ("gelu", lambda x: F.gelu(x), GELU_ATOL),
        ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), GELU_ATOL),
        ("silu", F.silu, SILU_ATOL),
    ],
)
def test_activation_matches_torch_on_any_range(
    elementwise: dict[str, Any], name: str, reference: Any, atol: float
) -> None:
    x = _encoded(elementwise["inputs"]["act"])
    got = elementwise["outputs"][name]
    err = (got.double() - reference(x)).abs()
    log.info("%s max abs error %.2e at x=%.3f", name, float(err.max()), float(x[err.argmax()]))
    assert float(err.max()) <= atol
    assert float(err[x.abs() >= 50].max()) <= atol  # outliers +-50, +-1000


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("name", "reference"), [("reciprocal", torch.reciprocal), ("inv_sqrt", torch.rsqrt)]
)
def test_reciprocals_over_full_stated_range(
    elementwise: dict[str, Any], name: str, reference: Any
) -> None:
    x = _encoded(elementwise["inputs"]["pos"])
    want = reference(x)
    err = (elementwise["outputs"][name].double() - want).abs()
    excess = err - (RECIPROCAL_RTOL * want + RECIPROCAL_ATOL)
    log.info(
        "%s max rel error (outputs >= 2^-2) %.2e, max abs error %.2e",
        name,
        float((err / want)[want >= 0.25].max()),
        float(err.max()),
    )
    assert float(excess.max()) <= 0.0


@pytest.mark.multiprocess
def test_invalid_options_raise(elementwise: dict[str, Any]) -> None:
    assert elementwise["outputs"]["raised"] == [
        "ValueError",
        "ValueError",
        "FixedPointRangeError",
        "FixedPointRangeError",
        "ValueError",
        "ValueError",
        "TypeError",
    ]


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


def _protocol_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The one-opening select and the opened-once products against their unfused forms."""
    _one_thread()
    from secfwt.crypten_compat import crypten

    data, shapes = payload["data"], payload["shapes"]
    signs, values = (_share(data, k, shapes, src=1).share for k in ("signs", "values"))
    words = nl._negative_words(signs, rows=3)  # rows of 2003: each padded to whole words
    picked = torch.cat([nl._select(words, values), nl._select(nl._not(words[:1] ^ words[2:]), values[:1])])
    reference = nl._mul(nl._negative_bits(signs), values)  # B2A, then a Beaver product
    ring = [values[0], values[1], values[2]]
    once = nl._OpenedOnce(values[0].size(), [0, 1, 2], [(0, 0), (0, 1), (2, 1)])
    once.open({0: ring[0], 1: ring[1]})
    once.open({1: ring[1], 2: ring[2]})  # 1 is not opened again
    products = torch.stack([once.product(i, j) for i, j in ((0, 0), (0, 1), (2, 1))])
    expected = torch.stack([nl._mul(ring[i], ring[j]) for i, j in ((0, 0), (0, 1), (2, 1))])
    reveal = crypten.mpc.MPCTensor.from_shares
    out = {
        "picked": reveal(picked, precision=nl.FRAC_BITS).get_plain_text(),
        "picked_minus_unfused": reveal(picked[:3] - reference, precision=0).get_plain_text(),
        "products_minus_beaver": reveal(products - expected, precision=0).get_plain_text(),
    }
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.mark.multiprocess
@pytest.mark.parametrize("provider", [Provider.TTP, Provider.TFP])
def test_fused_select_and_opened_once_products_equal_their_unfused_forms(provider: Provider) -> None:
    """With the dealer, ``_select`` and ``_OpenedOnce`` use secfwt's own correlations
    (``secfwt_bit_triple``, ``secfwt_mask_products``); without it (TFP) they fall back to B2A and
    Beaver products. Both give exactly the ring values of the unfused protocols."""
    data = _elementwise_inputs()
    data = {"signs": data["signs"], "values": data["act"][: data["signs"].numel()].reshape(3, 2003)}
    shapes = {k: tuple(v.shape) for k, v in data.items()}
    payloads = {Role.DATA_OWNER: {"data": data, "shapes": shapes}, Role.MODEL_OWNER: {"data": {}, "shapes": shapes}}
    out = run_parties(_protocol_party, payloads=payloads, provider=provider, timeout_s=TIMEOUT_S)[Role.DATA_OWNER].value
    x, v = _encoded(data["signs"]), _encoded(data["values"])
    assert float(out["picked_minus_unfused"].abs().max()) == 0.0  # bit-for-bit the same ring values
    assert float(out["products_minus_beaver"].abs().max()) == 0.0
    decided = x.abs() >= nl.CMP_RESOLUTION
    assert torch.equal(out["picked"][:3][decided], torch.where(x < 0, v, 0.0)[decided])
    both = decided[0] & decided[2]
    between = (x[0] >= 0) == (x[2] >= 0)  # NOT (neg0 XOR neg2)
    assert torch.equal(out["picked"][3][both], torch.where(between, v[0], 0.0)[both])


# ================================================================================================
# Plaintext tests of the building blocks (no processes)
# ================================================================================================


def _unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of one row of packed words."""
    return nl._unpack_rows(words.reshape(1, -1), torch.Size([n]))


def test_bit_sliced_carry_gives_exact_signs_in_range() -> None:
    """Simulate the two parties' shares and the carry tree of _negative_bits in plaintext."""
    g = torch.Generator().manual_seed(3)
    limit = int(nl.CMP_RANGE * 2**nl.FRAC_BITS) - 2**12
    x = torch.cat([torch.randint(-limit, limit, (100000,), generator=g), torch.arange(-5000, 5001)])
    mask = torch.randint(-(2**63), 2**63 - 1, x.shape, generator=g, dtype=torch.long)
    planes = [nl._bit_planes(share >> 11, bits=21) for share in (x + mask, -mask)]
    a, b = planes
    anded: list[int] = []

    def and_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        anded.append(x.shape[0])
        return x & y

    carry = nl._carry_out(a[:-1] & b[:-1], a[:-1] ^ b[:-1], and_)
    assert sum(anded) == nl._carry_and_planes(20) == 33  # the triples _negative_bits fetches
    assert len(anded) == 5  # levels (rounds)
    signs = _unpack(a[-1] ^ b[-1] ^ carry, x.numel())
    decided = x.abs() >= nl.CMP_RESOLUTION * 2**nl.FRAC_BITS
    assert torch.equal(signs[decided], (x[decided] < 0).long())
    # the full 64-bit width: the exact sign of the ring sum, for values of any magnitude
    wide = torch.cat([x << 20, torch.tensor([2**63 - 1, -(2**63), 0, -1, 1])])
    wide_mask = torch.randint(-(2**63), 2**63 - 1, wide.shape, generator=g, dtype=torch.long)
    a, b = (nl._bit_planes(share, bits=64) for share in (wide + wide_mask, -wide_mask))
    carry64 = nl._carry_out(a[:-1] & b[:-1], a[:-1] ^ b[:-1], torch.bitwise_and)
    assert torch.equal(_unpack(a[-1] ^ b[-1] ^ carry64, wide.numel()), (wide < 0).long())
    assert nl._carry_and_planes(63) == 118
    # the tree is the carry of the 20-bit sum for any inputs, not only in range
    low = [(share >> 11) & (2**20 - 1) for share in (x + mask, -mask)]
    expected = ((low[0] + low[1]) >> 20) & 1
    assert torch.equal(_unpack(carry, x.numel()), expected)


def test_bit_planes_round_trip() -> None:
    g = torch.Generator().manual_seed(4)
    u = torch.randint(0, 2**21, (3, 67), generator=g)  # not a multiple of 64 elements
    planes = nl._bit_planes(u, bits=21)
    assert planes.shape == (21, 4)
    for j in (0, 7, 20):
        assert torch.equal(_unpack(planes[j], u.numel()), (u.reshape(-1) >> j) & 1)
    full = torch.cat([u.reshape(-1), torch.tensor([-1, -(2**63), 2**63 - 1])])  # all 64 bits
    planes = nl._bit_planes(full, bits=64)
    for j in (0, 33, 62, 63):
        assert torch.equal(_unpack(planes[j], full.numel()), (full >> j) & 1)
    bits = u.reshape(-1) & 1
    assert torch.equal(_unpack(nl._pack_rows(bits, 1), bits.numel()), bits)
    # rows padded apart: row r of plane j is bit j of u[r], and packing rows matches
    rows = nl._bit_planes(u, bits=21, rows=3)
    assert rows.shape == (21, 3 * 2)
    for j in (0, 20):
        assert torch.equal(nl._unpack_rows(rows[j].reshape(3, 2), u.shape), (u >> j) & 1)
        assert torch.equal(nl._pack_rows((u >> j) & 1, 3), rows[j].reshape(3, 2))


@pytest.mark.parametrize(
    ("coefficients", "half_square", "function", "fit_tol"),
    [
        (nl._gelu_coefficients, 8, lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), 1e-4),
        (nl._gelu_tanh_coefficients, 8, lambda x: F.gelu(x, approximate="tanh"), 1e-4),
        (nl._silu_coefficients, 48, F.silu, 5e-4),
    ],
)
def test_even_part_fits(coefficients: Any, half_square: int, function: Any, fit_tol: float) -> None:
    cut = math.sqrt(2 * half_square)
    x = torch.linspace(-cut, cut, 20001, dtype=torch.float64)
    series = np.polynomial.chebyshev.chebval((x**2 / half_square - 1).numpy(), coefficients())
    assert float((torch.from_numpy(series) + x / 2 - function(x)).abs().max()) <= fit_tol


def test_exp_fit() -> None:
    x = torch.linspace(-15.5, 0.5, 20001, dtype=torch.float64)
    base = np.polynomial.chebyshev.chebval((x / 8 + 0.9375).numpy(), nl._exp_coefficients())
    approx = torch.from_numpy(base) ** 4
    assert float((approx - torch.exp(x)).abs().max()) <= 1e-5  # measured 6.0e-6
    assert float((approx / torch.exp(x) - 1).abs().max()) <= 2e-4  # 1.6e-4 at -15.5, 1e-5 above -4


def test_range_checks() -> None:
    with pytest.raises(ValueError):
        nl._check_range(-1.0, 1.0, frac_bits=16)
    with pytest.raises(nl.FixedPointRangeError):
        nl._check_range(2.0**-20, 1.0, frac_bits=16)
    with pytest.raises(ValueError):
        nl._check_eps(float("nan"))
    with pytest.raises(ValueError):
        nl._normalise_dim(3, 2)


# ================================================================================================
# Timings (slow): secfwt vs CrypTen's own functions, same run, realistic sizes
# ================================================================================================


def _timing_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    _one_thread()
    from secfwt.crypten_compat import crypten
    from secfwt.mpc import session

    torch.manual_seed(0)
    scores = crypten.cryptensor(torch.rand(12, 128, 128) * 60 - 30, src=1)
    neg = crypten.cryptensor(-torch.rand(12, 128, 128) * 20, src=1)
    act = crypten.cryptensor(torch.randn(128, 1536) * 3, src=1)
    hidden = crypten.cryptensor(torch.randn(128, 768) * 2, src=1)
    denominators = crypten.cryptensor(1 + torch.rand(1536) * 500, src=1)
    w, b = torch.ones(768), torch.zeros(768)

    def crypten_gelu_tanh(x: Any) -> Any:
        return x * 0.5 * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)).tanh())

    def crypten_layer_norm(x: Any) -> Any:
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        return xc * (xc.square().mean(-1, keepdim=True) + 1e-12).inv_sqrt() * w + b

    cases = {
        "exp [12,128,128]": (neg, nl.exp, lambda x: x.exp()),
        "softmax [12,128,128]": (scores, nl.softmax, lambda x: x.softmax(-1)),
        "gelu [128,1536]": (act, nl.gelu, crypten_gelu_tanh),
        "silu [128,1536]": (act, nl.silu, lambda x: x * x.sigmoid()),
        "layer_norm [128,768]": (
            hidden,
            lambda x: nl.layer_norm(x, weight=w, bias=b, eps=1e-12),
            crypten_layer_norm,
        ),
        "reciprocal [1536]": (
            denominators,
            lambda x: nl.reciprocal(x, lo=1.0, hi=512.0),
            lambda x: x.reciprocal(),
        ),
    }
    out = {}
    for name, (x, ours, theirs) in cases.items():
        best = [math.inf, math.inf]
        sent, rounds = [0, 0], [0, 0]
        for _ in range(payload["repeats"]):
            for k, fn in enumerate((ours, theirs)):
                session.reset_communication_stats()
                t0 = time.perf_counter()
                fn(x)
                best[k] = min(best[k], time.perf_counter() - t0)
                stats = session.communication_stats()
                sent[k], rounds[k] = stats["bytes"], stats["rounds"]
        n = x.nelement()
        out[name] = (*(round(t / n * 1e6, 2) for t in best), *(round(b / n) for b in sent), *rounds)
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.mark.slow
@pytest.mark.multiprocess
def test_timings() -> None:
    payloads = {role: {"repeats": 2} for role in (Role.MODEL_OWNER, Role.DATA_OWNER)}
    results = run_parties(
        _timing_party, payloads=payloads, provider=Provider.TTP, timeout_s=TIMEOUT_S
    )
    for name, (ours, theirs, ours_bytes, theirs_bytes, ours_rounds, theirs_rounds) in results[
        Role.DATA_OWNER
    ].value.items():
        log.warning(
            "%-22s secfwt %6.2f us/elem %5d B/elem %4d rounds | "
            "CrypTen %6.2f us/elem %5d B/elem %4d rounds",
            name,
            ours,
            ours_bytes,
            ours_rounds,
            theirs,
            theirs_bytes,
            theirs_rounds,
        )
