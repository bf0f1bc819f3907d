"""The TLS transport against gloo, with real party processes and real sockets.

* One run per transport of the same party function and seeds: every communicator primitive
  and a small MPC computation (private matmul, comparison, secfwt softmax; TTP provider, so the
  dealer's traffic is included) give the same bits, and the same byte and round counts.
* The TLS run goes through recording TCP proxies on every link: the recorded bytes are TLS
  records only and contain none of the plaintext the parties exchanged.
* Identities: a peer whose certificate names another role, a client without a certificate,
  a peer of another session are refused; a peer that vanishes fails the receive waiting on it.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from secfwt.errors import ConfigError, ProtocolError
from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.mpc.transport import TlsSettings, Transport, ephemeral_tls_bundle, peer_name
from secfwt.mpc.transport.mesh import PeerMesh
from secfwt.mpc.transport.streams import Kind
from secfwt.roles import Role

log = logging.getLogger(__name__)

SEED = 20261123
TIMEOUT_S = 300
#: Plaintext the parties exchange and the wire must not show (an int64 fill and an object string).
PATTERN = 0x5EC0F17E5EC0F17E
MARKER = "secfwt-plaintext-marker-do-not-leak"
MATMUL_SHAPES = ((6, 8), (8, 5))


def _big(rank: int) -> torch.Tensor:
    """Full-range int64 values: their sums wrap around 2^64."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(-(2**63), 2**63 - 1, (1000,), generator=g, dtype=torch.int64)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "x": torch.randn(*MATMUL_SHAPES[0], generator=g),
        "w": torch.randn(*MATMUL_SHAPES[1], generator=g) / 2,
    }


