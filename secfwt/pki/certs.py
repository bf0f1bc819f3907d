"""A deployment CA and the certificates of parties and operators (``secfwt certs init|issue``).

Keys are ECDSA on P-256 (what every TLS stack, gRPC's BoringSSL included, accepts), signatures
SHA-256. The CA certificate has ``pathLenConstraint = 0``: it signs leaves only. A leaf carries
its identity as a URI SAN ``secfwt://ROLE/PARTY_ID`` and a DNS SAN ``PARTY_ID.ROLE.secfwt``
(see :mod:`secfwt.pki.identity`), plus the DNS names and IP addresses it serves on, and both
the serverAuth and clientAuth extended key usages: daemons are servers to their callers and
clients of their peers. Private keys are written with mode 0600 and never overwritten silently.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfwt.errors import ConfigError
from secfwt.pki.identity import Identity, IdentityRole, identity_of_certificate

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
_CLOCK_SKEW = dt.timedelta(minutes=5)  # leaves are valid from a little before "now"


class CertificateError(ConfigError):
    """A CA, certificate or key file is missing, unreadable or not what it should be."""


@dataclasses.dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path
    ca: Path
    identity: Identity | None
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    """Write a private key readable by its owner only (0600), created with that mode."""
    if path.exists():
        if not force:
            raise CertificateError(
                f"{path} exists; refusing to overwrite a private key (pass --force to replace it)"
            )
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # in case a umask narrowed or an ACL widened it


def _write_public(path: Path, data: bytes, *, force: bool) -> None:
    if path.exists() and not force:
        raise CertificateError(
            f"{path} exists; refusing to overwrite it (pass --force to replace it)"
        )
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _validity(
    days: float, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or (_now() - _CLOCK_SKEW)
    end = not_after or (start + dt.timedelta(days=days))
    if days <= 0 and not_after is None:
        raise CertificateError(f"--days {days}: validity must be positive")
    if end <= start:
        raise CertificateError(f"certificate validity ends ({end}) before it starts ({start})")
    return start, end


def init_ca(
    out: Path, *, common_name: str = "secfwt deployment CA", days: float = 3650, force: bool = False
) -> IssuedFiles:
    """Create a deployment CA: ``out/ca.key`` (0600) and the self-signed ``out/ca.crt``."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secfwt"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start, end = _validity(days, None, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(out / CA_KEY, _key_pem(key), force=force)
    _write_public(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), force=force)
    return IssuedFiles(
        cert=out / CA_CERT, key=out / CA_KEY, ca=out / CA_CERT, identity=None, not_after=end
    )


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read ``ca.crt`` and ``ca.key`` from a CA folder, with a clear error for each way it can be
    wrong."""
    if not ca_dir.is_dir():
        raise CertificateError(
            f"CA folder {ca_dir} does not exist; create it with `secfwt certs init --out {ca_dir}`"
        )
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise CertificateError(
                f"CA folder {ca_dir} has no {p.name}; "
                "it should hold the ca.crt and ca.key written by `secfwt certs init`"
            )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{cert_path} is not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"{key_path}: expected an EC P-256 key as written by `secfwt certs init`"
        )
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertificateError(
            f"{key_path} does not belong to {cert_path}: the CA key and certificate differ"
        )
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CertificateError(
            f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)"
        )
    if cert.not_valid_after_utc <= _now():
        raise CertificateError(
            f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "create a new CA and reissue every certificate"
        )
    return cert, key


def _san_entries(identity: Identity, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(identity.uri),
        x509.DNSName(identity.dns_name),
    ]
    for h in hosts:
        h = h.strip()
        if not h:
            raise CertificateError("--host '': give a DNS name or an IP address")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def issue(
    *,
    ca_dir: Path,
    role: IdentityRole,
    party_id: str,
    hosts: Sequence[str],
    out: Path,
    days: float = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> IssuedFiles:
    """Issue a leaf certificate for ``role``/``party_id``: ``out/PARTY_ID.crt``,
    ``out/PARTY_ID.key`` (0600), and a copy of the CA certificate ``out/ca.crt`` (what the holder
    verifies peers with)."""
    identity = Identity(role, party_id)
    if role is not IdentityRole.OPERATOR and not hosts:
        raise CertificateError(
            f"a {role.value} daemon needs at least one --host "
            "(the DNS name or IP address its peers dial)"
        )
    ca_cert, ca_key = load_ca(ca_dir)
    start, end = _validity(days, not_before, not_after)
    if end > ca_cert.not_valid_after_utc:
        end = ca_cert.not_valid_after_utc
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secfwt"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, party_id),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(identity, hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, ca_copy = out / f"{party_id}.crt", out / f"{party_id}.key", out / CA_CERT
    _write_private(key_path, _key_pem(key), force=force)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force=force)
    if ca_copy.resolve() != (ca_dir / CA_CERT).resolve():
        shutil.copyfile(ca_dir / CA_CERT, ca_copy)
    return IssuedFiles(cert=cert_path, key=key_path, ca=ca_copy, identity=identity, not_after=end)


def read_tls_files(*, cert: Path, key: Path, ca: Path) -> tuple[bytes, bytes, bytes]:
    """Read a holder's certificate, key and CA certificate, checking they fit together."""
    blobs = []
    for what, p in (("certificate", cert), ("private key", key), ("CA certificate", ca)):
        if not p.is_file():
            raise CertificateError(
                f"{what} {p} does not exist; issue one with `secfwt certs issue`"
            )
        blobs.append(p.read_bytes())
    cert_pem, key_pem, ca_pem = blobs
    try:
        c = x509.load_pem_x509_certificate(cert_pem)
        x509.load_pem_x509_certificate(ca_pem)
        k = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{cert}, {key} or {ca} is not valid PEM: {exc}") from None
    if k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(f"{key} is not the private key of {cert}")
    return cert_pem, key_pem, ca_pem


def certificate_identity(cert: Path) -> Identity:
    """The secfwt identity a certificate file carries."""
    try:
        return identity_of_certificate(x509.load_pem_x509_certificate(cert.read_bytes()))
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{cert}: {exc}") from None
