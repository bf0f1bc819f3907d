"""The job protocol without gRPC: admission, acceptance, start rules, queue, restart."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from secfwt.pki.identity import Identity, IdentityRole
from secfwt.roles import Role
from secfwt.server.errors import (
    BusyError,
    CommitmentMismatchError,
    InvalidRequestError,
    JobExistsError,
    JobNotFoundError,
    JobStateError,
    NotAuthorizedError,
    TermsMismatchError,
    VersionMismatchError,
)
from secfwt.server.jobfile import parse_job_text
from secfwt.server.negotiation import RemoteStatus
from secfwt.server.party import Party
from secfwt.server.protocol import (
    PROTOCOL_VERSION,
    Commitments,
    JobState,
    ModelCommitment,
    Proposal,
)
from tests.server.conftest import IDS, OPERATOR, Deployment
from tests.server.runners import BlockingRunner, EchoRunner

ALICE = Identity(IdentityRole.OPERATOR, OPERATOR)
VENDOR = Identity(IdentityRole.MODEL_OWNER, IDS["model_owner"])
HOSPITAL = Identity(IdentityRole.DATA_OWNER, IDS["data_owner"])
DEALER = Identity(IdentityRole.DEALER, IDS["dealer"])


class FakePeers:
    """Answers for the other parties' Status, as the daemon's peer client would."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], RemoteStatus] = {}  # (peer id, job id) -> its status

    def __call__(self, peer, job_id: str) -> RemoteStatus:  # noqa: ANN001
        if (peer.id, job_id) not in self.answers:
            raise JobNotFoundError(f"no job {job_id}")
        return self.answers[peer.id, job_id]


def _party(dep: Deployment, role: str, tmp: Path, runner=None, **kw) -> tuple[Party, FakePeers]:  # noqa: ANN001
    peers = {r: "127.0.0.1:1" for r in IDS if r != role}
    cfg = dep.party_config(role, peers=peers, state=str(tmp / IDS[role]), **kw)
    fake = FakePeers()
    return Party(config=cfg, runner=runner or EchoRunner(), peer_status=fake), fake


def _proposal(dep: Deployment, job_id: str = "job-1", **overrides) -> Proposal:  # noqa: ANN003
    text = dep.job_file.read_text()
    cfg = parse_job_text(text, where="test")
    from secfwt.server.config import HeldData, HeldModel
    from secfwt.server.holdings import DataHoldings, ModelHoldings

    mo = ModelHoldings(HeldModel(str(dep.model_dir))).commitment()
    do = DataHoldings(HeldData(source="jsonl", path=str(dep.data_file))).commitment(cfg)  # type: ignore[arg-type]
    p = Proposal(
        job_id=job_id,
        protocol_version=PROTOCOL_VERSION,
        job_toml=text,
        terms=cfg.terms,
        terms_digest=cfg.terms.digest(),
        commitments=Commitments(model=mo, data=do),
        participants=(VENDOR, HOSPITAL, DEALER),
    )
    return dataclasses.replace(p, **overrides)


def _accepted(party: Party, peers: FakePeers, dep: Deployment, job_id: str) -> Proposal:
    """Propose ``job_id`` here and accept it, with the data owner answering that it accepted too."""
    p = _proposal(dep, job_id)
    party.propose(ALICE, p)
    party.accept(ALICE, job_id, p.terms_digest)
    peers.answers["hospital", job_id] = RemoteStatus(JobState.ACCEPTED, p.terms_digest, p.digest())
    return p


