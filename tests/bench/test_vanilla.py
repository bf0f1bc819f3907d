"""The vanilla CrypTen baseline runs without secfwt's speed-ups (SECFWT_RING_MATMUL=0 in every
process)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch


def test_the_engine_switch_keeps_crypten_attribute_access_as_shipped():
    """The engine's unwrapped ``__getattribute__`` follows SECFWT_RING_MATMUL, like the rest."""
    code = (
        "import sys\n"
        "from secfwt.mpc.engine import install, ring_matmul_enabled\n"
        "install()\n"
        "from crypten.cryptensor import CrypTensor\n"
        "wrapped = getattr(CrypTensor.__dict__['__getattribute__'], '__wrapped__', None) "
        "is not None\n"
        "sys.exit(0 if wrapped != ring_matmul_enabled() else 1)\n"
    )
    for value in ("1", "0"):
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            timeout=120,
            env={**os.environ, "SECFWT_RING_MATMUL": value},
        )


def test_vanilla_engine_env_switches_ring_matmul_off_and_back():
    from secfwt.bench.vanilla import vanilla_engine_env

    before = os.environ.get("SECFWT_RING_MATMUL")
    with vanilla_engine_env():
        assert os.environ["SECFWT_RING_MATMUL"] == "0"
        code = "from secfwt.mpc import engine as c; print(c.ring_matmul_enabled())"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
        )
        assert out.stdout.strip() == "False"
    assert os.environ.get("SECFWT_RING_MATMUL") == before