def _exercise(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Every communicator primitive, then a small MPC computation; returns what this party saw."""
    from torch.distributed import ReduceOp

    from secfwt.crypten_compat import crypten
    from secfwt.mpc import nonlinear

    comm = crypten.communicator.get()
    rank = comm.get_rank()
    other = 1 - rank
    out: dict[str, Any] = {"ids": (comm.get_world_size(), rank, comm.get_ttp_rank())}
    comm.set_name(f"party-{rank}")
    out["name"] = comm.get_name()
    comm.reset_communication_stats()
    big = _big(rank)

    if rank == 0:
        comm.send(torch.full((512,), PATTERN, dtype=torch.int64), 1)
        out["recv"] = comm.recv(torch.empty(5, dtype=torch.float32), 1)
    else:
        out["recv"] = comm.recv(torch.empty(512, dtype=torch.int64), 0)
        comm.send(torch.arange(5, dtype=torch.float32) / 3, 0)
    a, b = torch.empty(3, dtype=torch.int64), torch.empty(4, dtype=torch.int64)
    sends = [
        comm.isend(torch.arange(3) + 10 * rank, other),
        comm.isend(torch.arange(4) - 10 * rank, other),
    ]
    r1, r2 = comm.irecv(a, src=other), comm.irecv(b, src=other)
    r2.wait()  # out of order on purpose: each wait gets the message its irecv was posted for
    r1.wait()
    for s in sends:
        s.wait()
    out["irecv"] = (a, b)
    out["scatter"] = [
        comm.scatter([torch.arange(6).reshape(2, 3) + 100 * i + 10 * root for i in range(2)], root)
        for root in (0, 1)
    ]
    out["reduce_sum"] = [comm.reduce(big, dst) for dst in (0, 1)]
    out["reduce_xor_batched"] = comm.reduce([big, big[:10] * 3], 0, op=ReduceOp.BXOR, batched=True)
    out["all_reduce_sum"] = comm.all_reduce(big)
    out["all_reduce_xor"] = comm.all_reduce(big, op=ReduceOp.BXOR)
    out["all_reduce_batched"] = comm.all_reduce([big, big[:7]], batched=True)
    # small batches travel packed into one message (collectives.packable), one of two dtypes not
    small = [big[:3], big[3:8] * 2, big[:1]]
    mixed = [big[:3], (big[:4] % 1000).to(torch.int32)]
    mesh = getattr(comm, "mesh", None)  # the TLS mesh's messages, counted on the way out
    sent: list[int] = []
    if mesh is not None:
        mesh_send = mesh.send
        mesh.send = lambda dst, **kw: (sent.append(dst), mesh_send(dst, **kw))[1]
    out["all_reduce_small"] = comm.all_reduce(small, batched=True)
    counts = [len(sent)]
    out["all_reduce_mixed"] = comm.all_reduce(mixed, batched=True)
    counts.append(len(sent) - counts[0])
    out["all_reduce_large"] = comm.all_reduce([big.repeat(17), big[:7]], batched=True)
    counts.append(len(sent) - sum(counts))
    if mesh is not None:
        mesh.send = mesh_send
        out["mesh_messages"] = counts
    out["gather"] = [comm.gather(big[:5], dst) for dst in (0, 1)]
    out["all_gather"] = comm.all_gather(big[:5] + rank)
    x = big[:4].clone() if rank == 0 else torch.zeros(4, dtype=torch.int64)
    comm.broadcast(x, 0)
    ys = [torch.full((2,), rank, dtype=torch.int64), torch.full((3,), 7 * rank, dtype=torch.int64)]
    comm.broadcast(ys, 1, batched=True)
    out["broadcast"] = (x, ys)
    comm.barrier()
    if rank == 1:
        comm.send_obj({"marker": MARKER, "n": 3}, 0)
    else:
        out["recv_obj"] = comm.recv_obj(1)
    out["broadcast_obj"] = comm.broadcast_obj(
        {"from": 0, "marker": MARKER} if rank == 0 else None, 0
    )
    stats = comm.get_communication_stats()
    out["stats_primitives"] = (stats["rounds"], stats["bytes"])

    xs = crypten.cryptensor(
        payload["x"] if ctx.role is Role.DATA_OWNER else torch.zeros(MATMUL_SHAPES[0]),
        src=Role.DATA_OWNER.rank,
    )
    ws = crypten.cryptensor(
        payload["w"] if ctx.role is Role.MODEL_OWNER else torch.zeros(MATMUL_SHAPES[1]),
        src=Role.MODEL_OWNER.rank,
    )
    y = xs.matmul(ws)  # (6, 5), a TTP triple
    above = y > 0.25  # binary triples and B2A from the dealer
    p = nonlinear.softmax(y, dim=-1)
    out["shares"] = (y.share.clone(), above.share.clone(), p.share.clone())
    out["mpc"] = {
        "y": y.get_plain_text(),
        "above": above.get_plain_text(),
        "softmax": p.get_plain_text(),
    }
    stats = comm.get_communication_stats()
    out["stats_total"] = (stats["rounds"], stats["bytes"])
    return out


def _payloads() -> dict[Role, dict[str, Any]]:
    inputs = _inputs()
    return {Role.DATA_OWNER: {"x": inputs["x"]}, Role.MODEL_OWNER: {"w": inputs["w"]}}


# ------------------------------------------------------------------------------------------------
# A recording TCP proxy (what a passive eavesdropper on the link sees)
# ------------------------------------------------------------------------------------------------
class _RecordingProxy:
    """Forwards every connection to ``target`` and records the bytes of each direction."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.streams: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                buf = bytearray()
                with self._lock:
                    self.streams.append(buf)
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while chunk := src.recv(1 << 16):
                buf.extend(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def _relay_addresses(
    dirs: dict[Role, Path], proxies: list[_RecordingProxy], stop: threading.Event
) -> None:
    """Each party publishes its address in its own folder; the others get a proxy in front of it."""
    pending = set(dirs)
    while pending and not stop.is_set():
        for role in list(pending):
            f = dirs[role] / f"address-{role.rank}"
            if f.exists():
                proxy = _RecordingProxy(f.read_text().strip())
                proxies.append(proxy)
                for other, folder in dirs.items():
                    if other is not role:  # atomically, as the parties publish theirs
                        tmp = folder / f".relay-{role.rank}.tmp"
                        tmp.write_text(proxy.address)
                        os.replace(tmp, folder / f"address-{role.rank}")
                pending.discard(role)
        time.sleep(0.02)


def _tls_records(stream: bytes) -> list[int]:
    """Content types of the TLS records a byte stream consists of; fails if it is anything else."""
    types, i = [], 0
    while i < len(stream):
        assert i + 5 <= len(stream), f"truncated TLS record header at {i}"
        ctype, version, length = struct.unpack_from(">BHH", stream, i)
        assert ctype in (20, 21, 22, 23), f"byte {i}: content type {ctype} is not a TLS record"
        assert version in (0x0301, 0x0303), f"byte {i}: record version {version:#06x}"
        i += 5 + length
        types.append(ctype)
    return types


# ------------------------------------------------------------------------------------------------
# The two runs (module scope: each costs three process start-ups)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gloo_run() -> dict[Role, Any]:
    res = run_parties(
        _exercise,
        payloads=_payloads(),
        provider=Provider.TTP,
        timeout_s=TIMEOUT_S,
        transport=Transport.GLOO,
        insecure_fixed_seed=SEED,
    )
    return {role: r.value for role, r in res.items() if role is not Role.DEALER}


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("tls-proxy")
    roles = list(Role)
    bundle = ephemeral_tls_bundle(tmp / "certs", roles=roles)
    dirs = {role: tmp / f"rdv-{role.value}" for role in roles}
    for d in dirs.values():
        d.mkdir()
    settings = {
        role: TlsSettings(
            ca_cert=bundle.ca_cert,
            cert=bundle.certs[role],
            key=bundle.keys[role],
            session_id="proxy-test",
            rendezvous_dir=dirs[role],
        )
        for role in roles
    }
    proxies: list[_RecordingProxy] = []
    stop = threading.Event()
    relay = threading.Thread(target=_relay_addresses, args=(dirs, proxies, stop), daemon=True)
    relay.start()
    try:
        res = run_parties(
            _exercise,
            payloads=_payloads(),
            provider=Provider.TTP,
            timeout_s=TIMEOUT_S,
            transport=Transport.TLS,
            tls=settings,
            insecure_fixed_seed=SEED,
        )
    finally:
        stop.set()
        relay.join(5)
        for p in proxies:
            p.close()
    time.sleep(0.2)  # let the pumps copy the last bytes of the orderly close
    return {
        "values": {role: r.value for role, r in res.items() if role is not Role.DEALER},
        "proxies": proxies,
    }


def _same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.multiprocess
def test_every_primitive_gives_the_gloo_results(gloo_run, tls_run) -> None:
    tls = tls_run["values"]
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        prim = {
            k: v for k, v in gloo_run[role].items() if k not in ("mpc", "shares", "stats_total")
        }
        _same(prim, {k: tls[role][k] for k in prim}, role.value)
    # and those results are right, not just equal
    mo, do = tls[Role.MODEL_OWNER], tls[Role.DATA_OWNER]
    assert mo["ids"] == (2, 0, 2) and do["ids"] == (2, 1, 2) and do["name"] == "party-1"
    assert torch.equal(do["recv"], torch.full((512,), PATTERN, dtype=torch.int64))
    assert torch.equal(mo["recv"], torch.arange(5, dtype=torch.float32) / 3)
    assert torch.equal(do["irecv"][0], torch.arange(3)) and torch.equal(
        mo["irecv"][1], torch.arange(4) - 10
    )
    wrapped = _big(0) + _big(1)  # int64 addition wraps mod 2^64, as the ring requires
    assert torch.equal(mo["all_reduce_sum"], wrapped) and torch.equal(do["all_reduce_sum"], wrapped)
    assert torch.equal(do["reduce_sum"][1], wrapped) and mo["reduce_sum"][1] is None
    assert torch.equal(mo["all_reduce_xor"], _big(0) ^ _big(1))
    b0, b1 = _big(0), _big(1)
    for got, want in (
        (mo["all_reduce_small"], [wrapped[:3], b0[3:8] * 2 + b1[3:8] * 2, wrapped[:1]]),
        (do["all_reduce_mixed"], [wrapped[:3], ((b0[:4] % 1000) + (b1[:4] % 1000)).int()]),
        (mo["all_reduce_large"], [wrapped.repeat(17), wrapped[:7]]),
    ):
        assert all(torch.equal(g, w) and g.dtype == w.dtype for g, w in zip(got, want, strict=True))
    # one message per batch when small and of one dtype; per tensor otherwise
    assert mo["mesh_messages"] == do["mesh_messages"] == [1, 2, 2]
    assert torch.equal(mo["reduce_xor_batched"][1], (_big(0)[:10] * 3) ^ (_big(1)[:10] * 3))
    assert torch.equal(do["scatter"][0], torch.arange(6).reshape(2, 3) + 100)
    assert do["gather"][0] == [None] and torch.equal(do["gather"][1][0], _big(0)[:5])
    assert torch.equal(mo["all_gather"][1], _big(1)[:5] + 1)
    assert torch.equal(do["broadcast"][0], _big(0)[:4]) and torch.equal(
        mo["broadcast"][1][1], torch.full((3,), 7)
    )
    assert mo["recv_obj"] == {"marker": MARKER, "n": 3} and do["broadcast_obj"] == {
        "from": 0,
        "marker": MARKER,
    }
    assert mo["stats_primitives"][1] > 0


@pytest.mark.multiprocess
def test_mpc_results_are_bit_identical_under_gloo_and_tls(gloo_run, tls_run) -> None:
    tls = tls_run["values"]
    for role in (Role.MODEL_OWNER, Role.DATA_OWNER):
        _same(gloo_run[role]["shares"], tls[role]["shares"], f"{role.value} shares")
        _same(gloo_run[role]["mpc"], tls[role]["mpc"], f"{role.value} revealed")
        assert gloo_run[role]["stats_total"] == tls[role]["stats_total"]  # bytes and rounds alike
    inputs = _inputs()
    ref = inputs["x"] @ inputs["w"]
    got = tls[Role.DATA_OWNER]["mpc"]
    assert torch.allclose(got["y"], ref, atol=1e-3)
    assert torch.equal(got["above"], (ref > 0.25).float())
    assert torch.allclose(got["softmax"], torch.softmax(ref, dim=-1), atol=1e-3)


@pytest.mark.multiprocess
def test_the_wire_carries_only_tls_records(tls_run) -> None:
    streams = [bytes(s) for p in tls_run["proxies"] for s in p.streams]
    assert (
        len(tls_run["proxies"]) == 3 and len(streams) >= 12
    )  # 6 directed links, both directions each
    total = sum(len(s) for s in streams)
    assert total > 20_000  # the run really went through the proxies
    needles = {
        "int64 pattern": struct.pack("<q", PATTERN) * 4,
        "object marker": MARKER.encode(),
        "HTTP/2 preface": b"PRI * HTTP/2.0",
        "mesh frame magic": b"SFM1",
    }
    for s in streams:
        for what, needle in needles.items():
            assert needle not in s, f"{what} visible on the wire"
        types = _tls_records(s)
        if 23 in types:  # after the handshake, application data only (TLS 1.3 hides the rest)
            first = types.index(23)
            assert set(types[first:]) <= {23, 21}, types[first:]


# ------------------------------------------------------------------------------------------------
# Identities, refusals, lost peers (in-process meshes on real sockets; no CrypTen)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def bundle(tmp_path):
    return ephemeral_tls_bundle(tmp_path / "certs")


def _settings(
    bundle, tmp_path: Path, *, cert_role: Role, session: str = "s", timeout_s: float = 10.0
) -> TlsSettings:
    rdv = tmp_path / "rdv"
    rdv.mkdir(exist_ok=True)
    return TlsSettings(
        ca_cert=bundle.ca_cert,
        cert=bundle.certs[cert_role],
        key=bundle.keys[cert_role],
        session_id=session,
        rendezvous_dir=rdv,
        connect_timeout_s=timeout_s,
    )


def _start_all(settings: dict[int, TlsSettings]) -> dict[int, Any]:
    """Start one mesh per rank in threads; each value is the started mesh or its exception."""
    out: dict[int, Any] = {}

    def start(rank: int) -> None:
        mesh = PeerMesh(rank=rank, ranks=settings, settings=settings[rank])
        try:
            mesh.start()
            out[rank] = mesh
        except Exception as exc:  # noqa: BLE001
            out[rank] = exc
            mesh.close(timeout_s=1)

    threads = [threading.Thread(target=start, args=(r,), daemon=True) for r in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_a_peer_whose_certificate_names_another_role_is_refused(bundle, tmp_path) -> None:
    t0 = time.monotonic()
    # the data owner's process holds the dealer's (valid, CA-signed) certificate
    out = _start_all(
        {
            0: _settings(bundle, tmp_path, cert_role=Role.MODEL_OWNER),
            1: _settings(bundle, tmp_path, cert_role=Role.DEALER),
        }
    )
    assert (
        isinstance(out[1], ProtocolError)
        and "PERMISSION_DENIED" in str(out[1])
        and peer_name(Role.DATA_OWNER) in str(out[1])
    )
    assert isinstance(out[0], ProtocolError) and peer_name(Role.DATA_OWNER) in str(out[0])
    assert time.monotonic() - t0 < 8  # refused at once, not after the connect timeout


def test_a_peer_of_another_session_is_refused(bundle, tmp_path) -> None:
    out = _start_all(
        {
            0: _settings(bundle, tmp_path, cert_role=Role.MODEL_OWNER),
            1: _settings(bundle, tmp_path, cert_role=Role.DATA_OWNER, session="other", timeout_s=3),
        }
    )
    assert any(
        isinstance(v, ProtocolError) and "another session" in str(v) for v in out.values()
    ), out


def test_a_client_without_certificate_cannot_connect(bundle, tmp_path) -> None:
    settings = _settings(bundle, tmp_path, cert_role=Role.MODEL_OWNER, timeout_s=3)
    mesh = PeerMesh(rank=0, ranks=[0, 1], settings=settings)
    failure: list[BaseException] = []

    def start() -> None:
        try:
            mesh.start()
        except ProtocolError as exc:
            failure.append(exc)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    address_file = tmp_path / "rdv" / "address-0"
    while not address_file.exists():
        time.sleep(0.02)
    address = address_file.read_text()
    target = [("grpc.ssl_target_name_override", peer_name(Role.MODEL_OWNER))]
    no_cert = grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=bundle.ca_cert.read_bytes()),
        options=target,
    )
    plain = grpc.insecure_channel(address)
    for channel in (no_cert, plain):
        call = channel.stream_stream("/secfwt.mpc.v1.Mesh/Stream")(
            iter([b"SFH1\x01\x00\x01\x00s"]), timeout=3
        )
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        channel.close()
    starter.join(30)
    assert failure and "data_owner" in str(failure[0])  # it never saw an authenticated data owner
    mesh.close(timeout_s=1)


def test_messages_keep_order_and_a_vanished_peer_fails_the_receive(bundle, tmp_path) -> None:
    out = _start_all(
        {
            0: _settings(bundle, tmp_path, cert_role=Role.MODEL_OWNER),
            1: _settings(bundle, tmp_path, cert_role=Role.DATA_OWNER),
        }
    )
    m0, m1 = out[0], out[1]
    assert isinstance(m0, PeerMesh) and isinstance(m1, PeerMesh), out
    big = torch.arange(3_000_000, dtype=torch.int64)  # 24 MB: many frames
    for i in range(3):
        m1.send(
            0,
            kind=Kind.TENSOR,
            channel=0,
            code=1,
            payload=memoryview(torch.full((2,), i).numpy()).cast("B"),
        )
    m1.send(0, kind=Kind.TENSOR, channel=0, code=1, payload=memoryview(big.numpy()).cast("B"))
    tickets = [m0.post(1, 0) for _ in range(4)]
    assert torch.equal(m0.take(1, 0, tickets[3]).payload.view(torch.int64), big)
    assert [int(m0.take(1, 0, t).payload.view(torch.int64)[0]) for t in tickets[:3]] == [0, 1, 2]
    # the data owner's process dies: no orderly close, its sockets just go away
    m1._server.stop(0)
    for ch in m1._channels.values():
        ch.close()
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="data_owner"):
        m0.recv(1, 0)
    assert time.monotonic() - t0 < 10
    m0.close(timeout_s=1)


