"""A run's report names the commit of the secfwt code its parties imported, wherever the run
was started from (a job is often started from its data's folder, not from the checkout)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import secfwt
from secfwt.runtime.simulate import machine_info

CHECKOUT = Path(secfwt.__file__).resolve().parents[1]


def test_the_commit_is_the_imported_codes_not_the_working_directorys(tmp_path, monkeypatch):
    head = subprocess.run(
        ["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        pytest.skip("secfwt is not imported from a git checkout here")
    monkeypatch.chdir(tmp_path)  # outside any checkout
    assert machine_info()["commit"] == head.stdout.strip()
