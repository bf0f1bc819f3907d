"""`secfwt simulate`'s report: the dealer is a party of it, and of its link-time model.

The tiny ZO job through the real CLI (three processes, TTP dealer): ``parties.dealer`` holds the
bytes and requests the dealer counted in its own process, which equal what the computing
parties counted at their ends of its messages; ``projected_s`` follows the link model of
:mod:`secfwt.runtime.links` with the dealer's bytes and requests in it; every process reports
how its int64 matmuls ran; the CLI prints the dealer's line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from secfwt.runtime.links import LINKS
from tests.conftest import write_tiny_job

pytestmark = pytest.mark.multiprocess


def test_the_dealer_is_in_the_report_and_the_link_model(tmp_path, tiny_tok_dir) -> None:
    job = write_tiny_job(tmp_path, tiny_tok_dir)
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "secfwt.cli", "simulate", str(job), "--report", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    parties = r["parties"]
    assert set(parties) == {"model_owner", "data_owner", "dealer"}
    dealer = parties["dealer"]
    owners = [parties[role]["traffic"] for role in ("model_owner", "data_owner")]
    assert dealer["requests"] == sum(t["dealer_requests"] for t in owners) > 0
    assert dealer["bytes_sent"] == sum(t["dealer_bytes"] for t in owners) > 0
    assert dealer["bytes_received"] == sum(t["dealer_sent"] for t in owners) > 0
    # what one computing party sends to the other, the other receives
    mo, do = owners
    assert mo["sent"] == do["received"] and do["sent"] == mo["received"]
    # the link model, with the dealer's bytes and requests in it
    wall = max(parties[role]["wall_s"] for role in ("model_owner", "data_owner"))
    rounds = max(t["rounds"] for t in owners)
    for link in LINKS:
        without_dealer = wall + max(t["sent"] for t in owners) * 8 / link.bandwidth_bps
        without_dealer += rounds * link.rtt_s
        dealer_part = dealer["bytes_sent"] * 8 / link.bandwidth_bps
        dealer_part += dealer["requests"] * link.rtt_s
        assert r["projected_s"][link.name] == pytest.approx(without_dealer + dealer_part)
    # a computing party's bytes_sent is what it sent, not CrypTen's sent + received + dealer
    for role, t in zip(("model_owner", "data_owner"), owners, strict=True):
        p = parties[role]
        assert (p["bytes_sent"], p["bytes_received"]) == (t["sent"], t["received"])
        assert (p["dealer_bytes"], p["rounds"]) == (t["dealer_bytes"], t["rounds"])
        assert p["crypten_bytes"] > 0 and p["crypten_rounds"] > 0
    # bytes on the wire per phase: the two owners cut their phases at the same protocol points
    phases = {role: parties[role]["phase_traffic"] for role in ("model_owner", "data_owner")}
    for phase in ("frozen_prefix", "tuning"):
        mo_t, do_t = phases["model_owner"][phase], phases["data_owner"][phase]
        assert mo_t["sent"] == do_t["received"] > 0 and do_t["sent"] == mo_t["received"] > 0
    traffic = r["traffic"]
    wire_total = sum(t["sent"] + t["dealer_bytes"] + t["dealer_sent"] for t in owners)
    prefix, tuning = traffic["frozen_prefix"], traffic["tuning"]
    assert prefix["rows"] == 2 * (4 + 5) and tuning["steps"] == 3  # the tiny job's rows, steps
    assert prefix["bytes"] == sum(
        phases[role]["frozen_prefix"][k]
        for role in phases
        for k in ("sent", "dealer_bytes", "dealer_sent")
    )
    assert 0 < prefix["bytes"] + tuning["bytes"] < wire_total
    assert prefix["bytes_per_row"] == pytest.approx(prefix["bytes"] / prefix["rows"])
    assert tuning["bytes_per_step"] == pytest.approx(tuning["bytes"] / tuning["steps"])
    for role in parties:
        assert parties[role]["ring_matmul"] is not None
    assert any(parties[role]["ring_matmul"] for role in parties)  # some product was tuned
    text = proc.stdout
    assert f"dealer: {dealer['bytes_sent'] / 1e6:.1f} MB sent" in text
    assert f"{dealer['requests']} requests answered" in text
    assert "modelled link time: LAN" in text
    mo = parties["model_owner"]
    assert f"model_owner: {mo['bytes_sent'] / 1e6:.1f} MB sent" in text
    assert f"frozen prefix {prefix['bytes_per_row'] / 1e6:.1f} MB per row (18 rows)" in text
    assert f"tuning {tuning['bytes_per_step'] / 1e6:.2f} MB per step (3 steps)" in text