def _engine_state(ctx: Any, payload: Any) -> dict[str, bool]:
    from crypten.cryptensor import CrypTensor

    from secfwt.mpc import engine, keystream

    return {
        "ring_matmul": engine.ring_matmul_enabled(),
        "keystream": keystream.installed(),
        "validated_getattribute": hasattr(CrypTensor.__dict__["__getattribute__"], "__wrapped__"),
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_the_vanilla_environment_reaches_party_processes(start, monkeypatch):
    """Parties started under ``vanilla_engine_env`` run CrypTen as shipped, and the next ones
    secfwt's engine again, however they start: a party forked from the fork server imported
    the engine in the server, before the launcher set the variable."""
    from secfwt.bench.vanilla import vanilla_engine_env
    from secfwt.mpc.launcher import START_ENV, run_parties
    from secfwt.mpc.provider import Provider
    from secfwt.roles import Role

    monkeypatch.setenv(START_ENV, start)

    def states() -> list[dict[str, bool]]:
        res = run_parties(_engine_state, payloads={}, provider=Provider.TTP, timeout_s=120)
        return [res[r].value for r in (Role.MODEL_OWNER, Role.DATA_OWNER)]

    engine_on = {"ring_matmul": True, "keystream": True, "validated_getattribute": False}
    assert states() == [engine_on] * 2  # the fork server starts here, in the default setting
    with vanilla_engine_env():
        shipped = {"ring_matmul": False, "keystream": False, "validated_getattribute": True}
        assert states() == [shipped] * 2
    assert states() == [engine_on] * 2


#: Max absolute error of a gradient against float64 autograd [measured, the largest over all
#: parameters: 1.7e-3 - 2.1e-3 with the [CLS] head, 1.1e-3 with mean pooling; gradients up to
#: 0.55]: CrypTen's 16 fractional bits through its softmax, tanh, reciprocal and square-root
#: approximations, forward and backward.
GRAD_ATOL = 1e-2
T = 6


def _loss(params: dict[str, Any], x: Any, onehot: Any, spec: Any, **how: bool) -> Any:
    """The backprop baseline's loss (its forward: ``vanilla.classifier_logits``)."""
    from secfwt.bench import vanilla

    logits = vanilla.classifier_logits(x, params, spec, **how)
    if isinstance(logits, torch.Tensor):
        return -(onehot * logits.log_softmax(-1)).sum(-1).mean()
    return logits.cross_entropy(onehot)


def _trained(spec: Any, *, mean: bool) -> list[str]:
    """The parameters the loss reads: every layer's, the classifier's, with the [CLS] head the
    pooler's."""
    keep = ("encoder.layer",) if mean else ("encoder.layer", "pooler")
    return [
        n for n, _ in spec.param_shapes if n.startswith("classifier") or any(k in n for k in keep)
    ]


def _grad_party(ctx: Any, payload: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    from secfwt.crypten_compat import crypten
    from secfwt.roles import Role

    spec, state = payload["spec"], payload.get("state")
    shapes = dict(spec.param_shapes)
    params = {
        n: crypten.cryptensor(
            state[n] if state else torch.zeros(shapes[n]),
            src=Role.MODEL_OWNER.rank,
            requires_grad=True,
        )
        for n in _trained(spec, mean=payload["mean"])
    }
    x = crypten.cryptensor(
        payload.get("x", torch.zeros(2, T, spec.hidden_size)), src=Role.DATA_OWNER.rank
    )
    onehot = crypten.cryptensor(payload.get("onehot", torch.zeros(2, 2)), src=Role.DATA_OWNER.rank)
    _loss(params, x, onehot, spec, mean=payload["mean"]).backward()
    grads = {n: p.grad.get_plain_text() for n, p in params.items() if p.grad is not None}
    return grads if ctx.role is Role.DATA_OWNER else None


@pytest.mark.multiprocess
@pytest.mark.parametrize("mean", [False, True])
def test_backprop_baseline_gradients_match_torch_autograd(tmp_path, mean) -> None:
    """The MPC backpropagation baseline (``fot-vs-full-ft``'s full fine-tuning step; with
    ``mean`` pooling, time-to-target's), the [CLS] head's last layer at token 0 only: CrypTen
    autograd's gradient of every parameter, the lowest layer's included, equals float64 torch
    autograd of the same loss computed at every position."""
    from secfwt.bench.cases.fot_vs_full_ft import unit_gain
    from secfwt.models.checkpoint import load_checkpoint
    from secfwt.models.spec import Head
    from secfwt.mpc.launcher import run_parties
    from secfwt.mpc.provider import Provider
    from secfwt.roles import Role
    from tests.conftest import save_random_checkpoint

    path = save_random_checkpoint(tmp_path / "ckpt", family="bert", head="sequence_classification")
    spec, state = load_checkpoint(path, head=Head.SEQUENCE_CLASSIFICATION, num_labels=2, seed=0)
    state = unit_gain(spec, state, seed=0)  # BERT's 0.02 leaves lower layers' gradients ~1e-4
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, spec.hidden_size, generator=g)
    onehot = torch.eye(2)
    results = run_parties(
        _grad_party,
        payloads={
            Role.MODEL_OWNER: {"spec": spec, "state": state, "mean": mean},
            Role.DATA_OWNER: {"spec": spec, "x": x, "onehot": onehot, "mean": mean},
        },
        provider=Provider.TTP,
        timeout_s=300,
    )
    got = results[Role.DATA_OWNER].value
    ref = {n: state[n].double().requires_grad_(True) for n in _trained(spec, mean=mean)}
    _loss(ref, x.double(), onehot.double(), spec, mean=mean, every_position=True).backward()
    below = f"{spec.prefix}encoder.layer.0.intermediate.dense.weight"
    assert ref[below].grad.abs().max() > 0.05  # the lowest layer matters to the loss
    assert got.keys() == ref.keys()  # every parameter has a gradient
    for n, p in ref.items():
        assert (got[n].double() - p.grad).abs().max() < GRAD_ATOL, n


def _softmax_party(ctx: Any, payload: dict[str, Any]) -> torch.Tensor:
    from secfwt.bench import vanilla
    from secfwt.crypten_compat import crypten
    from secfwt.roles import Role

    scores = crypten.cryptensor(payload["scores"], src=Role.DATA_OWNER.rank)
    return vanilla.softmax(scores).get_plain_text()


#: Max absolute error of a probability [measured on these rows: 2.2e-4 - 1.2e-3 at T = 128 and
#: 512]: CrypTen's exp by limit approximation (relative error about x^2 / 512 for exp(x)) and
#: 16 fractional bits; and of a row's sum [measured: up to 0.0048; CrypTen's own softmax:
#: 0.095 - 0.098 at T=128, 8e10 at T=512], which a reciprocal off by a factor would move by
#: that factor.
SOFTMAX_ATOL = 5e-3
SUM_ATOL = 0.02


@pytest.mark.multiprocess
@pytest.mark.parametrize("t", [128, 512])
def test_baseline_softmax_is_right_where_crypten_defaults_are_not(t) -> None:
    """The baselines' softmax (CrypTen's with its denominator's reciprocal in range) against
    float64 on rows whose denominators span 1 to T: uniform scores (denominator T), small and
    unit-variance scores, and one dominant score. CrypTen's own softmax gives row sums of
    0.95-1.06 on the small scores at T=128 and about 4e9 on the uniform rows at T=512."""
    from secfwt.mpc.launcher import run_parties
    from secfwt.mpc.provider import Provider
    from secfwt.roles import Role

    g = torch.Generator().manual_seed(3)
    scores = torch.stack(
        [
            torch.zeros(t),  # denominator t
            torch.randn(t, generator=g),  # about t exp(1/2) / exp(max)
            *(torch.randn(t, generator=g) * 0.1 for _ in range(6)),  # close to t
            torch.cat([torch.tensor([12.0]), torch.zeros(t - 1)]),  # close to 1
        ]
    ).reshape(1, 1, 9, t)
    results = run_parties(
        _softmax_party,
        # the model owner passes zeros of the shape: only the source's values are shared
        payloads={
            Role.MODEL_OWNER: {"scores": torch.zeros_like(scores)},
            Role.DATA_OWNER: {"scores": scores},
        },
        provider=Provider.TTP,
        timeout_s=300,
    )
    got = results[Role.DATA_OWNER].value.double()
    err = (got - scores.double().softmax(-1)).abs().max()
    sums = got.sum(-1)
    assert err < SOFTMAX_ATOL, err
    assert (sums - 1).abs().max() < SUM_ATOL, sums
