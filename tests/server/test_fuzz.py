"""Property-based fuzzing of real daemons over mutual TLS (hypothesis, derandomized: stable).

Two ``secfwt party`` processes (the model owner and the data owner: the parties that parse job
files and compute commitments) run from empty working folders. Hypothesis draws requests for
every RPC (:mod:`tests.server.fuzzing`: random bytes, generated messages with odd identifiers,
hostile job files and extreme numbers, valid messages mutated byte by byte) and sends each as
one of four callers: a pinned operator, a pinned operator without accept rights, a pinned peer
daemon, an unpinned holder of a deployment certificate. After every call:

- the answer is a status the daemon chose: never INTERNAL, UNKNOWN, UNAVAILABLE (a crash),
  DATA_LOSS or UNIMPLEMENTED; a deadline only for a watch of a live job with nothing new;
- the process is alive, and its log (stderr and ``daemon.log``) grew by at most
  :data:`LOG_BYTES_PER_CALL`;

and at the end both are SERVING, every job folder holds a readable record with readable
progress events (or only a removal note), Status agrees with the record, and nothing was written
outside the state folders. ``SECFWT_FUZZ_EXAMPLES`` sets the number of calls (default 1200),
``SECFWT_FUZZ_SEED`` draws other requests than the fixed ones of the default run.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from secfwt.errors import ProtocolError
from secfwt.server.convert import proposal_to_pb
from secfwt.server.protocol import JobRecord, ProgressEvent
from secfwt.v1 import party_pb2 as pb
from tests.server.conftest import IDS, OPERATOR, Deployment, free_port, to_toml
from tests.server.fuzzing import STREAMING, Valid, requests
from tests.server.test_jobs import _proposal
from tests.server.test_process import _spawn, _stop, _wait_ready

EXAMPLES = int(os.environ.get("SECFWT_FUZZ_EXAMPLES", "1200"))
#: A campaign with other draws than CI's: ``SECFWT_FUZZ_SEED=N`` (default: derandomized).
SEED = os.environ.get("SECFWT_FUZZ_SEED")
#: What one call may add to a daemon's log, whatever it carried: a refusal is one line with its
#: reason clipped (secfwt.server.logs), an unexpected error a clipped traceback.
LOG_BYTES_PER_CALL = 8192
NEVER = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
}
ROLES = ("model_owner", "data_owner")
CALLERS = ("alice", "bob", "peer", "mallory")  # bob: an operator with accept = false


class Daemon:
    """One ``secfwt party`` process and what the fuzzer watches of it."""

    def __init__(self, dep: Deployment, role: str, root: Path) -> None:
        self.role = role
        self.state = root / f"state-{role}"
        self.cwd = root / f"cwd-{role}"
        self.cwd.mkdir()
        self.stderr = root / f"{role}.stderr"
        other = "data_owner" if role == "model_owner" else "model_owner"
        raw = dep.party_raw(
            role,
            listen=f"127.0.0.1:{free_port()}",
            peers={other: "127.0.0.1:1", "dealer": "127.0.0.1:1"},  # never reached: no job runs
            state=str(self.state),
            operators=[{"id": OPERATOR}, {"id": "bob", "accept": False}],
            limits={"max_proposals_per_caller": 6},
            jobs={"peer_timeout_s": 2.0},
        )
        cfg = root / f"{role}.toml"
        cfg.write_text(to_toml(raw))
        args = ["-m", "secfwt.cli", "party", role.replace("_", "-"), "--config", str(cfg)]
        self.proc = _spawn(args, self.stderr, cwd=self.cwd)
        self.address = ""
        self.peer_id = IDS[other]

    def log_bytes(self) -> tuple[int, int]:
        log = self.state / "daemon.log"
        return self.stderr.stat().st_size, log.stat().st_size if log.is_file() else 0


@pytest.fixture(scope="module")
def fuzzed(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("fuzz")
    deployment.add_operator("bob")
    daemons = {r: Daemon(deployment, r, root) for r in ROLES}  # both start at once
    try:
        for d in daemons.values():
            d.address = _wait_ready(d.proc, d.state, d.stderr)
        yield daemons
    finally:
        for d in daemons.values():
            if d.proc.poll() is None:
                _stop(d.proc)


def _seed_jobs(dep: Deployment, daemons: dict[str, Daemon]) -> Valid:
    """A valid proposal, and jobs in each state the fuzzer can reach (proposed, accepted,
    refused, cancelled) at both daemons."""

    p = _proposal(
        dep,
        "fz-proposed",
        mo=SimpleNamespace(address=daemons["model_owner"].address),
        do=SimpleNamespace(address=daemons["data_owner"].address),
    )
    bad = replace(p.commitments, model=replace(p.commitments.model, weights_sha256="0" * 64))
    for d in daemons.values():
        with dep.client(d.address) as c:
            for job_id in ("fz-proposed", "fz-accepted", "fz-cancelled"):
                c.propose(replace(p, job_id=job_id))
            for job_id in ("fz-accepted", "fz-cancelled"):
                c.accept(job_id, p.terms_digest)
            c.cancel("fz-cancelled", "seed")
            if d.role == "model_owner":
                with pytest.raises(ProtocolError, match="model commitment mismatch"):
                    c.propose(replace(p, job_id="fz-refused", commitments=bad))
    ids = ["fz-proposed", "fz-accepted", "fz-cancelled", "fz-refused"]
    return Valid(proposal=proposal_to_pb(p), job_ids=ids)


def _call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    path = f"/secfwt.v1.PartyService/{method}"
    try:
        if method in STREAMING:  # the first message (or the error), then hang up
            call = channel.unary_stream(path)(
                payload, timeout=3 if method == "WatchProgress" else 20
            )
            try:
                next(call)
            except StopIteration:
                pass
            finally:
                call.cancel()
        else:
            channel.unary_unary(path)(payload, timeout=20)
    except grpc.RpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.CANCELLED:  # our own hang-up after the first message
            return grpc.StatusCode.OK
        assert code not in NEVER, (method, code, exc.details())
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            assert method == "WatchProgress", (method, exc.details())
        return code
    return grpc.StatusCode.OK


def _check_state(dep: Deployment, d: Daemon) -> int:
    """Every job folder is a readable record with readable events, or only a removal note; the
    daemon's Status agrees. Returns the number of jobs held."""
    held = 0
    assert {p.name for p in d.state.iterdir()} <= {"jobs", "daemon.json", "daemon.log"}
    with dep.client(d.address) as c:
        for job in sorted((d.state / "jobs").iterdir()):
            names = {p.name for p in job.iterdir()}
            if "removed.json" in names:
                assert names == {"removed.json"}, (job, names)
                assert json.loads((job / "removed.json").read_text())["job_id"] == job.name
                continue
            assert names == {"job.json", "events.jsonl", "artifacts", "work"}, (job, names)
            rec = JobRecord.from_dict(json.loads((job / "job.json").read_text()))
            assert rec.job_id == job.name
            lines = (job / "events.jsonl").read_text().splitlines()
            events = [ProgressEvent.from_dict(json.loads(line)) for line in lines]
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert events[-1].state is rec.state
            st = c.status(rec.job_id)
            assert pb.JobState.Name(st.state) == f"JOB_STATE_{rec.state.name}"
            held += 1
    return held


