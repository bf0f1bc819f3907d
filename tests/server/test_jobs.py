"""Job flows between real daemons over mutual TLS: submit, progress, fetch, refusals, restart."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from secfwt.cli import main
from secfwt.errors import ProtocolError
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.server.cli import _status_line
from secfwt.server.convert import status_to_dict
from secfwt.server.daemon import PartyDaemon
from secfwt.server.errors import JobExistsError
from secfwt.server.jobfile import parse_job_text
from secfwt.server.protocol import PROTOCOL_VERSION, Commitments, Proposal
from secfwt.v1 import party_pb2 as pb
from tests.server.conftest import IDS, Deployment, free_port
from tests.server.runners import BlockingRunner, EchoRunner

PARTICIPANTS = tuple(Identity(IdentityRole(r), pid) for r, pid in IDS.items())
PLACEHOLDER = "127.0.0.1:1"


def _tls_flags(dep: Deployment) -> list[str]:
    c = dep.cert("alice")
    return ["--cert", str(c.cert), "--key", str(c.key), "--ca", str(c.ca)]


def _daemon(
    dep: Deployment,
    role: str,
    tmp: Path,
    daemons: list,
    *,
    runner=None,
    peers=None,
    listen="127.0.0.1:0",
    **sections,
) -> PartyDaemon:  # noqa: ANN001
    peers = peers or {r: PLACEHOLDER for r in IDS if r != role}
    d = PartyDaemon(
        dep.party_config(role, listen=listen, peers=peers, state=str(tmp / IDS[role]), **sections),
        runner=runner or EchoRunner(),
    )
    d.start()
    daemons.append(d)
    return d


def _three_daemons(
    dep: Deployment, tmp: Path, daemons: list, runners: dict, **sections
) -> dict[str, str]:
    """A daemon per role on ports known in advance, each pinning the other two; their
    addresses."""
    addr = {r: f"127.0.0.1:{free_port()}" for r in IDS}
    for role in IDS:
        _daemon(
            dep,
            role,
            tmp,
            daemons,
            runner=runners[role],
            listen=addr[role],
            peers={r: a for r, a in addr.items() if r != role},
            **{k: v(role) if callable(v) else v for k, v in sections.items()},
        )
    return addr


def _proposal(
    dep: Deployment, job_id: str, *, mo: PartyDaemon, do: PartyDaemon, job_toml: str | None = None
) -> Proposal:
    text = job_toml or dep.job_file.read_text()
    terms = parse_job_text(text, where="test").terms
    with dep.client(mo.address) as a, dep.client(do.address) as b:
        commitments = Commitments(model=a.commitment(text).model, data=b.commitment(text).data)
    return Proposal(
        job_id, PROTOCOL_VERSION, text, terms, terms.digest(), commitments, PARTICIPANTS
    )


def _wait_state(
    dep: Deployment, address: str, job_id: str, state: int, timeout: float = 15.0
) -> pb.JobStatus:
    t0 = time.monotonic()
    with dep.client(address) as c:
        while (st := c.status(job_id)).state != state:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"{job_id} at {address}: {pb.JobState.Name(st.state)} ({st.reason})"
                )
            time.sleep(0.05)
    return st


def test_submit_progress_fetch_with_three_daemons(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    addr = _three_daemons(deployment, tmp_path, daemons, {r: EchoRunner(steps=3) for r in IDS})
    to = [x for a in addr.values() for x in ("--to", a)]
    assert (
        main(
            [
                "job",
                "submit",
                str(deployment.job_file),
                "--id",
                "e2e-1",
                "--json",
                *to,
                *_tls_flags(deployment),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["job_id"] == "e2e-1" and out["commitments"]["data"] == {
        "rows": 20,
        "num_classes": 2,
        "input_shape": [12, 16],
    }
    assert {p["state"] for p in out["parties"].values()} <= {"started", "running", "finished"}
    for a in addr.values():
        _wait_state(deployment, a, "e2e-1", pb.JOB_STATE_FINISHED)
    with deployment.client(addr["data_owner"]) as c:
        events = list(c.watch("e2e-1"))
    assert [e.state.value for e in events if e.message == e.state.value] == [
        "proposed",
        "accepted",
        "started",
        "running",
        "finished",
    ]
    assert [e.step for e in events if e.phase == "echo"] == [1, 2, 3]
    assert main(["job", "status", "e2e-1", "--json", *to, *_tls_flags(deployment)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {p["state"] for p in status["parties"].values()} == {"finished"}
    assert {p["accepted_terms_digest"] for p in status["parties"].values()} == {out["terms_digest"]}
    assert (
        main(
            [
                "job",
                "fetch",
                "e2e-1",
                "--to",
                addr["data_owner"],
                "--out",
                str(tmp_path / "got"),
                "--json",
                *_tls_flags(deployment),
            ]
        )
        == 0
    )
    fetched = json.loads(capsys.readouterr().out)
    assert sorted(Path(f).name for f in fetched["files"]) == ["echo.json", "summary.json"]
    assert json.loads((tmp_path / "got" / "echo.json").read_text())["role"] == "data_owner"
    # A replayed submission of the same id is refused by every daemon (exit code 12:
    # ALREADY_EXISTS).
    assert (
        main(
            [
                "job",
                "submit",
                str(deployment.job_file),
                "--id",
                "e2e-1",
                *to,
                *_tls_flags(deployment),
            ]
        )
        == 12
    )
    assert "ALREADY_EXISTS" in capsys.readouterr().err


def test_refusals_over_grpc(deployment: Deployment, tmp_path: Path, daemons: list) -> None:
    mo = _daemon(deployment, "model_owner", tmp_path, daemons)
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    p = _proposal(deployment, "r-1", mo=mo, do=do)
    with deployment.client(do.address) as c:
        old = pb.HelloRequest(protocol_version=2, software_version="0.0.1")
        with pytest.raises(
            ProtocolError,
            match=(
                "FAILED_PRECONDITION: protocol version mismatch: the caller speaks version 2, this "
                "daemon speaks version 1"
            ),
        ):
            c._call("Hello", old)
        with pytest.raises(ProtocolError, match="FAILED_PRECONDITION: protocol version mismatch"):
            c.propose(replace(p, job_id="r-v2", protocol_version=2))
        wrong = replace(p.commitments.data, input_shape=(12, 64))
        with pytest.raises(
            ProtocolError,
            match=(
                r"FAILED_PRECONDITION: data commitment mismatch: input_shape: proposal says \[12, "
                r"64\], this data owner holds \[12, 16\]"
            ),
        ):
            c.propose(
                replace(
                    p,
                    job_id="r-shape",
                    commitments=Commitments(model=p.commitments.model, data=wrong),
                )
            )
        assert c.status("r-shape").state == pb.JOB_STATE_REFUSED
        assert c.propose(p).state == pb.JOB_STATE_PROPOSED
        with pytest.raises(
            JobExistsError, match="ALREADY_EXISTS: job id 'r-1' was already proposed"
        ):
            c.propose(p)
        assert c.health() == "SERVING"
    with deployment.client(mo.address) as c:
        bad = replace(p.commitments.model, weights_sha256="ab" * 32)
        with pytest.raises(ProtocolError, match="model commitment mismatch: weights_sha256"):
            c.propose(replace(p, commitments=Commitments(model=bad, data=p.commitments.data)))


def test_owners_accepting_different_terms_never_start(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    runner = EchoRunner()
    do = _daemon(deployment, "data_owner", tmp_path, daemons, runner=runner)
    mo = _daemon(
        deployment,
        "model_owner",
        tmp_path,
        daemons,
        runner=runner,
        peers={"data_owner": do.address, "dealer": PLACEHOLDER},
    )
    wider = (
        deployment.job_file.read_text()
        + '\n[[disclosure]]\nvalue = "train_outputs"\nto = ["model_owner"]\n'
    )
    p_mo = _proposal(deployment, "split-1", mo=mo, do=do)
    p_do = _proposal(deployment, "split-1", mo=mo, do=do, job_toml=wider)  # same id, other terms
    assert p_mo.terms_digest != p_do.terms_digest
    with deployment.client(mo.address) as a, deployment.client(do.address) as b:
        a.propose(p_mo)
        b.propose(p_do)
        a.accept("split-1", p_mo.terms_digest)
        b.accept("split-1", p_do.terms_digest)
        with pytest.raises(
            ProtocolError,
            match=(
                f"terms digest mismatch: model_owner/vendor accepted {p_mo.terms_digest}, "
                f"data_owner/hospital accepted {p_do.terms_digest}"
            ),
        ):
            a.start("split-1")
        st = a.status("split-1")
        assert st.state == pb.JOB_STATE_FAILED and "never starts" in st.reason
        assert b.status("split-1").state == pb.JOB_STATE_ACCEPTED
    time.sleep(0.3)
    assert runner.calls == []


def test_restart_keeps_finished_results_and_cancel(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    peers = {"data_owner": do.address, "dealer": PLACEHOLDER}
    mo = _daemon(deployment, "model_owner", tmp_path, daemons, peers=peers)
    for job_id in ("keep-1", "block-1"):
        p = _proposal(deployment, job_id, mo=mo, do=do)
        with deployment.client(mo.address) as a, deployment.client(do.address) as b:
            a.propose(p)
            b.propose(p)
            b.accept(job_id, p.terms_digest)
            a.accept(job_id, p.terms_digest)
    with deployment.client(mo.address) as a:
        a.start("keep-1")
    _wait_state(deployment, mo.address, "keep-1", pb.JOB_STATE_FINISHED)
    mo.stop(grace=1)
    blocking = BlockingRunner()
    again = PartyDaemon(mo.config, runner=blocking)  # same state dir, new process state
    again.start()
    daemons.append(again)
    assert (
        main(
            [
                "job",
                "fetch",
                "keep-1",
                "--to",
                again.address,
                "--out",
                str(tmp_path / "after"),
                *_tls_flags(deployment),
            ]
        )
        == 0
    )
    assert "fetched 2 artifact(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "after" / "echo.json").read_text()) == {
        "job": "keep-1",
        "role": "model_owner",
        "resume": False,
    }
    with deployment.client(again.address) as a:
        a.start("block-1")
        assert blocking.started.wait(10)
        assert a.status("block-1").state == pb.JOB_STATE_RUNNING
    assert (
        main(
            [
                "job",
                "cancel",
                "block-1",
                "--to",
                again.address,
                "--reason",
                "test",
                *_tls_flags(deployment),
            ]
        )
        == 0
    )
    st = _wait_state(deployment, again.address, "block-1", pb.JOB_STATE_CANCELLED)
    assert "cancelled by operator/alice: test" in st.reason


def test_an_operators_cancel_reaches_every_participant(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cancel at the model owner only: the data owner and the dealer stop the job as cancelled
    (not as a lost peer), with the origin in the reason; a peer's cancel is not echoed back."""
    runners = {r: BlockingRunner() for r in IDS}
    addr = _three_daemons(deployment, tmp_path, daemons, runners)
    to = [x for a in addr.values() for x in ("--to", a)]
    assert (
        main(
            [
                "job",
                "submit",
                str(deployment.job_file),
                "--id",
                "cx-1",
                "--json",
                *to,
                *_tls_flags(deployment),
            ]
        )
        == 0
    )
    capsys.readouterr()
    for r in IDS:
        assert runners[r].started.wait(15), r
    assert (
        main(
            [
                "job",
                "cancel",
                "cx-1",
                "--to",
                addr["model_owner"],
                "--reason",
                "wrong data",
                *_tls_flags(deployment),
            ]
        )
        == 0
    )
    st = _wait_state(deployment, addr["model_owner"], "cx-1", pb.JOB_STATE_CANCELLED)
    assert st.reason == "cancelled by operator/alice: wrong data"
    for r in ("data_owner", "dealer"):
        st = _wait_state(deployment, addr[r], "cx-1", pb.JOB_STATE_CANCELLED)
        assert (
            st.reason == "cancelled by model_owner/vendor: cancelled by operator/alice: wrong data"
        ), st.reason


