"""Who may call a party, and what the party says it is: the check every call passes, and Hello.

Only pinned identities are answered; Accept, Refuse, Resume, FetchArtifacts and Remove are for
this party's own operators only (``[[operators]]`` without ``accept = false``): a peer, or
another party's operator, can never accept terms on this party's behalf, restart a job here
(a cancelled one in particular: a cancel by this party's operator is a veto only they lift),
take its results or delete them. Kept apart from
the job protocol so that the rule reads in one place; :mod:`secfwt.server.service` applies it
to every request before any job is looked at.
"""

from __future__ import annotations

import secfwt
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.server.config import PartyConfig
from secfwt.server.errors import MessageTooLargeError, NotAuthorizedError, VersionMismatchError
from secfwt.server.protocol import (
    MAX_CAPABILITIES,
    MAX_SHORT_BYTES,
    PROTOCOL_VERSION,
    PeerInfo,
    check_text,
)
from secfwt.server.runner import JobRunner

#: Calls only this party's operators may make.
OPERATOR_ONLY = frozenset({"Accept", "Refuse", "Resume", "FetchArtifacts", "Remove"})


def check_version(v: int) -> None:
    if v != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"protocol version mismatch: the caller speaks version {v}, this daemon speaks "
            f"version {PROTOCOL_VERSION}"
        )


class Access:
    """The pinned identities of one party and the operators that may accept for it."""

    def __init__(self, *, config: PartyConfig, runner: JobRunner) -> None:
        self.identity = config.identity
        self.runner = runner
        self._pinned = config.pinned()
        self._acceptors = frozenset(o.identity for o in config.operators if o.accept)

    def authorize(self, caller: Identity | None, method: str) -> Identity:
        if caller is None:
            raise NotAuthorizedError(
                f"{method}: the caller presented no secfwt identity (a certificate issued by "
                "`secfwt certs issue`)"
            )
        if caller not in self._pinned:
            raise NotAuthorizedError(
                f"{method}: {caller} is not pinned by {self.identity}; the party's operator must "
                "list it under "
                "[[peers]] or [[operators]] in party.toml"
            )
        if method in OPERATOR_ONLY and caller not in self._acceptors:
            what = (
                "a peer daemon"
                if caller.role is not IdentityRole.OPERATOR
                else "an operator with accept = false here"
            )
            raise NotAuthorizedError(
                f"{method}: only operators of {self.identity} may call it; {caller} is {what}"
            )
        return caller

    def info(self) -> PeerInfo:
        caps = ("progress-stream", "artifact-stream", "queue-fifo", *self.runner.capabilities)
        return PeerInfo(
            protocol_version=PROTOCOL_VERSION,
            identity=self.identity,
            software_version=secfwt.__version__,
            capabilities=caps,
        )

    def hello(self, caller: Identity, theirs: PeerInfo) -> PeerInfo:
        check_text(theirs.software_version, field="software_version", limit=MAX_SHORT_BYTES)
        if len(theirs.capabilities) > MAX_CAPABILITIES:
            raise MessageTooLargeError(
                f"capabilities: {len(theirs.capabilities)} entries, the limit is {MAX_CAPABILITIES}"
            )
        for c in theirs.capabilities:
            check_text(c, field="capability", limit=MAX_SHORT_BYTES)
        check_version(theirs.protocol_version)
        if theirs.identity is not None and theirs.identity != caller:
            raise NotAuthorizedError(
                f"Hello: the caller claims to be {theirs.identity} but its certificate says "
                f"{caller}"
            )
        return self.info()
