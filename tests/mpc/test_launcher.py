"""The local runtime: real party processes (forked from the fork server, or spawned), failures
propagated, nothing left behind, not even when the launcher is killed.

The failure tests are one contract run over both transports (the ``transport`` fixture): gloo
and the TLS mesh must each re-raise a party's own error, name a killed party, and end every
process on a timeout. How fast a survivor notices a lost peer by itself is the TLS mesh's
heartbeat (``test_transport_faults.py``); gloo has none.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
from types import SimpleNamespace

import pytest
import torch

from secfwt.errors import ConfigError, PartyFailedError, ProtocolError
from secfwt.mpc.launcher import START_ENV, PartyContext, _blame_the_dead, run_parties
from secfwt.mpc.provider import Provider
from secfwt.mpc.transport import Transport
from secfwt.roles import Role

pytestmark = pytest.mark.multiprocess


def _multiply(ctx: PartyContext, payload):
    from secfwt.crypten_compat import crypten

    x = crypten.cryptensor(
        payload if ctx.role is Role.DATA_OWNER else torch.zeros(3), src=Role.DATA_OWNER.rank
    )
    w = crypten.cryptensor(
        payload if ctx.role is Role.MODEL_OWNER else torch.zeros(3), src=Role.MODEL_OWNER.rank
    )
    y = x * w
    return {"pid": os.getpid(), "share": y.share.clone()}


def _fail_on_data_owner(ctx: PartyContext, payload):
    if ctx.role is Role.DATA_OWNER:
        raise ConfigError("data.path: bad file")
    time.sleep(600)  # the model owner would wait for its peer (far beyond any test timeout)


def _die_on_model_owner(ctx: PartyContext, payload):
    if ctx.role is Role.MODEL_OWNER:
        os._exit(9)
    time.sleep(600)


def _die_mid_protocol(ctx: PartyContext, payload):
    """Both parties multiply in a loop; the model owner dies between two rounds."""
    from secfwt.crypten_compat import crypten

    x = crypten.cryptensor(torch.ones(4, 4), src=Role.MODEL_OWNER.rank)
    for i in range(1000):
        if i == 2 and ctx.role is Role.MODEL_OWNER:
            os._exit(9)
        x.matmul(x).get_plain_text()


def _hang(ctx: PartyContext, payload):
    time.sleep(600)


@pytest.fixture(params=list(Transport), ids=lambda t: t.value)
def transport(request) -> Transport:
    return request.param


def _run_ttp(target, *, transport: Transport, timeout_s: float, payloads=None):
    """``run_parties`` with the dealer process (TTP) over ``transport``."""
    payloads = payloads or {}
    return run_parties(
        target, payloads=payloads, provider=Provider.TTP, timeout_s=timeout_s, transport=transport
    )


def _no_children_left():
    deadline = time.monotonic() + 10
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not mp.active_children()


@pytest.mark.parametrize(
    ("provider", "start"),
    [(Provider.TTP, "forkserver"), (Provider.TFP, "forkserver"), (Provider.TTP, "spawn")],
)
def test_parties_run_in_separate_processes_and_shares_reconstruct(provider, start, monkeypatch):
    monkeypatch.setenv(START_ENV, start)
    res = run_parties(
        _multiply,
        payloads={
            Role.MODEL_OWNER: torch.tensor([1.0, 2.0, 3.0]),
            Role.DATA_OWNER: torch.tensor([4.0, -5.0, 6.5]),
        },
        provider=provider,
        timeout_s=120,
    )
    mo, do = res[Role.MODEL_OWNER], res[Role.DATA_OWNER]
    assert mo.value["pid"] != do.value["pid"] != os.getpid()
    # each share alone looks random; their sum is the product in 16-bit fixed point
    total = (mo.value["share"] + do.value["share"]).double() / 2**16
    assert torch.allclose(total, torch.tensor([4.0, -10.0, 19.5], dtype=torch.float64), atol=1e-3)
    assert not torch.allclose(do.value["share"].double() / 2**16, total, atol=1.0)
    assert mo.bytes_sent > 0 and do.rounds > 0
    assert (Role.DEALER in res) == (provider is Provider.TTP)
    assert _no_children_left()


def test_a_party_error_is_reraised_and_every_process_stops(transport):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="data.path: bad file"):
        _run_ttp(_fail_on_data_owner, transport=transport, timeout_s=120)
    assert time.monotonic() - t0 < 300  # liveness, not speed: it did not wait out the peer's 600 s
    assert _no_children_left()


def _assert_names_the_killed_model_owner(err: ProtocolError, transport: Transport) -> None:
    """The launcher saw the exit code first, or (TLS) a survivor's mesh reported the lost peer."""
    if isinstance(err, PartyFailedError):
        assert (err.role, err.reason) == ("model_owner", "process exited with code 9"), err
    else:
        assert transport is Transport.TLS and "lost model_owner" in str(err), err


