"""The local runtime: real spawned party processes, failures propagated, nothing left behind.

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
from secfwt.mpc.launcher import PartyContext, _blame_the_dead, run_parties
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


@pytest.mark.parametrize("provider", [Provider.TTP, Provider.TFP])
def test_parties_run_in_separate_processes_and_shares_reconstruct(provider):
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
    # the model owner starts (and would hang); the data owner's payload, a local function, cannot
    # be pickled for spawn, so its start() fails: that error must reach the caller (not one about
    # joining a process that never started) and the model owner must not be left running
    with pytest.raises((AttributeError, pickle.PicklingError), match="pickle"):
        _run_ttp(_hang, transport=transport, timeout_s=60, payloads={Role.DATA_OWNER: lambda: None})
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
