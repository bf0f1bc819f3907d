"""Daemons as real processes: SIGTERM shuts down cleanly with state on disk; --insecure is loud."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secfwt.errors import ConfigError
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.roles import Role
from secfwt.server.client import Credentials, PartyClient
from secfwt.server.config import HeldData, HeldModel
from secfwt.server.holdings import DataHoldings, ModelHoldings
from secfwt.server.jobfile import parse_job_text
from secfwt.server.protocol import PROTOCOL_VERSION, Commitments, Proposal
from tests.server.conftest import IDS, Deployment, to_toml

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90  # a cold start imports torch (via the job config); slow on 2 busy cores


def _spawn(args: list[str], log: Path, *, cwd: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        env=env,
    )


def _wait_ready(proc: subprocess.Popen, state: Path, log: Path) -> str:
    t0 = time.monotonic()
    while not (state / "daemon.json").is_file():
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() - t0 > START_TIMEOUT_S:
            proc.kill()
            raise AssertionError(
                f"daemon not ready after {START_TIMEOUT_S} s: {log.read_text()[-2000:]}"
            )
        time.sleep(0.1)
    return json.loads((state / "daemon.json").read_text())["address"]


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_sigterm_shuts_down_cleanly_with_state_persisted(
    deployment: Deployment, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    raw = deployment.party_raw(
        "data_owner",
        peers={"model_owner": "127.0.0.1:1", "dealer": "127.0.0.1:1"},
        state=str(state),
    )
    cfg_file = tmp_path / "party.toml"
    cfg_file.write_text(to_toml(raw))
    log = tmp_path / "daemon.stderr"
    proc = _spawn(["-m", "secfwt.cli", "party", "data-owner", "--config", str(cfg_file)], log)
    try:
        address = _wait_ready(proc, state, log)
        text = deployment.job_file.read_text()
        job = parse_job_text(text, where="test")
        commitments = Commitments(
            model=ModelHoldings(HeldModel(str(deployment.model_dir))).commitment(),
            data=DataHoldings(HeldData(source="jsonl", path=str(deployment.data_file))).commitment(
                job
            ),  # type: ignore[arg-type]
        )
        participants = tuple(Identity(IdentityRole(r), pid) for r, pid in IDS.items())
        proposal = Proposal(
            "sig-1",
            PROTOCOL_VERSION,
            text,
            job.terms,
            job.terms.digest(),
            commitments,
            participants,
        )
        with deployment.client(address) as c:
            assert c.health() == "SERVING"
            c.propose(proposal)
            c.accept("sig-1", proposal.terms_digest)
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()[-2000:]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    msgs = [entry["msg"] for entry in lines]
    assert "listening" in msgs and "signal received" in msgs and msgs[-1] == "stopped"
    assert any(entry.get("signal") == "SIGTERM" for entry in lines)
    record = json.loads((state / "jobs" / "sig-1" / "job.json").read_text())
    assert (
        record["state"] == "accepted" and record["accepted_terms_digest"] == proposal.terms_digest
    )
    assert (state / "daemon.log").is_file()


def test_insecure_flag_prints_a_loud_warning(deployment: Deployment, tmp_path: Path) -> None:
    state = tmp_path / "state"
    raw = deployment.party_raw("dealer", peers={"model_owner": "127.0.0.1:1"}, state=str(state))
    raw["party"]["insecure"] = True
    del raw["tls"]
    cfg_file = tmp_path / "party.toml"
    cfg_file.write_text(to_toml(raw))
    log = tmp_path / "daemon.stderr"
    proc = _spawn(["parties/dealer.py", "--config", str(cfg_file), "--insecure"], log)
    try:
        address = _wait_ready(proc, state, log)
        claim = Credentials(identity=Identity(IdentityRole.OPERATOR, "alice"), insecure=True)
        with PartyClient(address, claim) as c:
            assert c.health() == "SERVING"
    finally:
        code = _stop(proc)
    err = log.read_text()
    assert code == 0
    assert "!!! WARNING: secfwt party daemon running with --insecure !!!" in err
    assert "INSECURE MODE" in err  # and in the structured log


def test_insecure_needs_flag_and_config_together(deployment: Deployment, tmp_path: Path) -> None:
    from secfwt.server.daemon import run_party

    cfg_file = tmp_path / "party.toml"
    cfg_file.write_text(to_toml(deployment.party_raw("dealer", state=str(tmp_path / "s"))))
    with pytest.raises(ConfigError, match="--insecure was given but party.insecure is not true"):
        run_party(Role.DEALER, cfg_file, insecure=True)
    with pytest.raises(
        ConfigError, match="party.role is dealer but this is the model_owner daemon"
    ):
        run_party(Role.MODEL_OWNER, cfg_file)
