"""``secfwt certs init|issue``: what the certificates carry, key modes, clear errors."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from secfwt.cli import main
from secfwt.pki import certs
from secfwt.pki.certs import CertificateError
from secfwt.pki.identity import Identity, IdentityRole, identity_of_certificate


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_and_issue_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", "--out", str(tmp_path / "ca"), "--days", "30", "--json"]) == 0
    ca_out = json.loads(capsys.readouterr().out)
    assert _mode(Path(ca_out["ca_key"])) == 0o600
    ca = x509.load_pem_x509_certificate(Path(ca_out["ca_cert"]).read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days in (29, 30)

    args = [
        "certs",
        "issue",
        "data-owner",
        "--ca",
        str(tmp_path / "ca"),
        "--name",
        "hospital-a",
        "--host",
        "10.0.0.2",
        "--host",
        "do.example.org",
        "--out",
        str(tmp_path / "do"),
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["identity"] == "secfwt://data_owner/hospital-a"
        and out["tls_name"] == "hospital-a.data-owner.secfwt"
    )
    assert _mode(Path(out["key"])) == 0o600
    assert Path(out["ca"]).read_bytes() == Path(ca_out["ca_cert"]).read_bytes()
    cert = x509.load_pem_x509_certificate(Path(out["cert"]).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "secfwt://data_owner/hospital-a"
    ]
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "hospital-a.data-owner.secfwt",
        "do.example.org",
    }
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.2")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.subject.rfc4514_string() == "CN=hospital-a,OU=data_owner,O=secfwt"
    assert identity_of_certificate(cert) == Identity(IdentityRole.DATA_OWNER, "hospital-a")
    cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate(Path(ca_out["ca_cert"]).read_bytes())
    )
    # never overwrite a key silently
    assert main(args) == 2
    assert "refusing to overwrite a private key" in capsys.readouterr().err


def test_clear_errors_for_missing_or_invalid_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CertificateError, match="does not exist; create it with `secfwt certs init"):
        certs.issue(
            ca_dir=tmp_path / "nope",
            role=IdentityRole.DEALER,
            party_id="d",
            hosts=["h"],
            out=tmp_path / "o",
        )
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ca.crt").write_text("x")
    with pytest.raises(CertificateError, match="has no ca.key"):
        certs.issue(
            ca_dir=tmp_path / "half",
            role=IdentityRole.DEALER,
            party_id="d",
            hosts=["h"],
            out=tmp_path / "o",
        )
    (tmp_path / "half" / "ca.key").write_text("y")
    with pytest.raises(CertificateError, match="is not a PEM certificate"):
        certs.issue(
            ca_dir=tmp_path / "half",
            role=IdentityRole.DEALER,
            party_id="d",
            hosts=["h"],
            out=tmp_path / "o",
        )
    certs.init_ca(tmp_path / "a")
    certs.init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(CertificateError, match="does not belong to"):
        certs.issue(
            ca_dir=tmp_path / "a",
            role=IdentityRole.DEALER,
            party_id="d",
            hosts=["h"],
            out=tmp_path / "o",
        )
    leaf = certs.issue(
        ca_dir=tmp_path / "b",
        role=IdentityRole.DEALER,
        party_id="d",
        hosts=["h"],
        out=tmp_path / "leaf",
    )
    (tmp_path / "notca").mkdir()
    (tmp_path / "notca" / "ca.crt").write_bytes(leaf.cert.read_bytes())
    (tmp_path / "notca" / "ca.key").write_bytes(leaf.key.read_bytes())
    with pytest.raises(CertificateError, match="is not a CA certificate"):
        certs.issue(
            ca_dir=tmp_path / "notca",
            role=IdentityRole.DEALER,
            party_id="e",
            hosts=["h"],
            out=tmp_path / "o",
        )
    with pytest.raises(CertificateError, match="needs at least one --host"):
        certs.issue(
            ca_dir=tmp_path / "b",
            role=IdentityRole.DEALER,
            party_id="e",
            hosts=[],
            out=tmp_path / "o",
        )
    assert (
        main(
            [
                "certs",
                "issue",
                "operator",
                "--ca",
                str(tmp_path / "nope"),
                "--name",
                "alice",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "secfwt: error: CA folder" in capsys.readouterr().err
    assert (
        main(
            [
                "certs",
                "issue",
                "operator",
                "--ca",
                str(tmp_path / "b"),
                "--name",
                "Not_A_Label",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "DNS label" in capsys.readouterr().err


def test_operator_certificate_needs_no_host(tmp_path: Path) -> None:
    certs.init_ca(tmp_path / "ca")
    f = certs.issue(
        ca_dir=tmp_path / "ca",
        role=IdentityRole.OPERATOR,
        party_id="alice",
        hosts=[],
        out=tmp_path / "alice",
        days=1,
    )
    assert certs.certificate_identity(f.cert) == Identity(IdentityRole.OPERATOR, "alice")
    certs.read_tls_files(cert=f.cert, key=f.key, ca=f.ca)
    other = certs.issue(
        ca_dir=tmp_path / "ca",
        role=IdentityRole.OPERATOR,
        party_id="bob",
        hosts=[],
        out=tmp_path / "bob",
        days=1,
    )
    with pytest.raises(CertificateError, match="is not the private key of"):
        certs.read_tls_files(cert=f.cert, key=other.key, ca=f.ca)
