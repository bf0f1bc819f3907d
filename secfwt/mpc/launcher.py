"""Run one function per party as separate OS processes on this machine (the local runtime).

Each computing party (model owner, data owner) runs ``target(ctx, payload)`` in its own
process; the dealer runs CrypTen's trusted-third-party loop in a third process when the TTP
provider is selected. The parent:

* joins with a deadline, never ``join()`` without a timeout (one stuck party would hang all);
* on the first failure, terminates every other party and raises :class:`PartyFailedError`
  carrying the failing party's own error (its exception is re-raised when it is a secfwt error);
* leaves no process behind: every child is killed in a ``finally`` and each child exits by
  itself when its launcher disappears (a watchdog thread on a pipe only the launcher writes
  to), so no orphan survives a killed CLI.

This mirrors CrypTen's ``run_multiprocess`` (one protocol code, several runtimes) without its
unbounded joins and without fork from the caller, so no CrypTen state leaks from the parent.

Start method: :func:`party_context`. Party processes fork from multiprocessing's fork server, a
fresh interpreter that has imported torch and CrypTen once and never runs a protocol, instead
of each spawned interpreter importing them again: about 3 s less per job on this project's
2-core machines (a 3-party run of a trivial target: 3.3 s spawned, 0.2 s forked from the
server; the default test run: 898 s, then 632 s). A child still starts as a spawned one would:
with the launching process's environment of the moment (the server's is that of its own
start), torch's and numpy's global generators seeded afresh (a fork would copy one state into
every party), Python's ``random`` reseeded by Python itself. ``SECFWT_PARTY_START=spawn`` starts
each party by spawn instead (A/B measurements, platforms without a fork server).

Transport: gloo on loopback by default; ``transport=Transport.TLS`` runs the same parties over
the mutually authenticated TLS mesh with a throwaway CA and per-role certificates created in
the run's temporary folder (:func:`secfwt.mpc.transport.ephemeral_tls_bundle`), each party
listening on 127.0.0.1 port 0 and finding its peers through files in that folder.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.queues
import os
import pickle
import queue as queue_mod
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from secfwt.errors import ConfigError, PartyFailedError, ProtocolError, SecfwtError
from secfwt.mpc.transport import TlsSettings, Transport, ephemeral_tls_bundle
from secfwt.roles import COMPUTING_ROLES, Role

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PartyContext:
    """What a party function learns about its own process."""

    role: Role
    world_size: int


@dataclasses.dataclass
class PartyResult:
    """What a party process returned. ``rounds`` and ``bytes_sent`` are CrypTen's counts for a
    computing party (sent and received bytes together, dealer traffic mixed in) and, for the
    dealer, the requests it answered and the bytes it sent. ``traffic``: the process's
    :class:`~secfwt.mpc.traffic.Traffic` (by direction, the dealer apart) as a dict;
    ``ring_matmul``: how each int64 matmul class ran (:func:`secfwt.mpc.ring_tuning.records`)."""

    role: Role
    value: Any
    rounds: int
    bytes_sent: int
    wall_s: float
    traffic: dict[str, int] = dataclasses.field(default_factory=dict)
    ring_matmul: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def link_counts(self) -> dict[str, int]:
        """A computing party's traffic as reports show it: ``bytes_sent``, ``bytes_received``
        and ``rounds`` with the other computing party, ``dealer_bytes`` received from the
        dealer, and CrypTen's own counts as ``crypten_bytes`` / ``crypten_rounds`` (not bytes
        sent: see the class doc)."""
        t = self.traffic
        return {
            "bytes_sent": t.get("sent", 0),
            "bytes_received": t.get("received", 0),
            "dealer_bytes": t.get("dealer_bytes", 0),
            "rounds": t.get("rounds", 0),
            "crypten_bytes": self.bytes_sent,
            "crypten_rounds": self.rounds,
        }


#: Environment switch for the party processes' start method (:func:`party_context`).
START_ENV = "SECFWT_PARTY_START"
#: What the fork server imports before it forks any party: torch and CrypTen (2.5 s of a
#: spawned party's start here) and the session code every party runs. A preloaded module's
#: import-time reads of the environment are the server's, not the job's: what a job may set is
#: read again when the party starts (the engine's ``SECFWT_RING_MATMUL`` in
#: :func:`secfwt.mpc.engine.install`; Hugging Face's offline switch by transformers, which
#: parties import themselves).
_PRELOAD = ("secfwt.crypten_compat", "secfwt.mpc.session")


def party_context() -> Any:
    """The multiprocessing context party processes start from: the fork server preloaded with
    :data:`_PRELOAD` (see the module docstring), or spawn under ``SECFWT_PARTY_START=spawn`` and
    where the platform has no fork server. Its queues are the ones to hand to its processes."""
    method = os.environ.get(START_ENV, "forkserver").strip() or "forkserver"
    if method not in ("forkserver", "spawn"):
        raise ConfigError(
            f"{START_ENV}={method!r} is not a start method for party processes: use "
            "'forkserver' (the default) or 'spawn'"
        )
    if method == "forkserver" and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD))  # read when the server starts, once
        return ctx
    return mp.get_context("spawn")


def _watch_launcher(alive: Any) -> None:
    # A daemon thread: when the launching process dies, the party exits instead of blocking
    # forever on a peer that will never answer. ``alive`` is the read end of a pipe whose only
    # write end the launcher holds (neither a spawned nor a forked party inherits it): nothing
    # is ever sent, so the read returns when that end closes. A party's parent is no sign: a
    # forked one's is the fork server, which lives on while any process it forked does.
    try:
        alive.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(75)


def _start_as_spawned(environ: Mapping[str, str] | None) -> None:
    """Make a party forked from the fork server start as a spawned one would (module
    docstring): the launcher's environment now, and torch's and numpy's global generators
    seeded from fresh OS entropy as each is at import. Without that every party forked from one
    server would draw the same streams: the dealer's per-party seeds (CrypTen's ``TTPServer``
    draws them from torch's default generator) would repeat in every job of a daemon."""
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    if "torch" in sys.modules:  # imported by the server (a preload)
        sys.modules["torch"].seed()
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()


