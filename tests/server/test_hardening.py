"""What an adversarial probe of the daemons found, reproduced over real daemons and sockets.

Each test sends what the probe sent (mutual TLS, pinned or pinned-but-unprivileged callers) and
checks the refusal, its gRPC status, the daemon's log growth and that the daemon keeps serving.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from secfwt.cli import main
from secfwt.errors import ProtocolError
from secfwt.pki.identity import Identity
from secfwt.server.client import PartyClient
from secfwt.server.convert import proposal_to_pb
from secfwt.server.daemon import PartyDaemon
from secfwt.server.errors import JobExistsError, JobNotFoundError
from secfwt.server.logs import JsonFormatter
from secfwt.v1 import party_pb2 as pb
from tests.server.conftest import IDS, Deployment
from tests.server.runners import BlockingRunner, EchoRunner
from tests.server.test_jobs import (
    _daemon,
    _proposal,
    _three_daemons,
    _tls_flags,
    _wait_state,
)

#: A job file nested 1,000 deep: 2 KB that made tomllib recurse until RecursionError.
NESTED_TOML = "x = " + "[" * 1000 + "]" * 1000 + "\n"
#: What one refused call may add to the daemon's log, whatever it carried (one line with a
#: clipped reason: see secfwt.server.logs).
LOG_BYTES_PER_REFUSAL = 4096


@pytest.fixture
def daemon_log(tmp_path: Path) -> Iterator[Path]:
    """The in-process daemons' log as ``secfwt party`` writes it (JSON lines, INFO and up)."""
    path = tmp_path / "daemon.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _raw(client: PartyClient, method: str, msg) -> grpc.RpcError:  # noqa: ANN001
    """Call ``method`` with ``msg`` and return the error it must fail with."""
    with pytest.raises(grpc.RpcError) as err:
        client.channel.unary_unary(f"/secfwt.v1.PartyService/{method}")(
            msg.SerializeToString(), timeout=10
        )
    return err.value


def _healthy(dep: Deployment, address: str) -> None:
    with dep.client(address) as c:
        assert c.health() == "SERVING"


