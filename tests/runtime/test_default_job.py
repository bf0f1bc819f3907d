"""The default simulated job, end to end (about 6 minutes on 2 cores; runs with `make test-all`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_default_job_raises_heldout_accuracy(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "secfwt.cli",
            "simulate",
            "--report",
            str(out),
            "--set",
            f'run.output_dir="{tmp_path}"',
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["accuracy_after"] - r["accuracy_before"] >= 0.05
    assert r["steps"] == 100
    for role in ("model_owner", "data_owner"):
        assert r["parties"][role]["bytes_sent"] > 0 and r["parties"][role]["rounds"] > 0
