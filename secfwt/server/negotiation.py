"""How a party agrees to a job: commitments, proposals, its operator's accept or refuse, and the
check that every other owner accepted the same terms before the job may start.

These rules decide whether a job may ever run, so they live together and apart from running it
(:mod:`secfwt.server.execution`):

- A proposal is refused unless its protocol version is ours, its job id was never seen here
  (replay), its terms equal the job file's ``[[disclosure]]`` list and their digest, its
  participants are this party and pinned peers, and its commitment for this party's role equals
  what this party holds.
- A proposal is refused before it is parsed when its caller already has
  ``limits.max_proposals_per_caller`` unaccepted jobs here (:mod:`secfwt.server.retention`).
- A job starts only after this party accepted (its operator named the terms digest) and every
  other owner reports, over mutually authenticated TLS, that it accepted the same terms and
  proposal digests. A digest mismatch fails the job before anything runs.
- A cancellation by a party's operator is a veto: no other party resumes the job while it
  stands (every other participant is asked), unless that party's own operator cancelled it too
  (two vetoes are lifted one after the other). Only a party's own operators resume it there
  (:mod:`secfwt.server.access`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from secfwt.config import JobConfig
from secfwt.errors import ConfigError, SecfwtError
from secfwt.mpc import device as mpc_device
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.roles import COMPUTING_ROLES, Role
from secfwt.runtime.policy import check_policy
from secfwt.server.access import check_version
from secfwt.server.config import PartyConfig, PeerEntry
from secfwt.server.errors import (
    CommitmentMismatchError,
    InvalidRequestError,
    JobExistsError,
    JobNotFoundError,
    JobStateError,
    MessageTooLargeError,
    NotAuthorizedError,
    TermsMismatchError,
)
from secfwt.server.holdings import DataHoldings, ModelHoldings
from secfwt.server.jobfile import parse_job_text
from secfwt.server.journal import JobJournal
from secfwt.server.logs import fields
from secfwt.server.protocol import (
    MAX_REASON_BYTES,
    MAX_TERMS,
    Commitments,
    JobRecord,
    JobState,
    Proposal,
    check_job_id,
    check_sha256,
    check_text,
    clip_utf8,
    one_line,
)
from secfwt.server.retention import Retention

log = logging.getLogger("secfwt.server")


@dataclasses.dataclass(frozen=True)
class RemoteStatus:
    """What another party reports about a job (its Status answer)."""

    state: JobState
    accepted_terms_digest: str
    accepted_proposal_digest: str
    reason: str = ""
    cancelled_by: str = ""  # identity URI, when cancelled


#: Asks a pinned peer daemon for its status of a job (mutual TLS, this party's own certificate).
PeerStatusFn = Callable[[PeerEntry, str], RemoteStatus]


class Negotiation:
    """One party's side of agreeing to jobs; records every outcome in the journal."""

    def __init__(
        self,
        *,
        config: PartyConfig,
        journal: JobJournal,
        peer_status: PeerStatusFn,
        retention: Retention,
        model: ModelHoldings | None,
        data: DataHoldings | None,
    ) -> None:
        self.config = config
        self.identity = config.identity
        self.role = config.party.role
        self.journal = journal
        self.retention = retention
        self.peer_status = peer_status
        self.model = model
        self.data = data

    # -- commitments and proposals ----------------------------------------------------------

    def own_commitments(self, cfg: JobConfig) -> Commitments:
        if self.role is Role.MODEL_OWNER and self.model is not None:
            return Commitments(model=self.model.commitment())
        if self.role is Role.DATA_OWNER and self.data is not None:
            return Commitments(data=self.data.commitment(cfg))
        return Commitments()

    def commitment_for(self, caller: Identity, job_toml: str) -> Commitments:
        check_text(job_toml, field="job_toml", limit=self.config.limits.max_job_toml_bytes)
        return self.own_commitments(parse_job_text(job_toml, where="job file"))

    def propose(self, caller: Identity, p: Proposal) -> JobRecord:
        check_version(p.protocol_version)
        check_job_id(p.job_id)
        check_text(p.job_toml, field="job_toml", limit=self.config.limits.max_job_toml_bytes)
        if len(p.terms.terms) > MAX_TERMS:
            raise MessageTooLargeError(
                f"terms: {len(p.terms.terms)} entries, the limit is {MAX_TERMS}"
            )
        check_sha256(p.terms_digest, field="terms_digest")
        if self.journal.known(p.job_id):
            raise JobExistsError(
                f"job id {p.job_id!r} was already proposed to this party; job ids are never "
                "reused (replay refused)"
            )
        with self.journal.cond:  # before parsing: a caller at its bound costs nothing more
            self.retention.admit(caller)
        cfg = parse_job_text(p.job_toml, where=f"job {p.job_id}")
        rec = JobRecord(proposal=p, state=JobState.PROPOSED, proposed_by=caller.uri)
        try:
            self._check_proposal(p, cfg)
        except SecfwtError as exc:
            reason = clip_utf8(f"refused on proposal: {one_line(str(exc))}", MAX_REASON_BYTES)
            rec.state, rec.reason = JobState.REFUSED, reason
            self._record(caller, rec)
            log.warning(
                "proposal refused", extra=fields(job=p.job_id, by=str(caller), reason=str(exc))
            )
            raise
        self._record(caller, rec)
        log.info(
            "job proposed",
            extra=fields(
                job=p.job_id,
                by=str(caller),
                terms_digest=p.terms_digest,
                proposal_digest=p.digest(),
            ),
        )
        return rec

    def _record(self, caller: Identity, rec: JobRecord) -> None:
        with self.journal.cond:  # the count and the new record in one step
            self.retention.admit(caller)
            self.journal.create(rec)

    def _check_proposal(self, p: Proposal, cfg: JobConfig) -> None:
        if cfg.terms.to_list() != p.terms.to_list():
            raise TermsMismatchError(
                "the proposal's disclosure terms differ from the job file's [[disclosure]] list"
            )
        if cfg.terms.digest() != p.terms_digest:  # the list and the job's safety policy
            raise TermsMismatchError(
                f"terms digest mismatch: the proposal says {p.terms_digest}, its terms and safety "
                f"policy hash to {cfg.terms.digest()}"
            )
        policy = self.config.safety_policy
        if self.role is Role.MODEL_OWNER and policy is not None:
            check_policy(cfg, policy)
        mpc_device.resolve(cfg.run.device, source=cfg.source)  # on this host
        roles = sorted(i.role.value for i in p.participants)
        if roles != sorted(r.value for r in Role):
            raise InvalidRequestError(
                "participants: expected one model_owner, one data_owner and one dealer, got "
                f"{roles}"
            )
        mine = p.participant(self.role)
        if mine != self.identity:
            raise NotAuthorizedError(
                f"participants: the proposal names {mine} as {self.role.value} but this daemon "
                f"is {self.identity}"
            )
        for ident in p.participants:
            if ident != self.identity and self.config.peer(ident) is None:
                raise NotAuthorizedError(
                    f"participants: {ident} is not a pinned peer of {self.identity}; add it to "
                    "[[peers]] if you trust it"
                )
        c = p.commitments
        if c.model is None or c.data is None:
            missing = [n for n, v in (("model", c.model), ("data", c.data)) if v is None]
            raise CommitmentMismatchError(
                f"commitments: the proposal carries no {' and no '.join(missing)} commitment"
            )
        held = self.own_commitments(cfg)
        if self.role is Role.MODEL_OWNER and held.model is not None:
            diff = c.model.differences(held.model)
            if diff:
                raise CommitmentMismatchError("model commitment mismatch: " + "; ".join(diff))
        if self.role is Role.DATA_OWNER and held.data is not None:
            diff = c.data.differences(held.data)
            if diff:
                raise CommitmentMismatchError("data commitment mismatch: " + "; ".join(diff))

    # -- acceptance -------------------------------------------------------------------------

    def accept(
        self, caller: Identity, job_id: str, terms_digest: str, proposal_digest: str = ""
    ) -> JobRecord:
        j = self.journal
        with j.cond:
            rec = j.get(job_id)
            p = rec.proposal
            if terms_digest != p.terms_digest:
                raise TermsMismatchError(
                    f"job {job_id}: you accepted terms digest {terms_digest or '(none)'} but its "
                    "proposal's terms have digest "
                    f"{p.terms_digest}; review the terms (`secfwt job status {job_id} --json`) "
                    "and accept that digest"
                )
            if proposal_digest and proposal_digest != p.digest():
                raise TermsMismatchError(
                    f"job {job_id}: you accepted proposal digest {proposal_digest} but the "
                    f"proposal hashes to {p.digest()}"
                )
            if rec.state is JobState.ACCEPTED:
                return rec  # idempotent
            j.require(rec, {JobState.PROPOSED}, "accept")
            rec.accepted_terms_digest, rec.accepted_proposal_digest, rec.accepted_by = (
                p.terms_digest,
                p.digest(),
                caller.uri,
            )
            j.transition(rec, JobState.ACCEPTED)
        log.info(
            "job accepted", extra=fields(job=job_id, by=str(caller), terms_digest=p.terms_digest)
        )
        return rec

    def refuse(self, caller: Identity, job_id: str, reason: str) -> JobRecord:
        check_text(reason, field="reason", limit=MAX_REASON_BYTES)
        j = self.journal
        with j.cond:
            rec = j.get(job_id)
            j.require(rec, {JobState.PROPOSED, JobState.ACCEPTED}, "refuse")
            j.transition(
                rec, JobState.REFUSED, reason=f"refused by {caller}: {reason or 'no reason given'}"
            )
        log.info("job refused", extra=fields(job=job_id, by=str(caller), reason=reason))
        return rec

    # -- before start or resume ---------------------------------------------------------------

    def confirm_other_owners(self, rec: JobRecord, *, resuming: bool) -> None:
        """Ask every other owner (over mutual TLS) which digests it accepted; same as ours or no
        start. Resuming, ask the dealer too, and refuse while another party's operator's cancel
        stands (a veto), unless this party's own operator cancelled it as well."""
        vetoed_here = _by_operator(rec.cancelled_by) and rec.state is JobState.CANCELLED
        for ident in rec.proposal.participants:
            owner = ident.role.party_role in COMPUTING_ROLES
            if ident == self.identity or not (owner or resuming):
                continue
            peer = self.config.peer(ident)
            if peer is None:  # checked at proposal; the config may have changed since
                raise NotAuthorizedError(
                    f"job {rec.job_id}: {ident} is no longer a pinned peer of {self.identity}"
                )
            try:
                theirs = self.peer_status(peer, rec.job_id)
            except JobNotFoundError as exc:
                raise JobStateError(
                    f"job {rec.job_id}: {ident} does not hold this job ({exc}); propose it there "
                    "too"
                ) from None
            except SecfwtError as exc:  # unreachable, or it does not pin us: the job stays as it is
                raise JobStateError(
                    f"job {rec.job_id}: cannot confirm that {ident} at {peer.address} accepted "
                    f"it: {exc}"
                ) from None
            if (
                resuming
                and not vetoed_here
                and theirs.state is JobState.CANCELLED
                and _by_operator(theirs.cancelled_by)
            ):
                who = Identity.parse_uri(theirs.cancelled_by)
                raise JobStateError(
                    f"job {rec.job_id}: {ident}'s operator {who} cancelled it there; it resumes "
                    f"only after an operator of {ident} resumed it there (`secfwt job resume "
                    f"{rec.job_id} --to {peer.address}`)"
                )
            if not owner:
                continue
            if theirs.state is JobState.REFUSED:
                with self.journal.cond:
                    rec.cancelled_by = ident.uri
                    self.journal.transition(
                        rec, JobState.CANCELLED, reason=f"{ident} refused the job: {theirs.reason}"
                    )
                raise JobStateError(
                    f"job {rec.job_id}: {ident} refused it ({theirs.reason}); it will not start"
                )
            if not theirs.accepted_terms_digest:
                raise JobStateError(
                    f"job {rec.job_id}: {ident} has not accepted the terms yet (its state: "
                    f"{theirs.state.value}); start again once it has"
                )
            if (
                theirs.accepted_terms_digest != rec.accepted_terms_digest
                or theirs.accepted_proposal_digest != rec.accepted_proposal_digest
            ):
                what = (
                    "terms"
                    if theirs.accepted_terms_digest != rec.accepted_terms_digest
                    else "proposal"
                )
                ours = (
                    rec.accepted_terms_digest if what == "terms" else rec.accepted_proposal_digest
                )
                other = (
                    theirs.accepted_terms_digest
                    if what == "terms"
                    else theirs.accepted_proposal_digest
                )
                reason = (
                    f"{what} digest mismatch: {self.identity} accepted {ours}, {ident} accepted "
                    f"{other}; the job never starts"
                )
                with self.journal.cond:
                    if not resuming:
                        self.journal.transition(rec, JobState.FAILED, reason=reason)
                log.error(
                    "digest mismatch between owners",
                    extra=fields(job=rec.job_id, peer=str(ident), ours=ours, theirs=other),
                )
                raise TermsMismatchError(f"job {rec.job_id}: {reason}")


def _by_operator(uri: str) -> bool:
    """Whether a job's canceller (an identity URI, or "" for the daemon itself) is an operator."""
    try:
        return Identity.parse_uri(uri).role is IdentityRole.OPERATOR
    except ConfigError:
        return False