def test_run_transport_is_a_validated_job_setting() -> None:
    from secfwt.config import load_job

    assert load_job(None).run.transport is Transport.GLOO  # local simulation default
    assert load_job(None, overrides=["run.transport=tls"]).run.transport is Transport.TLS
    with pytest.raises(
        ConfigError, match=r"\[run\] transport: 'ssh' is not one of \['gloo', 'tls'\]"
    ):
        load_job(None, overrides=["run.transport=ssh"])


# ------------------------------------------------------------------------------------------------
# A whole job (slow: two simulations of the tiny ZO job)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_tiny_job_gives_the_same_result_over_gloo_and_tls(tmp_path, tiny_tok_dir) -> None:
    from secfwt.config import load_job
    from secfwt.runtime.simulate import run_simulation
    from tests.conftest import write_tiny_job

    job = write_tiny_job(tmp_path, tiny_tok_dir)
    reports = {}
    for transport in Transport:
        cfg = load_job(
            job,
            overrides=[
                f"run.transport={transport.value}",
                f'run.output_dir="{tmp_path / transport.value}"',
            ],
        )
        reports[transport] = run_simulation(cfg, insecure_fixed_seed=SEED)
    gloo, tls = reports[Transport.GLOO], reports[Transport.TLS]
    assert gloo["transport"] == "gloo" and tls["transport"] == "tls"
    for key in (
        "joint_seed",
        "loss_history",
        "accuracy_before",
        "accuracy_after",
        "steps",
        "trainable",
    ):
        assert gloo[key] == tls[key], key
    for role in ("model_owner", "data_owner"):
        assert gloo["parties"][role]["bytes_sent"] == tls["parties"][role]["bytes_sent"]
        assert gloo["parties"][role]["rounds"] == tls["parties"][role]["rounds"]
    final = {
        t: torch.load(r["parties"]["data_owner"]["artifacts"]["final_parameters"])
        for t, r in reports.items()
    }
    _same(final[Transport.GLOO], final[Transport.TLS], "final parameters")
    for t, r in reports.items():  # the cost of TLS, for the log
        log.info(
            "tiny job over %s: wall %.1f s, %d bytes per party",
            t.value,
            r["wall_s"],
            r["parties"]["data_owner"]["bytes_sent"],
        )


def test_an_address_file_still_empty_is_waited_for(tmp_path) -> None:
    """A peer's address file seen before its text (a writer that does not replace it atomically)
    is read again, not taken as the empty address gRPC then refuses ("dns:///")."""
    from secfwt.mpc.transport.rendezvous import peer_addresses

    (tmp_path / "address-1").write_text("")

    def publish() -> None:
        time.sleep(0.2)
        (tmp_path / "address-1").write_text("127.0.0.1:4242\n")

    writer = threading.Thread(target=publish)
    writer.start()
    settings = TlsSettings(
        ca_cert=tmp_path / "ca.pem",
        cert=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
        session_id="s",
        rendezvous_dir=tmp_path,
    )
    got = peer_addresses(
        settings, rank=0, peers=[1], address="127.0.0.1:1", deadline=time.monotonic() + 10
    )
    writer.join()
    assert got == {1: "127.0.0.1:4242"}
    assert (tmp_path / "address-0").read_text() == "127.0.0.1:1"  # ours, published
