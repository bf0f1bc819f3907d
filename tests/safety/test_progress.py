"""The progress display off a terminal: a line per phase and per tenth of it."""

from __future__ import annotations

from secfwt.safety.progress import SafetyProgress


def test_progress_lines_in_a_log(capsys):
    with SafetyProgress() as view:
        view.phase("generating: advbench", 20)
        for _ in range(20):
            view.step(1)
        view.phase("judging replies", None)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("generating: advbench (0/20)")
    assert [ln.split("] ")[1] for ln in lines[1:11]] == [
        f"generating: advbench ({n}/20)" for n in range(2, 21, 2)
    ]
    assert lines[-1].endswith("judging replies") and len(lines) == 12