#: What a payload passes by multiprocessing's own means (the child gets the same pipe), not by
#: value: the progress and result queues and pipe ends a job hands its parties.
_BY_HANDLE = (mp.queues.Queue, mp.queues.SimpleQueue, mp.connection.Connection)


@dataclasses.dataclass(frozen=True)
class _Packed:
    """A party's payload pickled by value, its queues and pipe ends aside (:data:`_BY_HANDLE`).

    multiprocessing would pass every tensor of a payload through shared memory, one file
    descriptor each: the fork server takes at most 256 per process (a decoder's weights are
    several hundred tensors), and a container's /dev/shm (64 MB by default in Docker) caps their
    size. By value they travel in the pickle stream, on either start method."""

    data: bytes
    handles: tuple[Any, ...]

    @classmethod
    def pack(cls, payload: Any) -> _Packed:
        handles: list[Any] = []

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> int | None:
                if isinstance(obj, _BY_HANDLE):
                    handles.append(obj)
                    return len(handles) - 1
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
        return cls(buf.getvalue(), tuple(handles))

    def unpack(self) -> Any:
        handles = self.handles

        class Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                return handles[pid]

        return Unpickler(io.BytesIO(self.data)).load()


def _child_main(
    role: Role,
    world_size: int,
    rendezvous: str,
    provider_value: str,
    comm_stats: bool,
    target: Callable[[PartyContext, Any], Any] | None,
    payload: Any,
    results: mp.Queue[Any],
    log_level: int,
    transport: Transport = Transport.GLOO,
    tls: TlsSettings | None = None,
    insecure_fixed_seed: int | None = None,
    device: Any = None,
    environ: Mapping[str, str] | None = None,
    alive: Any = None,
) -> None:
    _start_as_spawned(environ)
    if alive is not None:
        threading.Thread(target=_watch_launcher, args=(alive,), daemon=True).start()
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s {role.value:<11} %(levelname)s %(name)s: %(message)s"
    )
    t0 = time.perf_counter()
    try:
        import torch

        # Three party processes share the machine's cores; one intra-op thread each avoids
        # threads waiting on each other (measured 5-7x faster whole functions on 2 cores).
        torch.set_num_threads(1)
        from secfwt.mpc import session
        from secfwt.mpc.provider import Provider

        session.init_party(
            rank=role.rank,
            world_size=world_size,
            rendezvous=rendezvous,
            provider=Provider(provider_value),
            comm_stats=comm_stats,
            transport=transport,
            tls=tls,
            insecure_fixed_seed=insecure_fixed_seed,
            device=device,
        )
        meter = session.count_traffic()
        if role is Role.DEALER:
            session.run_dealer()
            t = meter.snapshot()
            results.put(
                ("ok", role, pickle.dumps(None), t.served, t.sent, time.perf_counter() - t0)
                + (_extras(meter),)
            )
            return
        assert target is not None
        if isinstance(payload, _Packed):
            payload = payload.unpack()
        value = target(PartyContext(role=role, world_size=world_size), payload)
        stats = session.communication_stats()
        session.shutdown_party()
        # Plain pickle bytes: torch would otherwise pass tensors as file descriptors that die
        # with this process before the parent reads them.
        results.put(
            (
                "ok",
                role,
                pickle.dumps(value),
                stats["rounds"],
                stats["bytes"],
                time.perf_counter() - t0,
                _extras(meter),
            )
        )
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, then exit non-zero)
        tb = traceback.format_exc()
        log.debug("party %s failed:\n%s", role.value, tb)
        try:
            results.put(
                (
                    "error",
                    role,
                    exc if isinstance(exc, SecfwtError) else None,
                    str(exc) or type(exc).__name__,
                    tb,
                )
            )
        except Exception:  # noqa: BLE001  (any pickling failure: send only the text)
            results.put(("error", role, None, f"{type(exc).__name__}: {exc}", tb))
        from secfwt.mpc.session import close_after_failure

        close_after_failure()  # peers learn which party was lost first
        results.close()
        results.join_thread()
        os._exit(1)


