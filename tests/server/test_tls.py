"""Security of a real daemon on a real socket: mutual TLS, pinning, limits, malformed input.

Every refusal is followed by a health check: the daemon must keep serving.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from secfwt.errors import ConfigError
from secfwt.pki import certs
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.server.client import Credentials, PartyClient
from secfwt.server.daemon import PartyDaemon
from secfwt.server.errors import (
    BusyError,
    InvalidRequestError,
    NotAuthorizedError,
    PeerUnavailableError,
)
from tests.server.conftest import IDS, Deployment
from tests.server.runners import EchoRunner

HOSPITAL = Identity(IdentityRole.DATA_OWNER, IDS["data_owner"])
VENDOR = Identity(IdentityRole.MODEL_OWNER, IDS["model_owner"])
PLACEHOLDER = "127.0.0.1:1"  # peers this daemon never dials in these tests


def _start(dep: Deployment, tmp: Path, daemons: list, **kw) -> PartyDaemon:  # noqa: ANN003
    cfg = dep.party_config(
        "data_owner",
        peers={"model_owner": PLACEHOLDER, "dealer": PLACEHOLDER},
        state=str(tmp / "do"),
        **kw,
    )
    d = PartyDaemon(cfg, runner=EchoRunner())
    d.start()
    daemons.append(d)
    return d


def _healthy(dep: Deployment, d: PartyDaemon) -> None:
    with dep.client(d.address) as c:
        assert c.health() == "SERVING"
        assert c.health("secfwt.v1.PartyService") == "SERVING"
        assert c.hello().identity == HOSPITAL


def _creds(files: certs.IssuedFiles, ident: Identity) -> Credentials:
    return Credentials(
        identity=ident,
        cert_pem=files.cert.read_bytes(),
        key_pem=files.key.read_bytes(),
        ca_pem=files.ca.read_bytes(),
    )


def test_mutual_tls_with_pinned_operator_and_peer(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(deployment, tmp_path, daemons)
    with deployment.client(d.address, expect=HOSPITAL) as c:  # server identity pinned by TLS name
        info = c.hello()
        assert (
            info.identity == HOSPITAL
            and info.protocol_version == 1
            and "progress-stream" in info.capabilities
        )
    with deployment.client(d.address, "vendor") as c:  # a pinned peer daemon
        assert c.hello().identity == HOSPITAL
    with deployment.client(
        d.address, expect=VENDOR, timeout_s=5
    ) as c:  # wrong expected server identity
        with pytest.raises(PeerUnavailableError, match="UNAVAILABLE"):
            c.hello()
    _healthy(deployment, d)


def test_client_without_certificate_is_refused(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(deployment, tmp_path, daemons)
    ca = deployment.cert("alice").ca.read_bytes()
    with grpc.secure_channel(d.address, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
        hello = ch.unary_unary("/secfwt.v1.PartyService/Hello")
        with pytest.raises(grpc.RpcError) as err:
            hello(b"", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(d.address) as ch:  # plaintext against a TLS daemon
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/secfwt.v1.PartyService/Hello")(b"", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    _healthy(deployment, d)


def test_certificate_from_another_ca_is_refused(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(deployment, tmp_path, daemons)
    certs.init_ca(tmp_path / "rogue-ca")
    # Same identity as the pinned operator, but signed by a CA the daemon does not trust.
    eve = certs.issue(
        ca_dir=tmp_path / "rogue-ca",
        role=IdentityRole.OPERATOR,
        party_id="alice",
        hosts=[],
        out=tmp_path / "eve",
    )
    creds = _creds(eve, Identity(IdentityRole.OPERATOR, "alice"))
    creds = Credentials(
        identity=creds.identity,
        cert_pem=creds.cert_pem,
        key_pem=creds.key_pem,
        ca_pem=deployment.cert("alice").ca.read_bytes(),
    )
    with PartyClient(d.address, creds, timeout_s=5) as c, pytest.raises(PeerUnavailableError):
        c.hello()
    _healthy(deployment, d)


def test_expired_certificate_is_refused(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(deployment, tmp_path, daemons)
    now = dt.datetime.now(dt.UTC)
    old = certs.issue(
        ca_dir=deployment.ca_dir,
        role=IdentityRole.OPERATOR,
        party_id="alice",
        hosts=[],
        out=tmp_path / "old",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    with (
        PartyClient(
            d.address, _creds(old, Identity(IdentityRole.OPERATOR, "alice")), timeout_s=5
        ) as c,
        pytest.raises(PeerUnavailableError),
    ):
        c.hello()
    _healthy(deployment, d)


def test_unknown_identity_is_permission_denied(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(deployment, tmp_path, daemons)
    with deployment.client(
        d.address, "mallory"
    ) as c:  # valid deployment-CA certificate, pinned nowhere
        with pytest.raises(
            NotAuthorizedError,
            match="PERMISSION_DENIED: Hello: operator/mallory is not pinned by data_owner/hospital",
        ):
            c.hello()
        with pytest.raises(
            NotAuthorizedError, match="PERMISSION_DENIED: Status: operator/mallory is not pinned"
        ):
            c.status("any")
        assert (
            c.health() == "SERVING"
        )  # the health service answers any holder of a deployment certificate
    with deployment.client(
        d.address, "vendor"
    ) as c:  # a pinned peer still may not act as an operator
        with pytest.raises(NotAuthorizedError, match="only operators of data_owner/hospital"):
            c.accept("any", "0" * 64)
        with pytest.raises(NotAuthorizedError, match="only operators"):
            c.fetch("any", tmp_path / "loot")
    _healthy(deployment, d)


def test_hello_identity_claim_must_match_certificate(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(deployment, tmp_path, daemons)
    files = deployment.cert("alice")
    liar = Credentials(
        identity=VENDOR,
        cert_pem=files.cert.read_bytes(),
        key_pem=files.key.read_bytes(),
        ca_pem=files.ca.read_bytes(),
    )
    with (
        PartyClient(d.address, liar) as c,
        pytest.raises(
            NotAuthorizedError,
            match="claims to be model_owner/vendor but its certificate says operator/alice",
        ),
    ):
        c.hello()


def test_oversize_messages_are_refused_and_daemon_stays_healthy(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(
        deployment,
        tmp_path,
        daemons,
        limits={"max_message_bytes": 20_000, "max_job_toml_bytes": 8_000},
    )
    with deployment.client(d.address) as c:
        with pytest.raises(BusyError, match="RESOURCE_EXHAUSTED.*larger than max"):
            c.commitment("#" * 50_000)  # over the message limit: refused before parsing
        with pytest.raises(
            BusyError,
            match=r"RESOURCE_EXHAUSTED: job_toml: 12000 bytes \(UTF-8\), the limit is 8000",
        ):
            c.commitment("#" * 12_000)  # under the message limit, over the field limit
    _healthy(deployment, d)


def test_malformed_bytes_are_refused_and_daemon_stays_healthy(
    deployment: Deployment, tmp_path: Path, daemons: list
) -> None:
    d = _start(deployment, tmp_path, daemons)
    with deployment.client(d.address) as c:
        for method in ("Propose", "Hello", "Status", "FetchArtifacts"):
            if method == "FetchArtifacts":
                call = c.channel.unary_stream(f"/secfwt.v1.PartyService/{method}")
                run = lambda call=call: list(call(b"\xff\xff\xff\xff\x0f garbage", timeout=5))  # noqa: E731
            else:
                call = c.channel.unary_unary(f"/secfwt.v1.PartyService/{method}")
                run = lambda call=call: call(b"\xff\xff\xff\xff\x0f garbage", timeout=5)  # noqa: E731
            with pytest.raises(grpc.RpcError) as err:
                run()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"not a valid {method}Request" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.channel.unary_unary("/secfwt.v1.PartyService/NoSuchMethod")(b"", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(InvalidRequestError, match="job id"):
            c.status("../../etc/passwd")
        with pytest.raises(InvalidRequestError, match="not valid TOML"):
            c.commitment("[job\n")
    _healthy(deployment, d)


def test_insecure_mode_needs_both_switches_and_warns(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = deployment.party_raw(
        "dealer", peers={"model_owner": PLACEHOLDER}, state=str(tmp_path / "dealer")
    )
    raw["party"]["insecure"] = True
    del raw["tls"]
    from secfwt.server.config import parse_party_config

    cfg = parse_party_config(raw, where="<insecure>", base=tmp_path)
    with pytest.raises(ConfigError, match="also needs --insecure"):
        PartyDaemon(cfg, runner=EchoRunner())
    d = PartyDaemon(cfg, runner=EchoRunner(), insecure_confirmed=True)
    d.start()
    daemons.append(d)
    assert "WARNING: secfwt party daemon running with --insecure" in capsys.readouterr().err
    claim = Credentials(identity=Identity(IdentityRole.OPERATOR, "alice"), insecure=True)
    with PartyClient(d.address, claim) as c:
        assert c.hello().identity == Identity(IdentityRole.DEALER, "dealer")
    stranger = Credentials(identity=Identity(IdentityRole.OPERATOR, "mallory"), insecure=True)
    with PartyClient(d.address, stranger) as c, pytest.raises(NotAuthorizedError):
        c.hello()


def test_party_health_probe_command(
    deployment: Deployment, tmp_path: Path, daemons: list, capsys: pytest.CaptureFixture[str]
) -> None:
    from secfwt.cli import main
    from tests.server.conftest import to_toml

    d = _start(deployment, tmp_path, daemons)
    cfg = tmp_path / "party.toml"
    raw = deployment.party_raw(
        "data_owner", peers={"model_owner": PLACEHOLDER}, state=str(tmp_path / "do")
    )
    raw["party"]["listen"] = f"0.0.0.0:{d.port}"
    cfg.write_text(to_toml(raw))
    assert main(["party", "health", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    d.stop(grace=0)
    assert main(["party", "health", "--config", str(cfg)]) == 10