def test_fuzzing_the_daemons_over_mutual_tls(
    deployment: Deployment, fuzzed: dict[str, Daemon], capsys: pytest.CaptureFixture[str]
) -> None:
    valid = _seed_jobs(deployment, fuzzed)
    clients = {
        (role, caller): deployment.client(
            d.address,
            {"alice": OPERATOR, "bob": "bob", "peer": d.peer_id, "mallory": "mallory"}[caller],
        )
        for role, d in fuzzed.items()
        for caller in CALLERS
    }
    seen: collections.Counter[str] = collections.Counter()
    most_logged = [0]
    t0 = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        derandomize=SEED is None,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one_call(data: st.DataObject) -> None:
        role = data.draw(st.sampled_from(ROLES))
        caller = data.draw(st.sampled_from(CALLERS[:1] * 3 + CALLERS))  # mostly alice
        method, payload = data.draw(requests(valid))
        d = fuzzed[role]
        before = d.log_bytes()
        code = _call(clients[role, caller].channel, method, payload)
        seen[code.name] += 1
        assert d.proc.poll() is None, f"{role} exited {d.proc.returncode} after {method}"
        grown = max(after - b for after, b in zip(d.log_bytes(), before, strict=True))
        most_logged[0] = max(most_logged[0], grown)
        assert grown <= LOG_BYTES_PER_CALL, (method, len(payload), grown)

    try:
        (seed(int(SEED))(one_call) if SEED else one_call)()
    finally:
        for c in clients.values():
            c.close()
    held = {}
    for role, d in fuzzed.items():
        with deployment.client(d.address) as c:
            assert c.health() == "SERVING" and c.health("secfwt.v1.PartyService") == "SERVING"
        held[role] = _check_state(deployment, d)
        assert list(d.cwd.iterdir()) == [], f"{role} wrote outside its state folder"
    with capsys.disabled():
        print(
            f"\nfuzz: {sum(seen.values())} calls in {time.monotonic() - t0:.0f} s, "
            f"{dict(sorted(seen.items()))}; most log bytes per call {most_logged[0]}; "
            f"jobs held {held}"
        )
