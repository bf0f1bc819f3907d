"""Vocabulary-wide cross-entropy and the response-token loss against float64, at V = 49,152.

One party run (:func:`losses`) computes every output; see :mod:`.common` for the setup. The
logits imitate SmolLM2-135M-Instruct's (measured on chat text: per-position mean -11 .. 21,
standard deviation 2.6 .. 4.5, the max 3.9 .. 10.5 standard deviations above the mean, overall
range [-32, 38]), plus the hard cases: a flat row (the sum of exponentials is V), a target at
the very bottom (loss ~70), tied peaks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

from secfwt.mpc import nonlinear as nl
from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role
from tests.mpc.nonlinear.common import _encoded, _max_err, _one_thread, _run, _share

log = logging.getLogger(__name__)

# --- Tolerances (max absolute error); measured values (3 runs) in brackets -----------------
#: per-token cross-entropy at V = 49,152 [1.4e-4, 1.7e-4, 1.4e-4]; the target is < 1e-2 on the
#: loss. With softmax's exp clamp (-15.5) the dropped tail alone cost up to 1.5e-3 here, and
#: rounding every term to 2^-16 before the sum up to 7e-4.
TOKEN_ATOL = 1e-3
#: the per-sequence mean over response tokens, secret weights [1.9e-4, 5.7e-5, 2.0e-5], public
#: weights [9.5e-5, 2.5e-4, 2.1e-4].
LOSS_ATOL = 1e-3
#: cross-entropy over 3 classes (SecureOps.log_softmax_nll) [2.8e-4, 2.3e-4, 2.7e-4].
CLS_ATOL = 1e-3
#: cross-entropy over 2 classes, softplus of the margin, secret / public labels [1.3e-4 / 1.4e-4,
#: 1.7e-4 / 1.4e-4, 1.4e-4 / 1.5e-4]; the log-sum-exp path on the same rows: 3.6e-4.
CLS2_ATOL = 1e-3
#: log on [1/2, 2^17] [1.0e-4, 8.4e-5, 8.6e-5]: u's 2^-16 resolution at u = 1/4 alone is 6e-5.
LOG_ATOL = 2e-4

N, T, V = 2, 4, 49_152
C = 3  # a classification head's cross-entropy, the path SecureOps.log_softmax_nll takes


def _lm_logits(g: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(N * T):
        mean = float(torch.empty(()).uniform_(-11, 21, generator=g))
        std = float(torch.empty(()).uniform_(2.6, 4.5, generator=g))
        row = mean + std * torch.randn(V, generator=g)
        peaks = torch.randint(0, V, (4,), generator=g)
        row[peaks] = mean + std * torch.empty(4).uniform_(3.9, 10.5, generator=g)
        rows.append(row.clamp(-32, 40))
    z = torch.stack(rows).reshape(N, T, V)
    z[0, 1] = torch.rand(V, generator=g) * 0.01  # flat: sum of exp(z - max) ~ V
    z[1, 2, 7] = z[1, 2, 11] = z[1, 2].max() + 1.0  # two tied peaks
    return z


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2026)
    z = _lm_logits(g)
    top = z.topk(5, dim=-1).indices  # (N, T, 5)
    targets = torch.where(  # half the targets among the 5 likeliest tokens, half anywhere
        torch.arange(N * T).reshape(N, T) % 2 == 0,
        top.gather(-1, torch.randint(0, 5, (N, T, 1), generator=g)).squeeze(-1),
        torch.randint(0, V, (N, T), generator=g),
    )
    targets[0, 0] = int(z[0, 0].argmax())  # a confident, right prediction
    targets[1, 3] = int(z[1, 3].argmin())  # the worst token: loss ~ 70
    response = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    cls_logits = torch.randn(16, C, generator=g) * 6
    # two classes: margins over softplus's pieces, its cuts at +-10.95 and far beyond (not as far
    # as 2^14, where the float32 of get_plain_text alone rounds by 2^-10)
    margins = torch.cat(
        [
            torch.randn(1000, generator=g) * 6,
            torch.linspace(-12, 12, 961),
            torch.tensor([-1000.0, -100.0, -10.96, -10.94, 0.0, 10.94, 10.96, 100.0, 1000.0]),
        ]
    )
    base = torch.randn(margins.numel(), generator=g) * 3
    cls2_logits = torch.stack([base, base + margins], dim=-1)
    return {
        "logits": z,
        "onehot": torch.nn.functional.one_hot(targets, V).float(),
        "response": response,
        "cls_logits": cls_logits,
        "cls_onehot": torch.nn.functional.one_hot(
            torch.randint(0, C, (16,), generator=g), C
        ).float(),
        "cls2_logits": cls2_logits,
        "cls2_onehot": torch.nn.functional.one_hot(
            torch.randint(0, 2, (cls2_logits.shape[0],), generator=g), 2
        ).float(),
        # log's whole range [1/2, 2^17], log-uniform, plus the region edges
        "log_in": torch.cat(
            [
                torch.exp2(torch.rand(4000, generator=g) * 18 - 1),
                torch.tensor([0.5, 1.0, 1.0 + 2**-16, 4.0, 4.0 + 2**-10, float(V), 2.0**17]),
            ]
        ),
    }


def _losses_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    _one_thread()
    from secfwt.models.ops import SecureOps

    data, shapes = payload["data"], payload["shapes"]
    do = Role.DATA_OWNER.rank
    logits, onehot = _share(data, "logits", shapes, src=do), _share(data, "onehot", shapes, src=do)
    out: dict[str, Any] = {"nll": nl.cross_entropy(logits, onehot).get_plain_text()}
    response = _share(data, "response", shapes, src=do)
    ops = SecureOps()  # the model code's entry point
    out["loss_secret"] = ops.token_nll(logits, onehot, response).get_plain_text()
    out["loss_public"] = ops.token_nll(logits, onehot, payload["public_response"]).get_plain_text()
    cls = _share(data, "cls_logits", shapes, src=do)
    out["cls"] = nl.cross_entropy(cls, _share(data, "cls_onehot", shapes, src=do)).get_plain_text()
    cls2 = _share(data, "cls2_logits", shapes, src=do)
    labels = _share(data, "cls2_onehot", shapes, src=do)
    out["cls2_secret"] = nl.cross_entropy(cls2, labels).get_plain_text()
    out["cls2_public"] = nl.cross_entropy(cls2, payload["public_cls2_onehot"]).get_plain_text()
    log_in = _share(data, "log_in", shapes, src=do)
    out["log"] = nl.log(log_in, lo=0.5, hi=2.0**17).get_plain_text()
    sums = log_in[:-1]  # [1/2, V]: what log_on_class_range(., V) serves
    out["log_on_class_range"] = nl.log_on_class_range(sums, V).get_plain_text()
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.fixture(scope="module")
def losses() -> dict[str, Any]:
    inputs = _inputs()
    outputs = _run(
        _losses_party,
        inputs,
        {},
        public_response=inputs["response"],
        public_cls2_onehot=inputs["cls2_onehot"],
    )
    return {"inputs": inputs, "outputs": outputs}


def _reference_nll(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    z = _encoded(logits)
    return torch.logsumexp(z, dim=-1) - (z * onehot.double()).sum(-1)


@pytest.mark.multiprocess
def test_vocabulary_cross_entropy_per_token(losses: dict[str, Any]) -> None:
    want = _reference_nll(losses["inputs"]["logits"], losses["inputs"]["onehot"])
    errors = (losses["outputs"]["nll"].double() - want).flatten()
    log.info("per-token losses %s, errors %s", want.flatten().tolist(), errors.tolist())
    assert _max_err(losses["outputs"]["nll"], want, "token cross-entropy V=49152") < TOKEN_ATOL


@pytest.mark.multiprocess
@pytest.mark.parametrize("weights", ["secret", "public"])
def test_response_token_loss(losses: dict[str, Any], weights: str) -> None:
    nll = _reference_nll(losses["inputs"]["logits"], losses["inputs"]["onehot"])
    w = losses["inputs"]["response"].double()
    want = (nll * w).sum(-1) / w.sum(-1)
    got = losses["outputs"][f"loss_{weights}"]
    assert _max_err(got, want, f"response-token loss, {weights} weights") < LOSS_ATOL


@pytest.mark.multiprocess
def test_classification_cross_entropy(losses: dict[str, Any]) -> None:
    want = _reference_nll(losses["inputs"]["cls_logits"], losses["inputs"]["cls_onehot"])
    assert _max_err(losses["outputs"]["cls"], want, "cross-entropy C=3") < CLS_ATOL


@pytest.mark.multiprocess
@pytest.mark.parametrize("labels", ["secret", "public"])
def test_two_class_cross_entropy(losses: dict[str, Any], labels: str) -> None:
    want = _reference_nll(losses["inputs"]["cls2_logits"], losses["inputs"]["cls2_onehot"])
    assert float(want.max()) > 990  # the far margins are in, on the wrong side too
    got = losses["outputs"][f"cls2_{labels}"]
    assert _max_err(got, want, f"cross-entropy C=2, {labels} labels") < CLS2_ATOL


@pytest.mark.multiprocess
def test_log_over_its_range(losses: dict[str, Any]) -> None:
    x = _encoded(losses["inputs"]["log_in"])
    assert _max_err(losses["outputs"]["log"], torch.log(x), "log on [1/2, 2^17]") < LOG_ATOL
    assert math.isclose(float(losses["outputs"]["log"][-2]), math.log(V), abs_tol=LOG_ATOL)
    in_class_range = x[:-1] <= V
    got = losses["outputs"]["log_on_class_range"][in_class_range]
    assert _max_err(got, torch.log(x[:-1][in_class_range]), "log_on_class_range V") < LOG_ATOL
