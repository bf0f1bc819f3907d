"""DP-ZO step: exact reduction to SPSA without privacy, the clipping bound, and MPC vs plaintext."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from secfwt.tuning.spsa import DPZOSettings, SPSASettings, directions, dp_spsa_step, spsa_step

SHAPES = (("w", (3, 4)), ("b", (3,)))


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (10,), generator=g
    )


def _example_losses(x: torch.Tensor, y: torch.Tensor):
    def f(ps: list[dict[str, Any]]) -> torch.Tensor:
        return torch.stack(
            [
                torch.nn.functional.cross_entropy(x @ p["w"].T + p["b"], y, reduction="none")
                for p in ps
            ]
        )

    return f


def _theta() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}


def test_without_noise_clipping_or_sampling_dp_zo_is_spsa():
    x, y = _problem()
    us = directions(seed=1, step=0, shapes=SHAPES, count=4)
    s = SPSASettings(lr=0.3, eps=1e-3, directions=4)
    f = _example_losses(x, y)
    plain, gs, _ = spsa_step(
        lambda ps: list(f(ps).mean(1)), _theta(), us=us, settings=s, cast=lambda t: t.double()
    )
    dp = DPZOSettings(clip=1e9, expected_batch=10.0)
    priv, g, _ = dp_spsa_step(
        f,
        _theta(),
        us=us,
        settings=s,
        dp=dp,
        mask=torch.ones(10, dtype=torch.float64),
        noises=[],
        clip=torch.clamp,
        cast=lambda t: t.double(),
    )
    assert torch.allclose(g, torch.stack(gs), atol=1e-12)
    for n in plain:
        assert torch.allclose(priv[n], plain[n], atol=1e-12)


def test_one_example_moves_the_noiseless_sum_by_at_most_the_clip_norm():
    """The sensitivity the accountant assumes: add one (adversarial) row, the summed q-vector
    changes by <= C in L2, however large that row's loss differences are."""
    x, y = _problem()
    x_big = torch.cat(
        [
            x,
            1e3
            * torch.randn(1, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64),
        ]
    )
    y_big = torch.cat([y, torch.tensor([2])])
    q, clip_norm = 8, 0.7
    us = directions(seed=2, step=0, shapes=SHAPES, count=q)
    s = SPSASettings(lr=0.1, eps=1e-2, directions=q)
    dp = DPZOSettings(clip=clip_norm, expected_batch=1.0)  # g is then the raw clipped sum
    _, g_without, _ = dp_spsa_step(
        _example_losses(x, y),
        _theta(),
        us=us,
        settings=s,
        dp=dp,
        mask=torch.ones(10, dtype=torch.float64),
        noises=[],
        clip=torch.clamp,
        cast=lambda t: t.double(),
    )
    _, g_with, _ = dp_spsa_step(
        _example_losses(x_big, y_big),
        _theta(),
        us=us,
        settings=s,
        dp=dp,
        mask=torch.ones(11, dtype=torch.float64),
        noises=[],
        clip=torch.clamp,
        cast=lambda t: t.double(),
    )
    change = float((g_with - g_without).norm())
    assert change <= clip_norm + 1e-12
    assert change > 0.5 * clip_norm  # the added row is far out, so it is clipped to the bound


def _dp_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    """One DP-ZO step in MPC: parameters from the model owner, data, mask and one noise vector
    from the data owner, the other noise vector from the model owner; returns the revealed
    result."""
    torch.set_num_threads(1)
    from secfwt.crypten_compat import crypten
    from secfwt.mpc.nonlinear import clip

    p = payload

    def share(name: str, shape: tuple[int, ...], owner: Role) -> Any:
        v = p.get(name)
        return crypten.cryptensor(
            v.float() if v is not None else torch.zeros(shape), src=owner.rank
        )

    theta = {"w": share("w", (3, 4), Role.MODEL_OWNER), "b": share("b", (3,), Role.MODEL_OWNER)}
    x, y = share("x", (10, 4), Role.DATA_OWNER), share("y", (10, 3), Role.DATA_OWNER)
    mask = share("mask", (10,), Role.DATA_OWNER)
    noises = [
        share("noise", (p["q"],), Role.MODEL_OWNER),
        share("noise", (p["q"],), Role.DATA_OWNER),
    ]
    from secfwt.mpc.nonlinear import cross_entropy

    def losses(ps: list[dict[str, Any]]) -> Any:
        return crypten.stack([cross_entropy(x.matmul(q["w"].t()) + q["b"], y) for q in ps])

    new, g, mean_loss = dp_spsa_step(
        losses,
        theta,
        us=p["us"],
        settings=p["settings"],
        dp=p["dp"],
        mask=mask,
        noises=noises,
        clip=clip,
    )
    return {
        "w": new["w"].get_plain_text(),
        "b": new["b"].get_plain_text(),
        "g": g.get_plain_text(),
        "loss": mean_loss.get_plain_text(),
    }


@pytest.mark.multiprocess
def test_mpc_dp_zo_step_matches_plaintext():
    x, y = _problem(3)
    q = 6
    us = directions(seed=4, step=0, shapes=SHAPES, count=q)
    s = SPSASettings(lr=0.5, eps=0.05, directions=q)
    dp = DPZOSettings(clip=1.0, expected_batch=6.0)
    g = torch.Generator().manual_seed(5)  # fixed inputs: the test is deterministic
    theta = {
        "w": 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64),
        "b": 0.1 * torch.randn(3, generator=g, dtype=torch.float64),
    }
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.float64)
    n_mo, n_do = (
        0.8 * torch.randn(q, generator=g, dtype=torch.float64),
        0.8 * torch.randn(q, generator=g, dtype=torch.float64),
    )
    ref, g_ref, loss_ref = dp_spsa_step(
        _example_losses(x, y),
        theta,
        us=us,
        settings=s,
        dp=dp,
        mask=mask,
        noises=[n_mo, n_do],
        clip=torch.clamp,
        cast=lambda t: t.double(),
    )
    common = {"us": us, "settings": s, "dp": dp, "q": q}
    payloads = {
        Role.MODEL_OWNER: {**common, **theta, "noise": n_mo},
        Role.DATA_OWNER: {
            **common,
            "x": x,
            "y": torch.nn.functional.one_hot(y, 3).double(),
            "mask": mask,
            "noise": n_do,
        },
    }
    out = run_parties(_dp_party, payloads=payloads, provider=Provider.TTP, timeout_s=300)[
        Role.DATA_OWNER
    ].value
    # per-example losses carry ~1e-4 fixed-point error; / (2 eps) = 0.1 makes d ~1e-3, the
    # clipped sum over 7 rows / 6 and the noise add ~1e-4 more
    assert (out["g"].double() - g_ref).abs().max() < 5e-3, (out["g"], g_ref)
    assert abs(float(out["loss"]) - float(loss_ref)) < 1e-3
    for n in ref:
        assert (out[n].double() - ref[n]).abs().max() < 5e-3
        assert (
            ref[n] - theta[n]
        ).abs().max() > 4 * 5e-3  # the step moved them well beyond the tolerance