def _extras(meter: Any) -> bytes:
    """The process's traffic and ring-matmul choices, pickled for the results queue."""
    from secfwt.mpc import ring_tuning

    traffic = dataclasses.asdict(meter.snapshot())
    return pickle.dumps({"traffic": traffic, "ring_matmul": ring_tuning.records()})


def run_parties(
    target: Callable[[PartyContext, Any], Any],
    *,
    payloads: dict[Role, Any],
    provider: Any,
    timeout_s: float,
    comm_stats: bool = True,
    on_message: Callable[[Role, Any], None] | None = None,
    messages: mp.Queue[Any] | None = None,
    transport: Transport = Transport.GLOO,
    tls: Mapping[Role, TlsSettings] | None = None,
    insecure_fixed_seed: int | None = None,
    device: Any = None,
    timeout_setting: str = "[run] timeout_s in the job file",
) -> dict[Role, PartyResult]:
    """Run ``target`` once per computing party in its own process, plus the dealer if needed.

    ``payloads`` maps each computing role to the (picklable) argument its process receives:
    this is where a party's private inputs enter, and they enter only that party's process.
    ``provider`` is a :class:`secfwt.mpc.provider.Provider`. Raises :class:`PartyFailedError`
    (or the failing party's own :class:`SecfwtError`) on failure, :class:`ProtocolError` on
    timeout. ``messages``/``on_message``: an optional queue the parties write progress to
    (created with :func:`new_queue`) and a callback the parent runs for each message.
    ``transport``: gloo on loopback (default) or the TLS mesh (see the module docstring);
    ``tls`` gives each role's TLS settings instead of the throwaway local bundle.
    ``insecure_fixed_seed``: tests only, makes every MPC seed predictable
    (:func:`secfwt.mpc.session.init_party`). ``device``: the ``torch.device`` every process's
    ring products may also run on (:func:`secfwt.mpc.device.resolve` of the job's
    ``run.device``; None: the host only). ``timeout_setting``: where the caller sets
    ``timeout_s``, named in the timeout's error as the fix.
    """
    from secfwt.mpc import ring_tuning
    from secfwt.mpc.provider import Provider

    _, forced, _ = ring_tuning.settings_from_env(os.environ)  # fails here, not in a party
    if forced is ring_tuning.Method.DEVICE and device is None:
        raise ConfigError(
            f"{ring_tuning.RING_MATMUL_ENV}=device forces every product onto run.device, and "
            'the job has none: set run.device (e.g. "cuda") or unset the variable'
        )
    ctx = party_context()
    results: mp.Queue[Any] = ctx.Queue()
    world_size = len(COMPUTING_ROLES)
    roles = list(COMPUTING_ROLES) + ([Role.DEALER] if provider is Provider.TTP else [])
    with tempfile.TemporaryDirectory(prefix="secfwt-rdv-") as tmp:
        rendezvous = "file://" + os.path.join(tmp, "rendezvous")
        if transport is Transport.TLS and tls is None:
            tls = _local_tls(tmp, roles)
        tls = tls or {}
        procs = {
            role: _party_process(
                ctx,
                role,
                world_size=world_size,
                rendezvous=rendezvous,
                provider=provider,
                comm_stats=comm_stats,
                target=None if role is Role.DEALER else target,
                payload=payloads.get(role),
                results=results,
                transport=transport,
                tls=tls.get(role),
                insecure_fixed_seed=insecure_fixed_seed,
                device=device,
            )
            for role in roles
        }
        try:
            for p in procs.values():
                p.start()
            return _collect(procs, results, timeout_s, messages, on_message, timeout_setting)
        finally:
            stop_processes(procs.values())


