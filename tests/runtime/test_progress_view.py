"""`secfwt simulate`'s progress lines: the data owner's view of the shared steps, plus the steps
another party takes alone (the model owner's Safe Delta Hessians), which that view cannot show."""

from __future__ import annotations

from secfwt.roles import Role
from secfwt.runtime.progress import ProgressView


def test_a_partys_own_step_is_shown_once_and_shared_steps_from_the_data_owner(capsys):
    view = ProgressView()  # not a terminal under capsys: one plain line per phase, on stderr
    shared = {"kind": "phase", "phase": "safety gate: 48 score rows"}
    own = {"kind": "phase", "phase": "Safe Delta: Hessians of 1 module(s), 5.5 s", "own": True}
    view.update(Role.MODEL_OWNER, shared)  # the data owner reports it too: shown once, below
    view.update(Role.DATA_OWNER, shared)
    view.update(Role.MODEL_OWNER, own)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("] safety gate: 48 score rows")
    assert lines[1].endswith("] model owner: Safe Delta: Hessians of 1 module(s), 5.5 s")