def test_a_killed_party_is_reported_with_its_role(transport):
    with pytest.raises(ProtocolError) as err:
        _run_ttp(_die_on_model_owner, transport=transport, timeout_s=120)
    assert _no_children_left()
    _assert_names_the_killed_model_owner(err.value, transport)


def test_a_party_killed_mid_protocol_is_the_one_named(transport):
    """The survivor blocked on the dead party fails too; the error must still name the dead one
    (on gloo the survivor's "Connection reset by peer" usually arrives before the exit code)."""
    with pytest.raises(ProtocolError) as err:
        _run_ttp(_die_mid_protocol, transport=transport, timeout_s=120)
    assert _no_children_left()
    _assert_names_the_killed_model_owner(err.value, transport)


def test_timeout_stops_all_parties(transport):
    with pytest.raises(ProtocolError, match="did not finish within 3 s"):
        _run_ttp(_hang, transport=transport, timeout_s=3)
    assert _no_children_left()


def test_a_party_that_cannot_start_is_reported_and_the_started_ones_are_stopped(transport):
    # the model owner starts (and would hang); the data owner's payload holds a closed pipe end,
    # which multiprocessing cannot hand over, so its start() fails: that error must reach the
    # caller (not one about joining a process that never started) and the model owner must not
    # be left running
    reader, _ = mp.Pipe(duplex=False)
    reader.close()
    payloads = {Role.DATA_OWNER: {"pipe": reader}}
    with pytest.raises(OSError, match="handle is closed"):
        _run_ttp(_hang, transport=transport, timeout_s=60, payloads=payloads)
    assert _no_children_left()


def test_a_payload_that_cannot_be_pickled_stops_the_run_before_any_party_starts():
    with pytest.raises((AttributeError, pickle.PicklingError), match="pickle"):
        _run_ttp(
            _hang, transport=Transport.GLOO, timeout_s=60, payloads={Role.DATA_OWNER: lambda: None}
        )
    assert _no_children_left()


def _sum_and_report(ctx: PartyContext, payload):
    payload["progress"].put((ctx.role, len(payload["tensors"])))
    return float(sum(t.sum() for t in payload["tensors"]))


@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_a_payload_of_many_tensors_arrives_with_its_queue(start, monkeypatch):
    """Tensors go by value, not one shared-memory file descriptor each (the fork server passes
    at most 256; a decoder's weights are several hundred tensors), and a queue in the payload
    still reaches the party as multiprocessing hands it over."""
    from secfwt.mpc.launcher import new_queue

    monkeypatch.setenv(START_ENV, start)
    progress = new_queue()
    tensors = [torch.full((3,), float(i)) for i in range(400)]
    payload = {"tensors": tensors, "progress": progress}
    res = run_parties(
        _sum_and_report,
        payloads={Role.MODEL_OWNER: payload, Role.DATA_OWNER: payload},
        provider=Provider.TTP,
        timeout_s=120,
    )
    assert res[Role.MODEL_OWNER].value == res[Role.DATA_OWNER].value == 3 * sum(range(400))
    reports = dict(progress.get(timeout=10) for _ in range(2))
    assert reports == {Role.MODEL_OWNER: 400, Role.DATA_OWNER: 400}
    assert _no_children_left()


def _error_item(role: Role) -> tuple:
    return ("error", role, None, f"{role.value}: Connection closed by peer", "")


@pytest.mark.parametrize(
    "queued",
    [[], [Role.DEALER], [Role.DEALER, Role.DEALER]],
    ids=["nothing-else-queued", "another-survivor-reported", "reports-keep-coming"],
)
def test_the_silent_dead_party_is_blamed_whatever_else_is_queued(queued):
    """The killed party is named even when another survivor's report is read while looking for
    its own (that once ended the search early: CI named the survivor instead)."""
    procs = {
        Role.MODEL_OWNER: SimpleNamespace(exitcode=9),
        Role.DATA_OWNER: SimpleNamespace(exitcode=1),
        Role.DEALER: SimpleNamespace(exitcode=1),
    }
    results = queue.Queue()
    for role in queued:
        results.put(_error_item(role))
    with pytest.raises(PartyFailedError) as err:
        _blame_the_dead(procs, results, reporter=Role.DATA_OWNER, reported=set())
    assert (err.value.role, err.value.reason) == ("model_owner", "process exited with code 9")