def _party_process(
    ctx: Any,
    role: Role,
    *,
    world_size: int,
    rendezvous: str,
    provider: Any,
    comm_stats: bool,
    target: Callable[[PartyContext, Any], Any] | None,
    payload: Any,
    results: mp.Queue[Any],
    transport: Transport,
    tls: TlsSettings | None,
    insecure_fixed_seed: int | None,
    device: Any = None,
) -> mp.process.BaseProcess:
    """The (unstarted) process of one party: :func:`_child_main` with this process as launcher
    (it holds the write end of the party's lifeline, :func:`_watch_launcher`, until
    :func:`stop_processes` reaps the party)."""
    alive_r, alive_w = ctx.Pipe(duplex=False)
    p = ctx.Process(
        target=_child_main,
        name=f"secfwt-{role.value}",
        args=(
            role,
            world_size,
            rendezvous,
            provider.value,
            comm_stats,
            target,
            _Packed.pack(payload),
            results,
            logging.getLogger().getEffectiveLevel(),
            transport,
            tls,
            insecure_fixed_seed,
            device,
            dict(os.environ),
            alive_r,
        ),
    )
    _LIFELINES[p] = (alive_r, alive_w)
    return p


#: Each party process's lifeline pipe (read end, write end), kept here until it is reaped.
_LIFELINES: weakref.WeakKeyDictionary[mp.process.BaseProcess, tuple[Any, Any]] = (
    weakref.WeakKeyDictionary()
)


def stop_processes(procs: Iterable[mp.process.BaseProcess]) -> None:
    """Stop and reap party processes: SIGTERM to all first (they stop in parallel), then wait,
    SIGKILL whatever is still alive. Never leaves one behind."""
    # A process whose start() failed (e.g. spawn refused an unguarded __main__) has no pid and
    # cannot be joined; skipping it keeps the start error, not an AssertionError, in the report.
    all_procs = list(procs)
    procs = [p for p in all_procs if p.pid is not None]
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    for p in all_procs:
        for end in _LIFELINES.pop(p, ()):
            end.close()


def spawn_party(
    role: Role,
    *,
    target: Callable[[PartyContext, Any], Any] | None,
    payload: Any,
    results: mp.Queue[Any],
    provider: Any,
    tls: TlsSettings,
    insecure_fixed_seed: int | None = None,
    device: Any = None,
) -> mp.process.BaseProcess:
    """Start ONE party of a multi-host job in its own process (a daemon's job runner): the
    same child as :func:`run_parties` (watchdog, error reporting, one intra-op thread) over the
    TLS mesh with ``tls`` from :func:`secfwt.mpc.transport.tls_settings`. The caller reads
    ``results`` (the item :func:`collect_one` decodes) and owns the process's end."""
    p = _party_process(
        party_context(),
        role,
        world_size=len(COMPUTING_ROLES),
        rendezvous="",
        provider=provider,
        comm_stats=True,
        target=target,
        payload=payload,
        results=results,
        transport=Transport.TLS,
        tls=tls,
        insecure_fixed_seed=insecure_fixed_seed,
        device=device,
    )
    p.start()
    return p


def collect_one(item: tuple[Any, ...]) -> PartyResult:
    """Decode one item a party process put on its results queue (re-raising a reported error)."""
    if item[0] == "error":
        _raise_reported(item)
    _, role, value, rounds, nbytes, wall, *rest = item
    extras = pickle.loads(rest[0]) if rest else {}
    return PartyResult(
        role=role,
        value=pickle.loads(value),
        rounds=int(rounds),
        bytes_sent=int(nbytes),
        wall_s=wall,
        traffic=extras.get("traffic", {}),
        ring_matmul=extras.get("ring_matmul", []),
    )