def _wait(party: Party, job_id: str, state: JobState, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while party.status(ALICE, job_id).state is not state:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(
                f"{job_id} is {party.status(ALICE, job_id).state}, expected {state}"
            )
        time.sleep(0.02)


def test_only_pinned_identities_and_operators_for_accept(
    deployment: Deployment, tmp_path: Path
) -> None:
    party, _ = _party(deployment, "data_owner", tmp_path)
    try:
        with pytest.raises(NotAuthorizedError, match="operator/mallory is not pinned"):
            party.authorize(Identity(IdentityRole.OPERATOR, "mallory"), "Status")
        with pytest.raises(NotAuthorizedError, match="no secfwt identity"):
            party.authorize(None, "Status")
        party.authorize(VENDOR, "Propose")
        with pytest.raises(NotAuthorizedError, match="only operators"):
            party.authorize(VENDOR, "Accept")
        with pytest.raises(NotAuthorizedError, match="only operators"):
            party.authorize(VENDOR, "FetchArtifacts")
        party.authorize(ALICE, "Accept")
    finally:
        party.close(timeout=1)
    raw_ops = [{"id": OPERATOR}, {"id": "bob", "accept": False}]
    party, _ = _party(deployment, "data_owner", tmp_path / "b", operators=raw_ops)
    try:
        bob = Identity(IdentityRole.OPERATOR, "bob")
        party.authorize(bob, "Propose")
        with pytest.raises(
            NotAuthorizedError, match="operator/bob is an operator with accept = false here"
        ):
            party.authorize(bob, "Accept")
    finally:
        party.close(timeout=1)


def test_proposal_checks(deployment: Deployment, tmp_path: Path) -> None:
    party, _ = _party(deployment, "model_owner", tmp_path)
    try:
        with pytest.raises(VersionMismatchError, match="version 2, this daemon speaks version 1"):
            party.propose(ALICE, _proposal(deployment, protocol_version=2))
        with pytest.raises(InvalidRequestError, match="job id"):
            party.propose(ALICE, _proposal(deployment, job_id="../etc"))
        bad = _proposal(deployment, "bad-weights")
        wrong = ModelCommitment(
            bad.commitments.model.model_type, bad.commitments.model.dimensions, "0" * 64
        )
        with pytest.raises(CommitmentMismatchError, match="weights_sha256: proposal says 0000"):
            party.propose(
                ALICE,
                dataclasses.replace(
                    bad, commitments=Commitments(model=wrong, data=bad.commitments.data)
                ),
            )
        assert party.status(ALICE, "bad-weights").state is JobState.REFUSED
        with pytest.raises(TermsMismatchError, match="terms digest mismatch"):
            party.propose(ALICE, _proposal(deployment, "bad-digest", terms_digest="f" * 64))
        p = _proposal(deployment, "bad-participant")
        with pytest.raises(
            NotAuthorizedError,
            match="names model_owner/other as model_owner but this daemon is model_owner/vendor",
        ):
            party.propose(
                ALICE,
                dataclasses.replace(
                    p, participants=(Identity(IdentityRole.MODEL_OWNER, "other"), HOSPITAL, DEALER)
                ),
            )
        with pytest.raises(NotAuthorizedError, match="data_owner/other is not a pinned peer"):
            party.propose(
                ALICE,
                dataclasses.replace(
                    p,
                    job_id="bad-2",
                    participants=(VENDOR, Identity(IdentityRole.DATA_OWNER, "other"), DEALER),
                ),
            )
        party.propose(ALICE, _proposal(deployment, "ok"))
        with pytest.raises(JobExistsError, match="replay refused"):
            party.propose(ALICE, _proposal(deployment, "ok"))
        with pytest.raises(JobExistsError):  # a refused id is burnt too
            party.propose(ALICE, _proposal(deployment, "bad-weights"))
        tfp = deployment.job_file.read_text().replace("seed = 0", 'seed = 0\nprovider = "tfp"')
        with pytest.raises(InvalidRequestError, match="provider = 'tfp'"):
            party.propose(ALICE, _proposal(deployment, "tfp", job_toml=tfp))
    finally:
        party.close(timeout=1)


def test_data_owner_checks_dataset_commitment(deployment: Deployment, tmp_path: Path) -> None:
    party, _ = _party(deployment, "data_owner", tmp_path)
    try:
        p = _proposal(deployment)
        wrong = dataclasses.replace(p.commitments.data, rows=21)
        with pytest.raises(
            CommitmentMismatchError, match="rows: proposal says 21, this data owner holds 20"
        ):
            party.propose(
                VENDOR,
                dataclasses.replace(
                    p, commitments=Commitments(model=p.commitments.model, data=wrong)
                ),
            )
    finally:
        party.close(timeout=1)


def test_data_owner_commits_to_its_instruction_pairs(tmp_path: Path) -> None:
    """A causal-LM job's data owner vouches for the pairs it holds and the input it shares."""
    from secfwt.config import load_job
    from secfwt.data.datasets import DataSource
    from secfwt.errors import DataError
    from secfwt.server.config import HeldData
    from secfwt.server.holdings import DataHoldings
    from tests.conftest import write_chat_job

    rows = [{"ask": f"question {i}?", "say": f"answer {i}."} for i in range(15)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = DataHoldings(
        HeldData(
            source=DataSource.JSONL, path=str(data), prompt_column="ask", response_column="say"
        )
    )
    job = write_chat_job(tmp_path, tmp_path / "model")  # 8 train + 4 held-out pairs, length 40
    c = held.commitment(load_job(job))
    assert (c.rows, c.num_classes, c.input_shape) == (15, 0, (12, 40))
    with pytest.raises(DataError, match=r"data.train_rows/eval_rows: .* 8 training \+ 12 held-out"):
        held.commitment(load_job(job, overrides=["data.eval_rows=12"]))


def test_a_data_owner_reads_its_own_data_but_agrees_on_the_job_files_settings(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The daemon's data owner reads the rows its party.toml names; the settings both owners'
    processes agree on (their digest) stay the job file's, as the model owner's do."""
    from secfwt.data.datasets import DataSource
    from secfwt.runtime.contract import public_job_digest
    from secfwt.server.runner import JobContext, party_payload

    cfg = parse_job_text(deployment.job_file.read_text(), where="job")  # rotten_tomatoes
    party = deployment.party_config("data_owner", data={"tokenizer": str(deployment.model_dir)})
    ctx = JobContext(
        job_id="j",
        role=Role.DATA_OWNER,
        identity=HOSPITAL,
        job=cfg,
        proposal=_proposal(deployment),
        peers={},
        party=party,
        work_dir=tmp_path,
        artifacts_dir=tmp_path,
        resume=False,
    )
    payload = party_payload(ctx)
    assert public_job_digest(payload.config) == public_job_digest(cfg)  # the model owner's
    assert payload.held_data is not None
    held = payload.held_data
    assert (held.source, held.path) == (DataSource.JSONL, str(deployment.data_file))


def test_start_needs_own_and_other_owner_acceptance_of_same_digests(
    deployment: Deployment, tmp_path: Path
) -> None:
    runner = EchoRunner()
    party, peers = _party(deployment, "model_owner", tmp_path, runner=runner)
    try:
        p = _proposal(deployment)
        party.propose(ALICE, p)
        with pytest.raises(JobStateError, match="cannot start job job-1: it is proposed"):
            party.start(ALICE, "job-1")
        with pytest.raises(TermsMismatchError, match="you accepted terms digest"):
            party.accept(ALICE, "job-1", "e" * 64)
        party.accept(ALICE, "job-1", p.terms_digest, p.digest())
        with pytest.raises(JobStateError, match="data_owner/hospital does not hold this job"):
            party.start(VENDOR, "job-1")
        peers.answers["hospital", "job-1"] = RemoteStatus(JobState.PROPOSED, "", "")
        with pytest.raises(JobStateError, match="has not accepted the terms yet"):
            party.start(ALICE, "job-1")
        assert party.status(ALICE, "job-1").state is JobState.ACCEPTED
        peers.answers["hospital", "job-1"] = RemoteStatus(
            JobState.ACCEPTED, p.terms_digest, p.digest()
        )
        party.start(ALICE, "job-1")
        _wait(party, "job-1", JobState.FINISHED)
        assert runner.calls == ["job-1"]
        assert [f.name for f in party.artifact_files(ALICE, "job-1")] == [
            "echo.json",
            "summary.json",
        ]
    finally:
        party.close(timeout=1)


def test_digest_mismatch_between_owners_never_starts(
    deployment: Deployment, tmp_path: Path
) -> None:
    runner = EchoRunner()
    party, peers = _party(deployment, "dealer", tmp_path, runner=runner)
    try:
        p = _proposal(deployment)
        party.propose(VENDOR, p)
        party.accept(ALICE, "job-1", p.terms_digest)
        peers.answers["vendor", "job-1"] = RemoteStatus(
            JobState.ACCEPTED, p.terms_digest, p.digest()
        )
        peers.answers["hospital", "job-1"] = RemoteStatus(JobState.ACCEPTED, "a" * 64, p.digest())
        with pytest.raises(
            TermsMismatchError,
            match=f"dealer/dealer accepted {p.terms_digest}, data_owner/hospital accepted a{{64}}",
        ):
            party.start(ALICE, "job-1")
        st = party.status(ALICE, "job-1")
        assert st.state is JobState.FAILED and "never starts" in st.reason
        with pytest.raises(JobStateError):
            party.start(ALICE, "job-1")
        time.sleep(0.3)
        assert runner.calls == []
    finally:
        party.close(timeout=1)


def test_queue_is_bounded_fifo_and_cancel(deployment: Deployment, tmp_path: Path) -> None:
    runner = BlockingRunner()
    party, peers = _party(
        deployment, "model_owner", tmp_path, runner=runner, limits={"queue_size": 1}
    )
    try:
        for i in range(3):
            _accepted(party, peers, deployment, f"q{i}")
        party.start(ALICE, "q0")
        assert runner.started.wait(5)
        party.start(ALICE, "q1")  # waits in the queue
        with pytest.raises(BusyError, match="queue of model_owner/vendor is full"):
            party.start(ALICE, "q2")
        assert party.status(ALICE, "q2").state is JobState.ACCEPTED
        party.cancel(ALICE, "q1", "not needed")
        assert party.status(ALICE, "q1").state is JobState.CANCELLED
        party.cancel(ALICE, "q0", "")
        _wait(party, "q0", JobState.CANCELLED)
        assert "cancelled by operator/alice" in party.status(ALICE, "q0").reason
        with pytest.raises(JobStateError, match="already cancelled"):
            party.cancel(ALICE, "q0", "")
    finally:
        party.close(timeout=1)


def test_restart_keeps_results_and_marks_interrupted_jobs(
    deployment: Deployment, tmp_path: Path
) -> None:
    runner = EchoRunner()
    party, peers = _party(deployment, "model_owner", tmp_path, runner=runner)
    p = _accepted(party, peers, deployment, "done")
    party.start(ALICE, "done")
    _wait(party, "done", JobState.FINISHED)
    party.close(timeout=1)
    again, peers2 = _party(deployment, "model_owner", tmp_path, runner=runner)
    try:
        st = again.status(ALICE, "done")
        assert st.state is JobState.FINISHED and st.artifacts == ("echo.json", "summary.json")
        assert [f.name for f in again.artifact_files(ALICE, "done")] == [
            "echo.json",
            "summary.json",
        ]
        events = list(again.watch(ALICE, "done", 0, active=lambda: True))
        assert [e.state for e in events][-1] is JobState.FINISHED and any(
            e.step == 3 for e in events
        )
        with pytest.raises(JobExistsError):
            again.propose(ALICE, p)
        peers2.answers["hospital", "done"] = RemoteStatus(
            JobState.FAILED, p.terms_digest, p.digest()
        )
        with pytest.raises(JobStateError, match="resume needs it cancelled or failed"):
            again.resume(ALICE, "done")
    finally:
        again.close(timeout=1)


def test_resume_after_interrupted_run(deployment: Deployment, tmp_path: Path) -> None:
    runner = BlockingRunner()
    party, peers = _party(deployment, "model_owner", tmp_path, runner=runner)
    p = _accepted(party, peers, deployment, "long")
    party.start(ALICE, "long")
    assert runner.started.wait(5)
    party.close(timeout=2)  # shutdown cancels the running job: resumable
    assert party.status(ALICE, "long").state is JobState.CANCELLED
    echo = EchoRunner()
    again, peers2 = _party(deployment, "model_owner", tmp_path, runner=echo)
    try:
        for peer in ("hospital", "dealer"):
            peers2.answers[peer, "long"] = RemoteStatus(
                JobState.CANCELLED, p.terms_digest, p.digest()
            )
        again.resume(ALICE, "long")
        _wait(again, "long", JobState.FINISHED)
        st = again.status(ALICE, "long")
        assert st.attempts == 2 and st.resume_requested
        assert '"resume": true' in (again.store.artifacts_dir("long") / "echo.json").read_text()
    finally:
        again.close(timeout=1)


def test_mpc_runner_setup_error_fails_the_job_with_the_fix(
    deployment: Deployment, tmp_path: Path
) -> None:
    """listen port 0 leaves no MPC port to derive: the job fails naming the setting, the party
    serves on."""
    from secfwt.server.runner import MpcJobRunner

    party, peers = _party(deployment, "model_owner", tmp_path, runner=MpcJobRunner())
    try:
        _accepted(party, peers, deployment, "job-1")
        party.start(ALICE, "job-1")
        _wait(party, "job-1", JobState.FAILED)
        assert (
            "party.mpc_listen" in party.status(ALICE, "job-1").reason
            and "set it explicitly" in party.status(ALICE, "job-1").reason
        )
        party.propose(ALICE, _proposal(deployment, "job-2"))  # still serving
    finally:
        party.close(timeout=1)


def test_role_of_participants(deployment: Deployment) -> None:
    p = _proposal(deployment)
    assert p.participant(Role.DATA_OWNER) == HOSPITAL


def test_progress_streams_are_bounded(deployment: Deployment, tmp_path: Path) -> None:
    party, _ = _party(deployment, "model_owner", tmp_path, limits={"max_streams": 1})
    try:
        party.propose(ALICE, _proposal(deployment, "w"))
        first = party.watch(ALICE, "w", 0, active=lambda: True, poll_s=0.05)
        assert next(first).state is JobState.PROPOSED  # holds the only stream slot
        with pytest.raises(BusyError, match="limits.max_streams"):
            next(party.watch(ALICE, "w", 0, active=lambda: True))
        first.close()
        assert next(party.watch(ALICE, "w", 0, active=lambda: True)).seq == 1
    finally:
        party.close(timeout=1)


def test_restart_after_a_crash_fails_the_running_job_resumably(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A daemon killed while a job runs (no shutdown): the next start marks it failed, resumable."""
    runner = BlockingRunner()
    party, peers = _party(deployment, "model_owner", tmp_path, runner=runner)
    p = _accepted(party, peers, deployment, "crash")
    party.start(ALICE, "crash")
    assert runner.started.wait(5)
    # No close(): the record on disk says running, as after a SIGKILL.
    again, peers2 = _party(deployment, "model_owner", tmp_path, runner=EchoRunner())
    try:
        st = again.status(ALICE, "crash")
        assert st.state is JobState.FAILED and "interrupted" in st.reason
        for peer in ("hospital", "dealer"):
            peers2.answers[peer, "crash"] = RemoteStatus(
                JobState.FAILED, p.terms_digest, p.digest()
            )
        again.resume(ALICE, "crash")
        _wait(again, "crash", JobState.FINISHED)
    finally:
        again.close(timeout=1)
        runner.release.set()
        party.close(timeout=1)


def test_who_may_resume_a_cancelled_job(deployment: Deployment, tmp_path: Path) -> None:
    """A peer's cancel is no veto; another party's operator's cancel is, unless this party's own
    operator cancelled it too (then each party's operator lifts its own, in any order)."""
    runner = BlockingRunner()
    party, peers = _party(deployment, "model_owner", tmp_path, runner=runner)
    other_op = "secfwt://operator/bob"  # an operator of the data owner
    try:
        for name in ("Resume", "Remove"):
            with pytest.raises(NotAuthorizedError, match="only operators"):
                party.authorize(DEALER, name)
        for job_id, here_by, there_by, refused in (
            ("peer-cancel", HOSPITAL, HOSPITAL.uri, False),
            ("their-veto", HOSPITAL, other_op, True),
            ("both-vetoes", ALICE, other_op, False),
        ):
            p = _accepted(party, peers, deployment, job_id)
            party.cancel(here_by, job_id, "stop")
            assert party.status(ALICE, job_id).cancelled_by == here_by.uri
            for peer, by in (("hospital", there_by), ("dealer", VENDOR.uri)):
                peers.answers[peer, job_id] = RemoteStatus(
                    JobState.CANCELLED, p.terms_digest, p.digest(), "stop", by
                )
            if refused:
                with pytest.raises(
                    JobStateError,
                    match="data_owner/hospital's operator operator/bob cancelled it there",
                ):
                    party.resume(ALICE, job_id)
                assert party.status(ALICE, job_id).state is JobState.CANCELLED
            else:
                st = party.resume(ALICE, job_id)
                assert st.state is JobState.STARTED and st.cancelled_by == ""
                party.cancel(ALICE, job_id, "done")  # the next one may run
                _wait(party, job_id, JobState.CANCELLED)
    finally:
        party.close(timeout=1)


def test_a_removal_cut_short_by_a_crash_is_finished_at_restart(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The removal note is written first, the files deleted after: a daemon that died between
    the two deletes them when it starts, and answers for the job as removed."""
    party, _ = _party(deployment, "model_owner", tmp_path)
    party.propose(ALICE, _proposal(deployment, "half"))
    party.refuse(ALICE, "half", "no")
    party.close(timeout=1)
    folder = party.store.job_dir("half")
    (folder / "removed.json").write_text(json.dumps({"job_id": "half", "why": "test", "time": 0}))
    again, _ = _party(deployment, "model_owner", tmp_path)
    try:
        assert sorted(p.name for p in folder.iterdir()) == ["removed.json"]
        with pytest.raises(JobNotFoundError, match="was removed from model_owner/vendor"):
            again.status(ALICE, "half")
        with pytest.raises(JobExistsError):
            again.propose(ALICE, _proposal(deployment, "half"))
    finally:
        again.close(timeout=1)
