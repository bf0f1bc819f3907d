"""Element-wise functions against plaintext torch: exp, signs, activations, reciprocals, errors.

One party run (:func:`elementwise`) computes every output; see :mod:`.common` for the setup.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from secfwt.errors import FixedPointRangeError
from secfwt.mpc import nonlinear as nl
from secfwt.mpc.launcher import PartyContext
from secfwt.mpc.nonlinear import compare, fixed_point, inverse, normalisation
from secfwt.roles import Role
from tests.mpc.nonlinear.common import (
    _elementwise_inputs,
    _encoded,
    _max_err,
    _one_thread,
    _run,
    _share,
)

log = logging.getLogger(__name__)

# --- Tolerances (max absolute error unless said); measured values (2 runs) in brackets ---------
#: exp on [-20, 0], -1e4 and -300: fixed-point noise amplified 4x by the squarings [2.0e-4].
EXP_ATOL = 5e-4
#: erf GELU and tanh GELU on randn*5 plus +-50, +-1000 [1.6e-4, 1.3e-4]; the target is <= 2e-3.
GELU_ATOL = 1e-3
#: SiLU on the same inputs [5.7e-4, at the cut 9.8]; the target is ~2e-3.
SILU_ATOL = 2e-3
#: reciprocal / inv_sqrt: |error| <= RTOL * |1/x| + ATOL over [2^-10, 2^20] [relative 6.3e-5 and
#: 5.9e-5 where the result is >= 1/4]; the output's own resolution is 2^-16 absolute, so small
#: results are held to ATOL.
RECIPROCAL_RTOL = 1e-4
RECIPROCAL_ATOL = 2 * 2.0**-16


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
        compare._negative_bits(signs.share), precision=0
    ).get_plain_text()
    out["greater_exact"] = crypten.mpc.MPCTensor.from_shares(
        compare._greater_than_exact(signs.share, [0, round(1000.5 * 2**nl.FRAC_BITS), -(2**62)]),
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


@pytest.fixture(scope="module")
def elementwise() -> dict[str, Any]:
    inputs = _elementwise_inputs()
    return {"inputs": inputs, "outputs": _run(_elementwise_party, inputs, {})}


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


def test_range_checks() -> None:
    with pytest.raises(ValueError):
        inverse._check_range(-1.0, 1.0, frac_bits=16)
    with pytest.raises(FixedPointRangeError):
        inverse._check_range(2.0**-20, 1.0, frac_bits=16)
    with pytest.raises(ValueError):
        normalisation._check_eps(float("nan"))
    with pytest.raises(ValueError):
        fixed_point._normalise_dim(3, 2)