def _local_tls(tmp: str, roles: list[Role]) -> dict[Role, TlsSettings]:
    """TLS settings for parties on this machine: throwaway certificates, ports found by files."""
    import secrets
    from pathlib import Path

    bundle = ephemeral_tls_bundle(Path(tmp) / "tls", roles=roles)
    mesh_dir = Path(tmp) / "mesh"
    mesh_dir.mkdir()
    session = secrets.token_hex(16)
    return {
        role: TlsSettings(
            ca_cert=bundle.ca_cert,
            cert=bundle.certs[role],
            key=bundle.keys[role],
            session_id=session,
            listen="127.0.0.1:0",
            rendezvous_dir=mesh_dir,
        )
        for role in roles
    }


def new_queue() -> mp.Queue[Any]:
    """A queue party processes can put progress messages on (:func:`party_context`'s)."""
    return party_context().Queue()


def _collect(
    procs: dict[Role, mp.process.BaseProcess],
    results: mp.Queue[Any],
    timeout_s: float,
    messages: mp.Queue[Any] | None,
    on_message: Callable[[Role, Any], None] | None,
    timeout_setting: str,
) -> dict[Role, PartyResult]:
    deadline = time.monotonic() + timeout_s
    done: dict[Role, PartyResult] = {}
    while len(done) < len(procs):
        if messages is not None and on_message is not None:
            _drain(messages, on_message)
        try:
            item = results.get(timeout=0.2)
        except queue_mod.Empty:
            item = None
        if item is not None:
            if item[0] == "error":
                _blame_the_dead(procs, results, reporter=item[1], reported=set(done))
            res = collect_one(item)
            done[res.role] = res
            continue
        for role, p in procs.items():
            if role not in done and p.exitcode is not None and p.exitcode != 0:
                # died without reporting (killed, segfault, out of memory): give the queue a moment
                try:
                    late = results.get(timeout=1.0)
                except queue_mod.Empty:
                    late = None
                if late is not None and late[0] == "error" and late[1] is role:
                    # its own report, written just before it exited: unless another party died
                    # without a word first (then this report is the consequence)
                    _blame_the_dead(procs, results, reporter=role, reported=set(done))
                    _raise_reported(late)
                # another party's report now is a consequence (a survivor's lost connection)
                raise PartyFailedError(role.value, f"process exited with code {p.exitcode}")
        if time.monotonic() > deadline:
            missing = ", ".join(r.value for r in procs if r not in done)
            raise ProtocolError(
                f"parties did not finish within {timeout_s:g} s: {missing}; raise "
                f"{timeout_setting} if the job is just slow"
            )
    if messages is not None and on_message is not None:
        _drain(messages, on_message)
    return done


#: How long a party's error report waits for the other processes' exit codes (seconds).
_DEATH_GRACE_S = 2.0


def _blame_the_dead(
    procs: dict[Role, mp.process.BaseProcess],
    results: mp.Queue[Any],
    *,
    reporter: Role,
    reported: set[Role],
) -> None:
    """Name a party that died without reporting, not the survivor whose error it caused.

    A party killed mid-protocol reports nothing; its peer, blocked on it, fails with a transport
    error ("Connection reset by peer" on gloo) that often reaches the queue before the dead
    process is reaped. Within a short grace, a process that exits non-zero and never reports is
    the cause: raise PartyFailedError for it instead of the survivor's report.
    """
    reported = reported | {reporter}
    later: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + _DEATH_GRACE_S
    while time.monotonic() < deadline:
        # one snapshot per pass: a process reaped between two reads must not slip past both checks
        codes = {role: p.exitcode for role, p in procs.items() if role not in reported}
        silent = [role for role, code in codes.items() if code not in (None, 0)]
        if silent:
            try:
                late = results.get(timeout=0.2)  # a report may still be in the pipe
            except queue_mod.Empty:
                dead = silent[0]
                reason = f"process exited with code {codes[dead]}"
                raise PartyFailedError(dead.value, reason) from None
            later.append(late)  # whoever it came from has spoken; look at the others again
            reported.add(late[1])
            continue
        if all(code is not None for code in codes.values()):
            break
        time.sleep(0.05)
    for late in later:  # put back what was read ahead, for the caller's usual handling
        results.put(late)


def _raise_reported(item: tuple[Any, ...]) -> None:
    """Re-raise a party's reported error: its own secfwt error, else PartyFailedError."""
    _, role, exc, text, tb = item
    log.debug("traceback of %s:\n%s", role.value, tb)
    if isinstance(exc, SecfwtError):
        raise exc
    raise PartyFailedError(role.value, text)


def _drain(messages: mp.Queue[Any], on_message: Callable[[Role, Any], None]) -> None:
    while True:
        try:
            role, msg = messages.get_nowait()
        except queue_mod.Empty:
            return
        on_message(role, msg)
