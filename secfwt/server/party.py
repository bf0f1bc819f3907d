"""One party's side of the job protocol, without gRPC: who may call what, the job state machine,
the queue and the worker. :mod:`secfwt.server.service` only translates messages to these calls.

Rules this module enforces, so that no party runs a job, or reveals a result, that its own
operator did not accept:

- Only pinned identities are answered; Accept, Refuse and FetchArtifacts are for this party's
  own operators only (``[[operators]]`` without ``accept = false``): a peer, or another party's
  operator, can never accept terms on this party's behalf, nor take its results.
- A proposal is refused unless its protocol version is ours, its job id was never seen here
  (replay), its terms equal the job file's ``[[disclosure]]`` list and their digest, its
  participants are this party and pinned peers, and its commitment for this party's role equals
  what this party holds.
- A job starts only after this party accepted (its operator named the terms digest) and every
  other owner reports, over mutually authenticated TLS, that it accepted the same terms and
  proposal digests. A digest mismatch fails the job before anything runs.
- Queue policy: one job runs at a time per party; started jobs wait in a bounded FIFO queue
  (``limits.queue_size``); Start is refused with RESOURCE_EXHAUSTED when the queue is full and
  the job stays accepted, so it can be started later.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import secfwt
from secfwt.config import JobConfig, parse_job, validate
from secfwt.errors import ConfigError, SecfwtError
from secfwt.mpc.provider import Provider
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.roles import COMPUTING_ROLES, Role
from secfwt.server.config import PartyConfig, PeerEntry
from secfwt.server.errors import (
    BusyError,
    CommitmentMismatchError,
    InvalidRequestError,
    JobExistsError,
    JobNotFoundError,
    JobStateError,
    MessageTooLargeError,
    NotAuthorizedError,
    TermsMismatchError,
    VersionMismatchError,
)
from secfwt.server.holdings import DataHoldings, ModelHoldings
from secfwt.server.logs import fields
from secfwt.server.protocol import (
    MAX_CAPABILITIES,
    MAX_REASON_CHARS,
    MAX_SHORT_CHARS,
    MAX_TERMS,
    PROTOCOL_VERSION,
    Commitments,
    JobRecord,
    JobState,
    PeerInfo,
    ProgressEvent,
    Proposal,
    check_job_id,
    check_sha256,
    check_text,
)
from secfwt.server.runner import JobContext, JobRunner
from secfwt.server.store import JobStore

log = logging.getLogger("secfwt.server")

#: Calls only this party's operators may make.
OPERATOR_ONLY = frozenset({"Accept", "Refuse", "FetchArtifacts"})


@dataclasses.dataclass(frozen=True)
class RemoteStatus:
    """What another party reports about a job (its Status answer)."""

    state: JobState
    accepted_terms_digest: str
    accepted_proposal_digest: str
    reason: str = ""


#: Asks a pinned peer daemon for its status of a job (mutual TLS, this party's own certificate).
PeerStatusFn = Callable[[PeerEntry, str], RemoteStatus]
#: Tells a pinned peer daemon that a job was cancelled here: (peer, job id, reason).
PeerCancelFn = Callable[[PeerEntry, str, str], None]


def parse_job_text(text: str, *, where: str) -> JobConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError(f"{where}: the job file is not valid TOML: {exc}") from None
    try:
        cfg = parse_job(raw, where=where)
        validate(cfg)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc)) from None
    if cfg.job.provider is not Provider.TTP:
        raise InvalidRequestError(
            f"{where}: job.provider = {cfg.job.provider.value.lower()!r} lets the model owner "
            "learn the data owner's inputs; "
            "party daemons only run jobs with provider = 'ttp' (the dealer supplies randomness)"
        )
    return cfg


class Party:
    def __init__(
        self,
        *,
        config: PartyConfig,
        runner: JobRunner,
        peer_status: PeerStatusFn,
        store: JobStore | None = None,
        peer_cancel: PeerCancelFn | None = None,
    ) -> None:
        self.config = config
        self.peer_cancel = peer_cancel
        self.identity = config.identity
        self.role = config.party.role
        self.runner = runner
        self.peer_status = peer_status
        self.store = store or JobStore(config.state_dir)
        self.model = ModelHoldings(config.model) if config.model is not None else None
        self.data = DataHoldings(config.data) if config.data is not None else None
        self._pinned = config.pinned()
        self._acceptors = frozenset(o.identity for o in config.operators if o.accept)
        self._cond = threading.Condition()
        self._records: dict[str, JobRecord] = {}
        self._events: dict[str, list[ProgressEvent]] = {}
        self._cancels: dict[str, threading.Event] = {}
        self._queue: queue.Queue[str] = queue.Queue(maxsize=config.limits.queue_size)
        self._stopping = threading.Event()
        self._running: str | None = None
        self._streams = 0
        self._load()
        self._worker = threading.Thread(
            target=self._work, name=f"secfwt-worker-{self.identity.party_id}", daemon=True
        )
        self._worker.start()

    # -- identity and authorization ---------------------------------------------------------

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
        check_text(theirs.software_version, field="software_version", limit=MAX_SHORT_CHARS)
        if len(theirs.capabilities) > MAX_CAPABILITIES:
            raise MessageTooLargeError(
                f"capabilities: {len(theirs.capabilities)} entries, the limit is {MAX_CAPABILITIES}"
            )
        for c in theirs.capabilities:
            check_text(c, field="capability", limit=MAX_SHORT_CHARS)
        self._check_version(theirs.protocol_version)
        if theirs.identity is not None and theirs.identity != caller:
            raise NotAuthorizedError(
                f"Hello: the caller claims to be {theirs.identity} but its certificate says "
                f"{caller}"
            )
        return self.info()

    @staticmethod
    def _check_version(v: int) -> None:
        if v != PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"protocol version mismatch: the caller speaks version {v}, this daemon speaks "
                f"version {PROTOCOL_VERSION}"
            )

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
        self._check_version(p.protocol_version)
        check_job_id(p.job_id)
        check_text(p.job_toml, field="job_toml", limit=self.config.limits.max_job_toml_bytes)
        if len(p.terms.terms) > MAX_TERMS:
            raise MessageTooLargeError(
                f"terms: {len(p.terms.terms)} entries, the limit is {MAX_TERMS}"
            )
        check_sha256(p.terms_digest, field="terms_digest")
        with self._cond:
            if p.job_id in self._records or self.store.job_dir(p.job_id).exists():
                raise JobExistsError(
                    f"job id {p.job_id!r} was already proposed to this party; job ids are never "
                    "reused (replay refused)"
                )
        cfg = parse_job_text(p.job_toml, where=f"job {p.job_id}")
        rec = JobRecord(proposal=p, state=JobState.PROPOSED, proposed_by=caller.uri)
        try:
            self._check_proposal(p, cfg)
        except SecfwtError as exc:
            rec.state, rec.reason = JobState.REFUSED, f"refused on proposal: {exc}"
            self._create(rec)
            log.warning(
                "proposal refused", extra=fields(job=p.job_id, by=str(caller), reason=str(exc))
            )
            raise
        self._create(rec)
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

    def _create(self, rec: JobRecord) -> None:
        self.store.create(rec)  # atomic: a concurrent replay of the same id loses here
        with self._cond:
            self._records[rec.job_id] = rec
            self._events[rec.job_id] = []
            self._emit(
                rec, message=f"{rec.state.value}: {rec.reason}" if rec.reason else rec.state.value
            )
            self.store.save(rec)

    def _check_proposal(self, p: Proposal, cfg: JobConfig) -> None:
        if cfg.terms.to_list() != p.terms.to_list():
            raise TermsMismatchError(
                "the proposal's disclosure terms differ from the job file's [[disclosure]] list"
            )
        if p.terms.digest() != p.terms_digest:
            raise TermsMismatchError(
                f"terms digest mismatch: the proposal says {p.terms_digest}, its terms hash to "
                f"{p.terms.digest()}"
            )
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
        with self._cond:
            rec = self._get(job_id)
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
            self._require(rec, {JobState.PROPOSED}, "accept")
            rec.accepted_terms_digest, rec.accepted_proposal_digest, rec.accepted_by = (
                p.terms_digest,
                p.digest(),
                caller.uri,
            )
            self._transition(rec, JobState.ACCEPTED)
        log.info(
            "job accepted", extra=fields(job=job_id, by=str(caller), terms_digest=p.terms_digest)
        )
        return rec

    def refuse(self, caller: Identity, job_id: str, reason: str) -> JobRecord:
        check_text(reason, field="reason", limit=MAX_REASON_CHARS)
        with self._cond:
            rec = self._get(job_id)
            self._require(rec, {JobState.PROPOSED, JobState.ACCEPTED}, "refuse")
            self._transition(
                rec, JobState.REFUSED, reason=f"refused by {caller}: {reason or 'no reason given'}"
            )
        log.info("job refused", extra=fields(job=job_id, by=str(caller), reason=reason))
        return rec

    # -- start, resume, cancel ---------------------------------------------------------------

    def start(self, caller: Identity, job_id: str) -> JobRecord:
        with self._cond:
            rec = self._get(job_id)
            if rec.state in (JobState.STARTED, JobState.RUNNING):
                return rec  # idempotent: every participant's operator may call Start
            self._require(rec, {JobState.ACCEPTED}, "start")
        self._confirm_other_owners(rec, resuming=False)
        return self._enqueue(rec, {JobState.ACCEPTED}, resume=False, by=caller)

    def resume(self, caller: Identity, job_id: str) -> JobRecord:
        with self._cond:
            rec = self._get(job_id)
            if rec.state in (JobState.STARTED, JobState.RUNNING):
                return rec
            self._require(rec, {JobState.FAILED, JobState.CANCELLED}, "resume")
            if not rec.accepted_terms_digest:
                raise JobStateError(
                    f"job {job_id} was never accepted by this party; it cannot be resumed"
                )
        self._confirm_other_owners(rec, resuming=True)
        return self._enqueue(rec, {JobState.FAILED, JobState.CANCELLED}, resume=True, by=caller)

    def _confirm_other_owners(self, rec: JobRecord, *, resuming: bool) -> None:
        """Ask every other owner (over mutual TLS) which digests it accepted; same as ours or no
        start."""
        for role in COMPUTING_ROLES:
            ident = rec.proposal.participant(role)
            if ident is None or ident == self.identity:
                continue
            peer = self.config.peer(ident)
            if peer is None:  # checked at proposal; the config may have changed since
                raise NotAuthorizedError(
                    f"job {rec.job_id}: {ident} is no longer a pinned peer of {self.identity}"
                )
            try:
                theirs = self.peer_status(peer, rec.job_id)
            except JobNotFoundError:
                raise JobStateError(
                    f"job {rec.job_id}: {ident} has not received this job yet; propose it there too"
                ) from None
            except SecfwtError as exc:  # unreachable, or it does not pin us: the job stays as it is
                raise JobStateError(
                    f"job {rec.job_id}: cannot confirm that {ident} at {peer.address} accepted "
                    f"it: {exc}"
                ) from None
            if theirs.state is JobState.REFUSED:
                with self._cond:
                    self._transition(
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
                with self._cond:
                    if not resuming:
                        self._transition(rec, JobState.FAILED, reason=reason)
                log.error(
                    "digest mismatch between owners",
                    extra=fields(job=rec.job_id, peer=str(ident), ours=ours, theirs=other),
                )
                raise TermsMismatchError(f"job {rec.job_id}: {reason}")

    def _enqueue(
        self, rec: JobRecord, allowed: set[JobState], *, resume: bool, by: Identity
    ) -> JobRecord:
        with self._cond:
            if rec.state in (JobState.STARTED, JobState.RUNNING):
                return rec
            self._require(rec, allowed, "resume" if resume else "start")
            if self._stopping.is_set():
                raise BusyError(
                    f"{self.identity} is shutting down; start job {rec.job_id} again after its "
                    "restart"
                )
            prev = rec.state
            try:
                self._queue.put_nowait(rec.job_id)
            except queue.Full:
                raise BusyError(
                    f"job queue of {self.identity} is full ({self.config.limits.queue_size} "
                    "waiting behind the running job); "
                    f"job {rec.job_id} stays {prev.value}, start it again later"
                ) from None
            rec.resume_requested = resume
            rec.attempts += 1
            self._transition(rec, JobState.STARTED, reason="")
        log.info(
            "job started" if not resume else "job resumed", extra=fields(job=rec.job_id, by=str(by))
        )
        return rec

    def cancel(self, caller: Identity, job_id: str, reason: str) -> JobRecord:
        check_text(reason, field="reason", limit=MAX_REASON_CHARS)
        why = f"cancelled by {caller}" + (f": {reason}" if reason else "")
        with self._cond:
            rec = self._get(job_id)
            if rec.state.terminal:
                raise JobStateError(f"job {job_id} is already {rec.state.value}; nothing to cancel")
            if rec.state is JobState.RUNNING:
                rec.reason = why
                self._cancels[job_id].set()  # the worker records CANCELLED when the runner returns
                self._emit(rec, message=f"cancel requested: {why}")
            else:
                self._transition(
                    rec, JobState.CANCELLED, reason=why
                )  # a queued id is skipped by the worker
        log.info("job cancel", extra=fields(job=job_id, by=str(caller), reason=reason))
        if caller.role is IdentityRole.OPERATOR and self.peer_cancel is not None:
            # An operator's cancel reaches every participant, so the peers stop the job as
            # cancelled (not as a lost peer). A peer's cancel is not passed on: no echo.
            threading.Thread(
                target=self._cancel_peers,
                args=(rec, why),
                name=f"secfwt-cancel-{job_id}",
                daemon=True,
            ).start()
        return rec

    def _cancel_peers(self, rec: JobRecord, why: str) -> None:
        for ident in rec.proposal.participants:
            peer = self.config.peer(ident) if ident != self.identity else None
            if peer is None or self.peer_cancel is None:
                continue
            try:
                self.peer_cancel(
                    peer, rec.job_id, why[:MAX_REASON_CHARS]
                )  # recorded there as "cancelled by <us>: <why>"
            except SecfwtError as exc:  # already ended there, unreachable: its own state stands
                log.info(
                    "peer not cancelled",
                    extra=fields(job=rec.job_id, peer=str(ident), why=str(exc)),
                )

    # -- status, progress, artifacts ----------------------------------------------------------

    def status(self, caller: Identity, job_id: str) -> JobRecord:
        with self._cond:
            return dataclasses.replace(self._get(job_id))

    def watch(
        self,
        caller: Identity,
        job_id: str,
        after_seq: int,
        *,
        active: Callable[[], bool],
        poll_s: float = 0.5,
    ) -> Iterator[ProgressEvent]:
        """Progress events after ``after_seq``: the history, then live ones until the job ends."""
        with self._cond:
            self._get(job_id)
            if self._streams >= self.config.limits.max_streams:
                raise BusyError(
                    f"{self.identity} already serves {self._streams} progress streams "
                    "(limits.max_streams); try again later"
                )
            self._streams += 1
        try:
            yield from self._watch(job_id, after_seq, active=active, poll_s=poll_s)
        finally:
            with self._cond:
                self._streams -= 1

    def _watch(
        self, job_id: str, after_seq: int, *, active: Callable[[], bool], poll_s: float
    ) -> Iterator[ProgressEvent]:
        sent = after_seq
        while True:
            with self._cond:
                rec = self._get(job_id)
                evs = [e for e in self._events_of(job_id) if e.seq > sent]
                done = rec.state.terminal
                if not evs and not done:
                    self._cond.wait(timeout=poll_s)
                    evs = [e for e in self._events_of(job_id) if e.seq > sent]
                    done = rec.state.terminal
            for e in evs:
                yield e
                sent = e.seq
            if done or self._stopping.is_set() or not active():
                return

    def artifact_files(self, caller: Identity, job_id: str) -> list[Path]:
        with self._cond:
            rec = self._get(job_id)
            if rec.state is not JobState.FINISHED:
                raise JobStateError(
                    f"job {job_id} is {rec.state.value}; artifacts are served once it finished"
                )
        d = self.store.artifacts_dir(job_id)
        return sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink())

    # -- internals ----------------------------------------------------------------------------

    def _get(self, job_id: str) -> JobRecord:
        check_job_id(job_id)
        rec = self._records.get(job_id)
        if rec is None:
            raise JobNotFoundError(f"no job {job_id!r} at {self.identity}")
        return rec

    @staticmethod
    def _require(rec: JobRecord, allowed: set[JobState], action: str) -> None:
        if rec.state not in allowed:
            names = " or ".join(sorted(s.value for s in allowed))
            detail = f" ({rec.reason})" if rec.reason else ""
            raise JobStateError(
                f"cannot {action} job {rec.job_id}: it is {rec.state.value}{detail}; {action} "
                f"needs it {names}"
            )

    def _events_of(self, job_id: str) -> list[ProgressEvent]:
        evs = self._events.get(job_id)
        if evs is None:
            evs = self._events[job_id] = self.store.events(job_id)
        return evs

    def _emit(self, rec: JobRecord, **kw: Any) -> ProgressEvent:
        """Append a progress event (caller holds the lock) and wake watchers."""
        evs = self._events_of(rec.job_id)
        ev = ProgressEvent(
            seq=(evs[-1].seq + 1) if evs else 1, time=time.time(), state=rec.state, **kw
        )
        evs.append(ev)
        self.store.append_event(rec.job_id, ev)
        rec.last_progress = ev
        self._cond.notify_all()
        return ev

    def _transition(self, rec: JobRecord, state: JobState, *, reason: str | None = None) -> None:
        """Change state (caller holds the lock), persist, and tell watchers."""
        rec.state = state
        if reason is not None:
            rec.reason = reason
        rec.updated = time.time()
        self._emit(
            rec, message=state.value + (f": {rec.reason}" if rec.reason and state.terminal else "")
        )
        self.store.save(rec)

    def _load(self) -> None:
        with self._cond:  # _emit and _transition notify watchers: they need the lock held
            requeue = []
            for rec in self.store.load_all():
                self._records[rec.job_id] = rec
                if rec.state is JobState.RUNNING:
                    rec.state = JobState.FAILED
                    rec.reason = (
                        "interrupted: the daemon stopped while the job was running; `secfwt job "
                        "resume` continues from its last checkpoint"
                    )
                    rec.updated = time.time()
                    self._emit(rec, message=f"failed: {rec.reason}")
                    self.store.save(rec)
                elif rec.state is JobState.STARTED:
                    requeue.append(rec)
            for rec in sorted(requeue, key=lambda r: r.updated):
                try:
                    self._queue.put_nowait(rec.job_id)
                except queue.Full:
                    self._transition(rec, JobState.ACCEPTED, reason="")
                    log.warning(
                        "queue full after restart; job back to accepted",
                        extra=fields(job=rec.job_id),
                    )
            if self._records:
                counts: dict[str, int] = {}
                for r in self._records.values():
                    counts[r.state.value] = counts.get(r.state.value, 0) + 1
                log.info(
                    "state loaded",
                    extra=fields(jobs=len(self._records), states=counts, requeued=len(requeue)),
                )

    def _context(self, rec: JobRecord) -> JobContext:
        cfg = parse_job_text(rec.proposal.job_toml, where=f"job {rec.job_id}")
        peers = {}
        for ident in rec.proposal.participants:
            if ident != self.identity:
                entry = self.config.peer(ident)
                if entry is not None and ident.role.party_role is not None:
                    peers[ident.role.party_role] = entry
        return JobContext(
            job_id=rec.job_id,
            role=self.role,
            identity=self.identity,
            job=cfg,
            proposal=rec.proposal,
            peers=peers,
            party=self.config,
            work_dir=self.store.work_dir(rec.job_id),
            artifacts_dir=self.store.artifacts_dir(rec.job_id),
            resume=rec.resume_requested,
        )

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                job_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._cond:
                rec = self._records.get(job_id)
                if rec is None or rec.state is not JobState.STARTED:
                    continue  # cancelled while queued
                cancel = self._cancels[job_id] = threading.Event()
                self._running = job_id
                self._transition(rec, JobState.RUNNING, reason="")
            self._run_one(rec, cancel)

    def _run_one(self, rec: JobRecord, cancel: threading.Event) -> None:
        log.info(
            "job running",
            extra=fields(job=rec.job_id, attempt=rec.attempts, resume=rec.resume_requested),
        )

        def progress(**kw: Any) -> None:
            ev: dict[str, Any] = {
                k: kw[k] for k in ("phase", "step", "total_steps", "message") if k in kw
            }
            if "metrics" in kw:
                ev["metrics"] = tuple(
                    sorted((str(k), float(v)) for k, v in dict(kw["metrics"]).items())
                )
            with self._cond:
                self._emit(rec, **ev)

        state, reason = JobState.FINISHED, ""
        try:
            summary = self.runner.run(self._context(rec), progress, cancel)
            if cancel.is_set():
                state = JobState.CANCELLED
        except Exception as exc:  # a runner failure fails the job, never the daemon
            state = JobState.CANCELLED if cancel.is_set() else JobState.FAILED
            reason = (
                str(exc)
                if isinstance(exc, (SecfwtError, NotImplementedError))
                else f"{type(exc).__name__}: {exc}"
            )
            if state is JobState.FAILED:
                log.error(
                    "job failed",
                    extra=fields(job=rec.job_id, reason=reason),
                    exc_info=not isinstance(exc, (SecfwtError, NotImplementedError)),
                )
            summary = None
        with self._cond:
            if state is JobState.FINISHED and summary is not None:
                (self.store.artifacts_dir(rec.job_id) / "summary.json").write_text(
                    json.dumps(summary, indent=1, default=str)
                )
            rec.artifacts = tuple(
                p.name
                for p in sorted(self.store.artifacts_dir(rec.job_id).iterdir())
                if p.is_file()
            )
            if state is JobState.CANCELLED:
                reason = rec.reason or "cancelled"
            self._transition(rec, state, reason=reason)
            self._cancels.pop(rec.job_id, None)
            self._running = None
        log.info("job ended", extra=fields(job=rec.job_id, state=state.value, reason=reason))

    def close(self, *, timeout: float) -> None:
        """Stop taking jobs, cancel the running one, wait up to ``timeout`` for it, persist."""
        self._stopping.set()
        with self._cond:
            running = self._running
            if running is not None:
                rec = self._records[running]
                rec.reason = (
                    "cancelled: the daemon is shutting down; `secfwt job resume` continues from "
                    "its last checkpoint"
                )
                self._cancels[running].set()
            self._cond.notify_all()
        self._worker.join(timeout=timeout)
        with self._cond:
            if self._worker.is_alive() and self._running is not None:
                rec = self._records[self._running]
                self._transition(
                    rec,
                    JobState.FAILED,
                    reason=(
                        "interrupted: the runner did not stop within the shutdown grace; resume "
                        "it after the restart"
                    ),
                )
        log.info(
            "party stopped",
            extra=fields(party=str(self.identity), worker_stopped=not self._worker.is_alive()),
        )
