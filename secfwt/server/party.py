"""One party's side of the job protocol, without gRPC: the one object the servicer calls.

:mod:`secfwt.server.service` only translates messages to calls on :class:`Party`, and
:class:`Party` only wires together the parts that do the work, so that no party runs a job, or
reveals a result, that its own operator did not accept:

- :mod:`secfwt.server.access` who may call what (pinned identities, operator-only calls), Hello;
- :mod:`secfwt.server.negotiation` commitments, proposals, accept and refuse, and the check that
  every other owner accepted the same digests before a start or resume;
- :mod:`secfwt.server.execution` the bounded FIFO queue, the worker, cancel and shutdown;
- :mod:`secfwt.server.journal` job records and progress events under one lock, persisted;
- :mod:`secfwt.server.retention` the per-caller bound on unaccepted jobs, their expiry, and
  removal by an operator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from secfwt.config import JobConfig
from secfwt.pki.identity import Identity
from secfwt.server.access import Access
from secfwt.server.config import PartyConfig
from secfwt.server.errors import JobStateError
from secfwt.server.execution import JobExecutor, PeerCancelFn
from secfwt.server.holdings import DataHoldings, ModelHoldings
from secfwt.server.journal import JobJournal
from secfwt.server.negotiation import Negotiation, PeerStatusFn
from secfwt.server.protocol import (
    Commitments,
    JobRecord,
    JobState,
    PeerInfo,
    ProgressEvent,
    Proposal,
)
from secfwt.server.retention import Retention
from secfwt.server.runner import JobRunner
from secfwt.server.store import JobStore


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
        self.journal = JobJournal(
            store=self.store, identity=self.identity, max_streams=config.limits.max_streams
        )
        self.access = Access(config=config, runner=runner)
        self.retention = Retention(config=config, journal=self.journal)
        self.negotiation = Negotiation(
            config=config,
            journal=self.journal,
            peer_status=peer_status,
            retention=self.retention,
            model=self.model,
            data=self.data,
        )
        self.execution = JobExecutor(
            config=config, journal=self.journal, runner=runner, peer_cancel=peer_cancel
        )
        self.execution.restore()
        self.retention.start()
        self.execution.start_worker()

    # -- identity and authorization ---------------------------------------------------------

    def authorize(self, caller: Identity | None, method: str) -> Identity:
        return self.access.authorize(caller, method)

    def info(self) -> PeerInfo:
        return self.access.info()

    def hello(self, caller: Identity, theirs: PeerInfo) -> PeerInfo:
        return self.access.hello(caller, theirs)

    # -- commitments, proposals, acceptance ---------------------------------------------------

    def own_commitments(self, cfg: JobConfig) -> Commitments:
        return self.negotiation.own_commitments(cfg)

    def commitment_for(self, caller: Identity, job_toml: str) -> Commitments:
        return self.negotiation.commitment_for(caller, job_toml)

    def propose(self, caller: Identity, p: Proposal) -> JobRecord:
        return self.negotiation.propose(caller, p)

    def accept(
        self, caller: Identity, job_id: str, terms_digest: str, proposal_digest: str = ""
    ) -> JobRecord:
        return self.negotiation.accept(caller, job_id, terms_digest, proposal_digest)

    def refuse(self, caller: Identity, job_id: str, reason: str) -> JobRecord:
        return self.negotiation.refuse(caller, job_id, reason)

    # -- start, resume, cancel ---------------------------------------------------------------

    def start(self, caller: Identity, job_id: str) -> JobRecord:
        j = self.journal
        with j.cond:
            rec = j.get(job_id)
            if rec.state in (JobState.STARTED, JobState.RUNNING):
                return rec  # idempotent: every participant's operator may call Start
            j.require(rec, {JobState.ACCEPTED}, "start")
        self.negotiation.confirm_other_owners(rec, resuming=False)
        return self.execution.enqueue(rec, {JobState.ACCEPTED}, resume=False, by=caller)

    def resume(self, caller: Identity, job_id: str) -> JobRecord:
        j = self.journal
        with j.cond:
            rec = j.get(job_id)
            if rec.state in (JobState.STARTED, JobState.RUNNING):
                return rec
            j.require(rec, {JobState.FAILED, JobState.CANCELLED}, "resume")
            if not rec.accepted_terms_digest:
                raise JobStateError(
                    f"job {job_id} was never accepted by this party; it cannot be resumed"
                )
        self.negotiation.confirm_other_owners(rec, resuming=True)
        return self.execution.enqueue(
            rec, {JobState.FAILED, JobState.CANCELLED}, resume=True, by=caller
        )

    def cancel(self, caller: Identity, job_id: str, reason: str) -> JobRecord:
        return self.execution.cancel(caller, job_id, reason)

    def remove(self, caller: Identity, job_id: str) -> int:
        """Delete an ended job's files here (its id stays reserved); the bytes freed."""
        return self.retention.remove(caller, job_id)

    # -- status, progress, artifacts ----------------------------------------------------------

    def status(self, caller: Identity, job_id: str) -> JobRecord:
        return self.journal.status(job_id)

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
        yield from self.journal.watch(
            job_id, after_seq, active=active, stopping=self.execution.stopping, poll_s=poll_s
        )

    def artifact_files(self, caller: Identity, job_id: str) -> list[Path]:
        return self.journal.artifact_files(job_id)

    def close(self, *, timeout: float) -> None:
        """Stop taking jobs, cancel the running one, wait up to ``timeout`` for it, persist."""
        self.retention.close()
        self.execution.close(timeout=timeout)
