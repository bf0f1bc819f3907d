"""A whole simulated job with ``run.device``: the same bits as on the host.

This machine has no GPU, so the host stands in for the device (``resolve`` answering the CPU):
every party process, the dealer's included, then runs every ring product through the device
way (operands copied there, limbs there, the result copied back). With the same insecure test
seed, the tuned parameters and the accuracies equal a run with torch's int64 matmul bit for bit,
and the report counts the products that ran on the device. The CUDA placement itself is checked
with fake tensors in ``tests/mpc/test_device.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secfwt.mpc import device as mpc_device
from tests.conftest import write_tiny_job

pytestmark = pytest.mark.multiprocess

SEED = 11


def _run(tmp_path: Path, model_dir: Path, name: str) -> dict:
    """The tiny job through the CLI (in this process, the parties in their own)."""
    from secfwt.cli import main

    (tmp_path / name).mkdir()
    job = write_tiny_job(tmp_path / name, model_dir)
    report = tmp_path / name / "report.json"
    rc = main(
        ["simulate", str(job), "--report", str(report), "--insecure-fixed-seed", str(SEED)]
        + ["--set", "zo.steps=2", "--set", f'run.output_dir="{tmp_path / name / "runs"}"']
    )
    assert rc == 0
    return json.loads(report.read_text())


def _final(report: dict) -> dict[str, torch.Tensor]:
    return torch.load(report["parties"]["data_owner"]["artifacts"]["final_parameters"])


def test_a_job_on_the_device_way_tunes_the_same_bits_as_on_the_host(
    tmp_path, tiny_tok_dir, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("SECFWT_RING_MATMUL", "torch")
    host = _run(tmp_path, tiny_tok_dir, "host")
    assert host["device"] is None and "ring products on" not in capsys.readouterr().out
    monkeypatch.setenv("SECFWT_RING_MATMUL", "device")
    monkeypatch.setattr(mpc_device, "resolve", lambda value, **kw: torch.device("cpu"))
    dev = _run(tmp_path, tiny_tok_dir, "device")
    for key in ("accuracy_before", "accuracy_after", "eval_loss_before", "eval_loss_after"):
        assert dev[key] == host[key], key
    a, b = _final(host), _final(dev)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dev["device"]["device"] == "cpu"
    counts = dev["device"]["products"]
    for role, party in dev["parties"].items():
        recs = party["ring_matmul"]
        assert recs and all(r["method"] == "device" for r in recs), (role, recs)
    assert counts["device"] == sum(
        r["calls"] for p in dev["parties"].values() for r in p["ring_matmul"]
    )
    assert counts["device"] > 0 and counts["torch"] == counts["limbs"] == 0
    n = counts["device"]
    assert f"  ring products on cpu: {n} of the {n} large ones (" in capsys.readouterr().out
