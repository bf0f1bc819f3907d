"""Who a daemon or a client is: a role and a party id, carried in its certificate.

A certificate issued by ``secfwt certs issue`` encodes its identity twice:

- a URI SAN ``secfwt://ROLE/PARTY_ID`` (spiffe-style), which a daemon reads from the peer
  certificate on every call (:func:`identity_from_pem`) and checks against its pinned set;
- a DNS SAN ``PARTY_ID.ROLE.secfwt`` (role with dashes), which a client names as the TLS target
  (``grpc.ssl_target_name_override``) when it dials a pinned peer: the handshake then succeeds
  only if the server's certificate was issued to that exact identity, whatever its address.

Party ids are DNS labels ([a-z0-9-], at most 63 characters) so that both forms are valid.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re

from cryptography import x509

from secfwt.errors import ConfigError
from secfwt.roles import Role

URI_SCHEME = "secfwt"
DNS_SUFFIX = "secfwt"
# fullmatch: "$" would also match before a final newline
_PARTY_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class IdentityRole(enum.Enum):
    """The roles a certificate can carry: the three party roles, and operators (people's
    clients)."""

    MODEL_OWNER = "model_owner"
    DATA_OWNER = "data_owner"
    DEALER = "dealer"
    OPERATOR = "operator"

    @classmethod
    def parse(cls, text: str) -> IdentityRole:
        norm = str(text).strip().lower().replace("-", "_")
        for r in cls:
            if r.value == norm:
                return r
        raise ConfigError(
            f"unknown role {text!r}; expected one of: {', '.join(r.value for r in cls)}"
        )

    @property
    def party_role(self) -> Role | None:
        """The job role (rank) of a party identity; None for operators."""
        return None if self is IdentityRole.OPERATOR else Role(self.value)

    @classmethod
    def of(cls, role: Role) -> IdentityRole:
        return cls(role.value)


def check_party_id(party_id: str, *, where: str = "party id") -> str:
    if not isinstance(party_id, str) or not _PARTY_ID.fullmatch(party_id):
        raise ConfigError(
            f"{where} {party_id!r}: use lower-case letters, digits and dashes (a DNS label, at "
            "most 63 characters), e.g. 'hospital-a'"
        )
    return party_id


@dataclasses.dataclass(frozen=True, order=True)
class Identity:
    role: IdentityRole
    party_id: str

    def __post_init__(self) -> None:
        check_party_id(self.party_id)

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}://{self.role.value}/{self.party_id}"

    @property
    def dns_name(self) -> str:
        """The DNS SAN that names this identity, used as the TLS target name by its peers."""
        return f"{self.party_id}.{self.role.value.replace('_', '-')}.{DNS_SUFFIX}"

    def __str__(self) -> str:
        return f"{self.role.value}/{self.party_id}"

    @classmethod
    def parse_uri(cls, uri: str) -> Identity:
        prefix = f"{URI_SCHEME}://"
        if not uri.startswith(prefix) or uri.count("/") != 3:
            raise ConfigError(f"identity {uri!r}: expected {prefix}ROLE/PARTY_ID")
        role, party_id = uri[len(prefix) :].split("/")
        try:  # exactly as written by ``uri``: no case folding or stripping here
            ident_role = IdentityRole(role)
        except ValueError:
            raise ConfigError(
                f"identity {uri[:100]!r}: unknown role {role[:40]!r}; expected one of: "
                f"{', '.join(r.value for r in IdentityRole)}"
            ) from None
        return cls(ident_role, check_party_id(party_id))


def identity_of_certificate(cert: x509.Certificate) -> Identity:
    """The identity in a certificate's ``secfwt://`` URI SAN; ConfigError when it has none or
    several."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ConfigError(
            "certificate has no subjectAltName, so no secfwt identity; issue it with `secfwt certs "
            "issue`"
        ) from None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(f"{URI_SCHEME}://")
    ]
    if len(uris) != 1:
        raise ConfigError(
            f"certificate must carry exactly one {URI_SCHEME}:// URI SAN, found {len(uris)}; issue "
            "it with `secfwt certs issue`"
        )
    return Identity.parse_uri(uris[0])


@functools.lru_cache(maxsize=256)
def identity_from_pem(pem: bytes) -> Identity:
    """Identity of a PEM certificate (the peer certificate gRPC hands the servicer)."""
    return identity_of_certificate(x509.load_pem_x509_certificate(pem))