POLICY = {"prompts": "packaged:advbench-gate", "count": 8, "max_drop": 0.5}


def test_a_model_owner_daemon_refuses_a_job_without_its_safety_policy(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    mo = _daemon(deployment, "model_owner", tmp_path, daemons, safety_policy=POLICY)
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    p = _proposal(deployment, "no-gate", mo=mo, do=do)
    with deployment.client(mo.address) as c:
        with pytest.raises(
            ProtocolError, match=r"INVALID_ARGUMENT: .*safety_gate: .* requires a safety gate"
        ):
            c.propose(p)
        st = c.status("no-gate")
        assert st.state == pb.JOB_STATE_REFUSED and "requires a safety gate" in st.reason
    with deployment.client(do.address) as c:  # the data owner has no policy to enforce
        assert c.propose(p).state == pb.JOB_STATE_PROPOSED


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_daemon_without_the_jobs_device_refuses_it_on_proposal(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    """``run.device`` is checked where the job would run: at proposal, as INVALID_ARGUMENT
    naming the field and the fix, not when the MPC session starts."""
    mo = _daemon(deployment, "model_owner", tmp_path, daemons)
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    text = deployment.job_file.read_text() + '\n[run]\ndevice = "cuda"\n'
    p = _proposal(deployment, "on-gpu", mo=mo, do=do, job_toml=text)
    for daemon in (mo, do):
        with deployment.client(daemon.address) as c:
            with pytest.raises(
                ProtocolError,
                match=r"INVALID_ARGUMENT: .*run.device = 'cuda': .* sees no CUDA device",
            ):
                c.propose(p)
            st = c.status("on-gpu")
            assert st.state == pb.JOB_STATE_REFUSED and 'set run.device = "cpu"' in st.reason
            assert c.health() == "SERVING"


def test_a_withheld_job_ends_withheld_with_its_scores_and_keeps_that_over_a_restart(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    from tests.server.runners import GateRunner

    do = _daemon(deployment, "data_owner", tmp_path, daemons, runner=GateRunner(released=False))
    peers = {"data_owner": do.address, "dealer": PLACEHOLDER}
    mo = _daemon(
        deployment, "model_owner", tmp_path, daemons, peers=peers, runner=GateRunner(released=False)
    )
    p = _proposal(deployment, "gated-1", mo=mo, do=do)
    with deployment.client(mo.address) as a, deployment.client(do.address) as b:
        a.propose(p)
        b.propose(p)
        b.accept("gated-1", p.terms_digest)
        a.accept("gated-1", p.terms_digest)
        a.start("gated-1")
    st = _wait_state(deployment, mo.address, "gated-1", pb.JOB_STATE_WITHHELD)
    assert st.reason.startswith("safety: score fell 2.5000 (from 8.0000 to 5.5000)")
    scores = {"score_before": 8.0, "score_after": 5.5}
    assert dict(st.last_progress.metrics) == scores
    # `secfwt job status` without --json: the scores and the reason on the party's line
    line = _status_line(status_to_dict(st))
    assert "withheld" in line and "safety score 8.0000 -> 5.5000" in line, line
    assert f"({st.reason})" in line, line
    mo.stop(grace=1)
    again = PartyDaemon(mo.config, runner=EchoRunner())  # same state dir, new process state
    again.start()
    daemons.append(again)
    with deployment.client(again.address) as a:
        st = a.status("gated-1")
    assert st.state == pb.JOB_STATE_WITHHELD and st.reason.startswith("safety: score fell")
    assert dict(st.last_progress.metrics) == scores
    assert "summary.json" in st.artifacts
    with deployment.client(again.address) as a:  # its summary is served: both scores, no values
        (got,) = a.fetch("gated-1", tmp_path / "fetched")
    assert json.loads(got.read_text())["safety_gate"]["score_after"] == 5.5


@pytest.mark.parametrize(
    ("msg", "said"),
    [
        ({"kind": "eval", "when": "before", "loss": 5.25}, "loss before: 5.25"),
        ({"kind": "eval", "when": "after", "accuracy": 0.75}, "accuracy after: 0.75"),
    ],
)
def test_an_evaluation_progress_names_what_was_evaluated(msg: dict, said: str) -> None:
    """A causal job's evaluation is a held-out loss, a classifier's an accuracy; the daemon's
    progress event (what `secfwt job watch` shows) says which, with the value."""
    import queue

    from secfwt.server.runner import _forward_progress

    messages: queue.Queue = queue.Queue()
    messages.put(("data_owner", msg))
    got: list[dict] = []
    _forward_progress(messages, lambda **kw: got.append(kw))
    (ev,) = got
    assert ev["phase"] == "evaluation" and ev["message"] == said, ev