def test_deeply_nested_job_toml_is_refused_in_one_line(
    deployment: Deployment,
    tmp_path: Path,
    daemons: list,
    daemon_log: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Propose and GetCommitment at either owner: INVALID_ARGUMENT naming the nesting, one short
    log line per call (it was INTERNAL and a ~200 KB traceback); the CLI exits 2, no traceback."""
    mo = _daemon(deployment, "model_owner", tmp_path, daemons)
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    good = _proposal(deployment, "nest-ok", mo=mo, do=do)
    nested_proposal = pb.ProposeRequest(
        proposal=proposal_to_pb(replace(good, job_id="nest-1", job_toml=NESTED_TOML))
    )
    nested_commitment = pb.GetCommitmentRequest(job_toml=NESTED_TOML)
    for d in (mo, do):
        with deployment.client(d.address) as c:
            for method, msg in (("GetCommitment", nested_commitment), ("Propose", nested_proposal)):
                before = daemon_log.stat().st_size
                err = _raw(c, method, msg)
                grown = daemon_log.stat().st_size - before
                assert grown <= LOG_BYTES_PER_REFUSAL, (method, grown)
                assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())
                assert "nested too deeply" in err.details() and "\n" not in err.details()
        _healthy(deployment, d.address)
    nested = tmp_path / "nested.toml"
    nested.write_text(NESTED_TOML)
    capsys.readouterr()
    code = main(["job", "submit", str(nested), "--to", mo.address, *_tls_flags(deployment)])
    err = capsys.readouterr().err
    assert code == 2 and "nested too deeply" in err
    assert "Traceback" not in err and err.count("\n") == 1, err


def test_a_refusal_quoting_a_huge_value_is_clipped(
    deployment: Deployment, tmp_path: Path, daemons: list, daemon_log: Path
) -> None:
    """A job file whose error quotes a 60 KB value: the caller gets a clipped one-line reason (it
    got "Stream removed": the status header exceeded gRPC's 16 KiB hard limit) and the log one
    short line (it got the whole value, escaped: 180 KB for 60 KB of emoji)."""
    d = _daemon(deployment, "model_owner", tmp_path, daemons)
    with deployment.client(d.address) as c:
        for filler in ("A" * 60_000, "\U0001f600" * 15_000):
            before = daemon_log.stat().st_size
            err = _raw(
                c, "GetCommitment", pb.GetCommitmentRequest(job_toml=f'[job]\nname = ["{filler}"]')
            )
            assert daemon_log.stat().st_size - before <= LOG_BYTES_PER_REFUSAL
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert err.details().startswith("job file: [job] name: expected a string, got")
            assert err.details().endswith("more bytes clipped]")
            assert len(err.details().encode()) <= 1024
    _healthy(deployment, d.address)


def test_an_integer_past_64_bits_is_refused_before_it_reaches_a_commitment(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    """``model.max_length = 2**64`` became the data owner's commitment and failed to serialize
    (INTERNAL); TOML integers are 64-bit, and now every job value is checked against that."""
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    text = deployment.job_file.read_text().replace("max_length = 16", f"max_length = {2**64}")
    with deployment.client(do.address) as c:
        err = _raw(c, "GetCommitment", pb.GetCommitmentRequest(job_toml=text))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "max_length: 18446744073709551616 is outside TOML's 64-bit integer range" in (
        err.details()
    )
    _healthy(deployment, do.address)


def test_identifiers_and_digests_with_a_trailing_newline_are_refused(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    """``re.match`` with ``$`` let "baseline-1\\n" through as a second job; every identifier and
    digest a request carries is now matched in full."""
    mo = _daemon(deployment, "model_owner", tmp_path, daemons)
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    p = _proposal(deployment, "baseline-1", mo=mo, do=do)
    model = p.commitments.model
    with deployment.client(mo.address) as c:
        c.propose(p)
        hostile = {
            "job id": replace(p, job_id="baseline-1\n"),
            "terms digest": replace(p, job_id="nl-terms", terms_digest=p.terms_digest + "\n"),
            "weights digest": replace(
                p,
                job_id="nl-weights",
                commitments=replace(
                    p.commitments, model=replace(model, weights_sha256=model.weights_sha256 + "\n")
                ),
            ),
        }
        msgs = {what: proposal_to_pb(q) for what, q in hostile.items()}
        msgs["participant"] = proposal_to_pb(replace(p, job_id="nl-participant"))
        msgs["participant"].participants[0].party_id += "\n"
        for what, msg in msgs.items():
            err = _raw(c, "Propose", pb.ProposeRequest(proposal=msg))
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (what, err.details())
        for method, msg in (
            ("Status", pb.StatusRequest(job_id="baseline-1\n")),
            ("Accept", pb.AcceptRequest(job_id="baseline-1\n", terms_digest=p.terms_digest)),
            (
                "Hello",
                pb.HelloRequest(
                    protocol_version=1,
                    identity=pb.Identity(role=pb.ROLE_OPERATOR, party_id="alice\n"),
                ),
            ),
        ):
            err = _raw(c, method, msg)
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())
    jobs = sorted(d.name for d in (tmp_path / IDS["model_owner"] / "jobs").iterdir())
    assert jobs == ["baseline-1"], jobs
    _healthy(deployment, mo.address)


def test_the_job_file_limit_counts_utf8_bytes(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    """3,000 three-byte characters are 9,000 bytes: over an 8,000-byte limit although under
    8,000 characters."""
    d = _daemon(
        deployment,
        "model_owner",
        tmp_path,
        daemons,
        limits={"max_message_bytes": 64_000, "max_job_toml_bytes": 8_000},
    )
    text = deployment.job_file.read_text() + "# " + "\u20ac" * 3000 + "\n"
    assert len(text) < 8_000 < len(text.encode())
    with deployment.client(d.address) as c:
        err = _raw(c, "GetCommitment", pb.GetCommitmentRequest(job_toml=text))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert f"job_toml: {len(text.encode())} bytes (UTF-8), the limit is 8000" in err.details()
    _healthy(deployment, d.address)


def test_a_cancellation_is_a_veto(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model owner's operator cancels: neither another party's operator (pinned there with
    accept = false) nor a peer daemon can resume it there, and no other party resumes it while
    the model owner's cancel stands; the model owner's own operator can."""
    runners = {r: BlockingRunner() for r in IDS}
    deployment.add_operator("bob")  # the data owner's operator; accept = false at the others
    addr = _three_daemons(
        deployment,
        tmp_path,
        daemons,
        runners,
        operators=lambda role: [{"id": "alice"}, {"id": "bob", "accept": role == "data_owner"}],
    )
    to = [x for a in addr.values() for x in ("--to", a)]
    submit = ["job", "submit", str(deployment.job_file), "--id", "veto-1", *to]
    assert main([*submit, *_tls_flags(deployment)]) == 0
    for r in IDS:
        assert runners[r].started.wait(15), r
    cancel = ["job", "cancel", "veto-1", "--to", addr["model_owner"], *_tls_flags(deployment)]
    assert main(cancel) == 0
    for r in IDS:
        _wait_state(deployment, addr[r], "veto-1", pb.JOB_STATE_CANCELLED)
    for r in IDS:
        runners[r].started.clear()
    capsys.readouterr()
    # bob (accept = false at the model owner) and the dealer's daemon certificate: refused there.
    with deployment.client(addr["model_owner"], "bob") as c:
        err = _raw(c, "Resume", pb.ResumeRequest(job_id="veto-1"))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED, err.details()
    with deployment.client(addr["model_owner"], "dealer") as c:
        err = _raw(c, "Resume", pb.ResumeRequest(job_id="veto-1"))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED, err.details()
    # bob at his own party: refused while the model owner's operator's cancel stands.
    with deployment.client(addr["data_owner"], "bob") as c:
        err = _raw(c, "Resume", pb.ResumeRequest(job_id="veto-1"))
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "model_owner/vendor's operator operator/alice cancelled it" in err.details()
    time.sleep(0.5)
    assert not any(runners[r].started.is_set() for r in IDS)
    for r in IDS:
        assert _wait_state(deployment, addr[r], "veto-1", pb.JOB_STATE_CANCELLED).attempts == 1
    # The model owner's own operator lifts its veto; then the others resume too.
    resume = ["job", "resume", "veto-1", *_tls_flags(deployment)]
    assert main([*resume, "--to", addr["model_owner"]]) == 0
    assert runners["model_owner"].started.wait(15)
    assert main([*resume, "--to", addr["data_owner"], "--to", addr["dealer"]]) == 0
    for r in ("data_owner", "dealer"):
        assert runners[r].started.wait(15), r


def test_every_identifier_and_digest_check_refuses_a_trailing_newline(tmp_path: Path) -> None:
    """The validators behind the daemons, the certificates and the checkpoints, each with the
    value it accepts and the same value followed by a newline."""
    from secfwt.errors import ConfigError
    from secfwt.pki.identity import check_party_id
    from secfwt.roles import Role
    from secfwt.runtime.checkpoint import PartyCheckpoints
    from secfwt.server.errors import InvalidRequestError
    from secfwt.server.protocol import check_job_id, check_sha256

    checks = (
        (check_job_id, "baseline-1", InvalidRequestError),
        (lambda v: check_sha256(v, field="terms_digest"), "ab" * 32, InvalidRequestError),
        (check_party_id, "hospital-a", ConfigError),
        (Identity.parse_uri, "secfwt://operator/alice", ConfigError),
    )
    for check, good, error in checks:
        check(good)
        with pytest.raises(error):
            check(good + "\n")
    with pytest.raises(ConfigError, match="unknown role"):
        Identity.parse_uri("secfwt://operator\n/alice")
    store = PartyCheckpoints(
        tmp_path / "ckpt", role=Role.DATA_OWNER, job_digest="a" * 64, terms_digest="t"
    )
    (store.folder / "step-00000009.pt\n").write_bytes(b"not a checkpoint")
    assert store.available() == []  # not a step file: never read


def _state_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_unaccepted_jobs_are_bounded_per_caller(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    """30 proposals of ~60 KB that the model owner refuses: the first 16 (the default bound) are
    kept, then RESOURCE_EXHAUSTED and nothing stored; another caller is not affected; an
    operator's removal frees a place; the removed id stays reserved."""
    mo = _daemon(deployment, "model_owner", tmp_path, daemons)
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    p = _proposal(deployment, "big-0", mo=mo, do=do)
    big = p.job_toml + "# " + "x" * 60_000 + "\n"  # 60 KB job file
    wrong = replace(p.commitments, model=replace(p.commitments.model, weights_sha256="0" * 64))
    state = tmp_path / IDS["model_owner"]
    refused = exhausted = 0
    with deployment.client(mo.address) as c:
        for i in range(30):
            q = replace(p, job_id=f"big-{i}", job_toml=big, commitments=wrong)
            err = _raw(c, "Propose", pb.ProposeRequest(proposal=proposal_to_pb(q)))
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION:
                refused += 1
            else:
                assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                assert "limits.max_proposals_per_caller = 16" in err.details()
                exhausted += 1
        assert (refused, exhausted) == (16, 14)
        assert len(list((state / "jobs").glob("*/job.json"))) == 16
        assert _state_bytes(state) < 16 * 2 * len(big)  # record + events, no more
        # a peer daemon proposing is another caller, with its own bound
    with deployment.client(mo.address, "dealer") as c:
        assert c.propose(replace(p, job_id="from-dealer")).state == pb.JOB_STATE_PROPOSED
    remove = ["job", "remove", "big-3", "--to", mo.address, *_tls_flags(deployment)]
    capsys.readouterr()
    assert main(remove) == 0
    assert "removed job big-3" in capsys.readouterr().out
    assert sorted(p.name for p in (state / "jobs" / "big-3").iterdir()) == ["removed.json"]
    with deployment.client(mo.address) as c:
        assert c.propose(replace(p, job_id="big-30")).state == pb.JOB_STATE_PROPOSED
        err = _raw(c, "Status", pb.StatusRequest(job_id="big-3"))
        assert err.code() is grpc.StatusCode.NOT_FOUND
        assert "removed by operator/alice); its id stays reserved" in err.details()
        err = _raw(
            c, "Propose", pb.ProposeRequest(proposal=proposal_to_pb(replace(p, job_id="big-3")))
        )
        assert err.code() is grpc.StatusCode.ALREADY_EXISTS, err.details()
    _healthy(deployment, mo.address)


def test_unaccepted_jobs_expire_and_ended_jobs_stay_until_removed(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    """jobs.proposal_ttl_s = 1: a proposed, a refused and a cancelled-before-acceptance job are
    removed within about a second; an accepted, a cancelled-after-acceptance and a finished one
    stay; the finished one goes
    when an operator removes it (never a peer), and a removed job is still reported after a
    restart of the daemon."""
    do = _daemon(deployment, "data_owner", tmp_path, daemons)
    mo = _daemon(
        deployment,
        "model_owner",
        tmp_path,
        daemons,
        peers={"data_owner": do.address, "dealer": "127.0.0.1:1"},
        jobs={"proposal_ttl_s": 1.0},
    )
    p = _proposal(deployment, "done-1", mo=mo, do=do)
    with deployment.client(mo.address) as a, deployment.client(do.address) as b:
        for job_id in ("done-1", "kept-1", "kept-2"):
            q = replace(p, job_id=job_id)
            a.propose(q)
            b.propose(q)
            b.accept(job_id, q.terms_digest)
            a.accept(job_id, q.terms_digest)
        a.start("done-1")
        a.cancel("kept-2", "cancelled after acceptance: resumable, kept")
        for job_id in ("stale-1", "stale-2"):
            a.propose(replace(p, job_id=job_id))
        a.cancel("stale-2", "not wanted")
        bad = replace(p.commitments, model=replace(p.commitments.model, weights_sha256="0" * 64))
        with pytest.raises(ProtocolError):
            a.propose(replace(p, job_id="stale-3", commitments=bad))
    _wait_state(deployment, mo.address, "done-1", pb.JOB_STATE_FINISHED)
    t0 = time.monotonic()
    with deployment.client(mo.address) as a:
        for job_id in ("stale-1", "stale-2", "stale-3"):
            while True:
                try:
                    a.status(job_id)
                except JobNotFoundError as exc:
                    assert "never accepted here for jobs.proposal_ttl_s = 1 s" in str(exc)
                    break
                assert time.monotonic() - t0 < 10, f"{job_id} did not expire"
                time.sleep(0.1)
        with pytest.raises(JobExistsError):
            a.propose(replace(p, job_id="stale-1"))
        time.sleep(1.5)  # longer than the TTL since the accepted and finished jobs last changed
        assert a.status("kept-1").state == pb.JOB_STATE_ACCEPTED
        assert a.status("kept-2").state == pb.JOB_STATE_CANCELLED
        assert a.status("done-1").state == pb.JOB_STATE_FINISHED
    state = tmp_path / IDS["model_owner"] / "jobs"
    assert sorted(f.name for f in (state / "stale-3").iterdir()) == ["removed.json"]
    assert (state / "done-1" / "artifacts" / "echo.json").is_file()
    with deployment.client(mo.address, "hospital") as c:  # a peer daemon may not remove
        err = _raw(c, "Remove", pb.RemoveRequest(job_id="done-1"))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED, err.details()
    capsys.readouterr()
    base = ["job", "remove", "--to", mo.address, *_tls_flags(deployment)]
    assert main([*base[:2], "kept-1", *base[2:]]) == 7  # not ended: cancel or refuse it first
    assert "remove needs it cancelled or failed or finished or refused" in capsys.readouterr().out
    assert main([*base[:2], "done-1", "--json", *base[2:]]) == 0
    out = json.loads(capsys.readouterr().out)["parties"][mo.address]
    assert out["removed"] == "done-1" and out["freed_bytes"] > 0
    assert sorted(f.name for f in (state / "done-1").iterdir()) == ["removed.json"]
    fetch = ["job", "fetch", "done-1", "--to", mo.address, "--out", str(tmp_path / "got")]
    assert main([*fetch, *_tls_flags(deployment)]) == 11
    mo.stop(grace=0.5)
    again = PartyDaemon(mo.config, runner=EchoRunner())
    again.start()
    daemons.append(again)
    with deployment.client(again.address) as a:
        with pytest.raises(JobNotFoundError, match="removed by operator/alice"):
            a.status("done-1")
        assert a.status("kept-1").state == pb.JOB_STATE_ACCEPTED
