"""The rule that turns a twin's held-out accuracy curve into steps to the target."""

from __future__ import annotations

import pytest

from secfwt.bench.steps_to_target import steps_to_target


@pytest.mark.parametrize(
    ("before", "curve", "confirm", "expected"),
    [
        # reached at step 2 and held: 2
        (0.5, [0.50, 0.60, 0.60, 0.65], 2, 2),
        # reached at step 1 but lost at step 2: the first step that holds for 2 more is 3
        (0.5, [0.60, 0.55, 0.60, 0.60, 0.70], 2, 3),
        # held to the end of the curve counts (fewer than `confirm` steps left)
        (0.5, [0.50, 0.50, 0.60], 5, 3),
        # never reached
        (0.5, [0.50, 0.55, 0.59], 1, None),
        # exactly +10 points over 60 rows (6 rows): reached despite rounding
        (32 / 60, [32 / 60, 38 / 60], 0, 2),
    ],
)
def test_steps_to_target(before, curve, confirm, expected):
    assert steps_to_target(curve, before, gain=0.1, confirm=confirm) == expected
