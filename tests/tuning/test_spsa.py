from __future__ import annotations

import torch

from secfwt.tuning.spsa import SPSASettings, directions, spsa_step


def test_directions_are_reproducible_from_seed_and_step():
    shapes = (("a", (3, 2)), ("b", (4,)))
    d1 = directions(seed=5, step=2, shapes=shapes, count=2)
    d2 = directions(seed=5, step=2, shapes=shapes, count=2)
    d3 = directions(seed=5, step=3, shapes=shapes, count=2)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(d1, d2, strict=True) for n in ("a", "b"))
    assert not torch.equal(d1[0]["a"], d3[0]["a"])


def test_spsa_estimate_is_the_directional_derivative_and_descends():
    target = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}

    def loss(p):
        return ((p["w"] - target["w"]) ** 2).sum()

    theta = {"w": torch.zeros(3, dtype=torch.float64)}
    us = directions(seed=0, step=0, shapes=(("w", (3,)),), count=1)
    _, gs, _ = spsa_step(
        lambda ps: [loss(p) for p in ps],
        theta,
        us=us,
        settings=SPSASettings(lr=0.1, eps=1e-3, directions=1),
        cast=lambda t: t.double(),
    )
    grad = 2 * (theta["w"] - target["w"])
    assert (
        abs(float(gs[0]) - float(grad @ us[0]["w"].double())) < 1e-6
    )  # exact for a quadratic (central difference)
    start = float(loss(theta))
    for step in range(300):
        us = directions(seed=0, step=step, shapes=(("w", (3,)),), count=2)
        theta, _, _ = spsa_step(
            lambda ps: [loss(p) for p in ps],
            theta,
            us=us,
            settings=SPSASettings(lr=0.05, eps=1e-3, directions=2),
            cast=lambda t: t.double(),
        )
    assert float(loss(theta)) < 0.01 * start