def test_a_party_that_reported_before_exiting_is_not_blamed():
    procs = {
        Role.MODEL_OWNER: SimpleNamespace(exitcode=1),
        Role.DATA_OWNER: SimpleNamespace(exitcode=1),
        Role.DEALER: SimpleNamespace(exitcode=0),
    }
    results = queue.Queue()
    results.put(_error_item(Role.MODEL_OWNER))
    _blame_the_dead(procs, results, reporter=Role.DATA_OWNER, reported=set())
    assert results.get_nowait()[1] is Role.MODEL_OWNER  # put back for the caller


def _environment_and_draws(ctx: PartyContext, payload):
    import random

    import numpy as np

    return {
        "mark": os.environ.get(payload),
        "torch": int(torch.randint(-(2**63), 2**63 - 1, size=())),  # as CrypTen's dealer draws
        "numpy": float(np.random.random()),
        "random": random.random(),
        "parent": os.getppid(),
    }


def test_a_forked_party_starts_as_a_spawned_one(monkeypatch):
    """A party forked from the fork server sees the launcher's environment of the moment (the
    server keeps the one it started with) and draws its own torch, numpy and ``random`` streams,
    in every run (a fork copies the server's generator states into every party: the dealer's
    seeds, drawn from torch's default generator, would repeat from job to job)."""

    def run():
        payloads = {Role.MODEL_OWNER: "SECFWT_TEST_MARK", Role.DATA_OWNER: "SECFWT_TEST_MARK"}
        res = run_parties(
            _environment_and_draws, payloads=payloads, provider=Provider.TTP, timeout_s=120
        )
        return res[Role.MODEL_OWNER].value, res[Role.DATA_OWNER].value

    first, _ = run()
    assert first["mark"] is None
    # the server is up now, started without the variable
    monkeypatch.setenv("SECFWT_TEST_MARK", "set after the fork server started")
    mo, do = run()
    assert mo["mark"] == do["mark"] == "set after the fork server started"
    assert mo["parent"] == do["parent"] != os.getpid()  # forked from the server, not spawned
    for stream in ("torch", "numpy", "random"):
        assert len({first[stream], mo[stream], do[stream]}) == 3, stream
    assert _no_children_left()


def test_a_bad_start_method_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(START_ENV, "fork")
    with pytest.raises(ConfigError, match=f"{START_ENV}='fork'.*'forkserver'.*'spawn'"):
        run_parties(_hang, payloads={}, provider=Provider.TTP, timeout_s=10)
    assert _no_children_left()


_LAUNCHER = """
import sys
from secfwt.mpc.launcher import run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
sys.path.insert(0, {tests!r})
from test_launcher import _report_and_hang

payloads = {{role: {folder!r} for role in (Role.MODEL_OWNER, Role.DATA_OWNER)}}
run_parties(_report_and_hang, payloads=payloads, provider=Provider.TTP, timeout_s=600)
"""


def _report_and_hang(ctx: PartyContext, payload):
    from pathlib import Path

    Path(payload, f"{ctx.role.value}.pids").write_text(f"{os.getpid()} {os.getppid()}")
    time.sleep(600)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_the_parties_exit_when_the_launcher_is_killed(tmp_path, start):
    """A launcher killed with SIGKILL (no ``finally`` runs) leaves no party running: each party
    exits when its parent changes (the launcher, or the fork server, which exits with it)."""
    import signal
    import subprocess
    import sys

    code = _LAUNCHER.format(tests=os.path.dirname(__file__), folder=str(tmp_path))
    env = {**os.environ, START_ENV: start}
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        files = [tmp_path / f"{r.value}.pids" for r in (Role.MODEL_OWNER, Role.DATA_OWNER)]
        deadline = time.monotonic() + 120
        while not all(f.exists() and f.read_text() for f in files):
            assert launcher.poll() is None and time.monotonic() < deadline, "no party started"
            time.sleep(0.2)
        pids = [tuple(int(v) for v in f.read_text().split()) for f in files]
        parents = {parent for _, parent in pids}
        assert parents == ({launcher.pid} if start == "spawn" else parents - {launcher.pid})
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        watched = [pid for pid, _ in pids] + [p for p in parents if p != launcher.pid]
        deadline = time.monotonic() + 15  # the watchdog looks every 0.5 s
        while any(_running(p) for p in watched) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in watched if _running(p)], "a party outlived its launcher"
    finally:
        launcher.kill()
