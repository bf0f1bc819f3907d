"""How a party runs the jobs it agreed to: a bounded FIFO queue, one worker, cancel and shutdown.

Queue policy: one job runs at a time per party; started jobs wait in a bounded FIFO queue
(``limits.queue_size``); Start is refused with RESOURCE_EXHAUSTED when the queue is full and the
job stays accepted, so it can be started later. A runner failure fails its job, never the
daemon. Whether a job may run at all is decided before it gets here
(:mod:`secfwt.server.negotiation`); this module only runs it and records how it ended.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from secfwt.errors import SecfwtError
from secfwt.pki.identity import Identity, IdentityRole
from secfwt.server.config import PartyConfig, PeerEntry
from secfwt.server.errors import BusyError, JobStateError
from secfwt.server.jobfile import parse_job_text
from secfwt.server.journal import JobJournal
from secfwt.server.logs import fields
from secfwt.server.protocol import (
    MAX_REASON_BYTES,
    JobRecord,
    JobState,
    check_text,
    clip_utf8,
)
from secfwt.server.runner import JobContext, JobRunner

log = logging.getLogger("secfwt.server")

#: Tells a pinned peer daemon that a job was cancelled here: (peer, job id, reason).
PeerCancelFn = Callable[[PeerEntry, str, str], None]


class JobExecutor:
    """The queue and the worker thread of one party; job states change through the journal."""

    def __init__(
        self,
        *,
        config: PartyConfig,
        journal: JobJournal,
        runner: JobRunner,
        peer_cancel: PeerCancelFn | None,
    ) -> None:
        self.config = config
        self.identity = config.identity
        self.role = config.party.role
        self.journal = journal
        self.store = journal.store
        self.runner = runner
        self.peer_cancel = peer_cancel
        self.stopping = threading.Event()
        self._cancels: dict[str, threading.Event] = {}
        self._queue: queue.Queue[str] = queue.Queue(maxsize=config.limits.queue_size)
        self._running: str | None = None
        self._worker = threading.Thread(
            target=self._work, name=f"secfwt-worker-{self.identity.party_id}", daemon=True
        )

    def restore(self) -> None:
        """Load the stored jobs and queue the started ones again, oldest first."""
        j = self.journal
        with j.cond:  # emit and transition notify watchers: they need the lock held
            requeue = j.load()
            for rec in sorted(requeue, key=lambda r: r.updated):
                try:
                    self._queue.put_nowait(rec.job_id)
                except queue.Full:
                    j.transition(rec, JobState.ACCEPTED, reason="")
                    log.warning(
                        "queue full after restart; job back to accepted",
                        extra=fields(job=rec.job_id),
                    )
            if j.records:
                counts: dict[str, int] = {}
                for r in j.records.values():
                    counts[r.state.value] = counts.get(r.state.value, 0) + 1
                log.info(
                    "state loaded",
                    extra=fields(jobs=len(j.records), states=counts, requeued=len(requeue)),
                )

    def start_worker(self) -> None:
        self._worker.start()

    # -- queue and cancel ---------------------------------------------------------------------

    def enqueue(
        self, rec: JobRecord, allowed: set[JobState], *, resume: bool, by: Identity
    ) -> JobRecord:
        j = self.journal
        with j.cond:
            if rec.state in (JobState.STARTED, JobState.RUNNING):
                return rec
            j.require(rec, allowed, "resume" if resume else "start")
            if self.stopping.is_set():
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
            rec.cancelled_by = ""  # a resume lifts the cancel
            j.transition(rec, JobState.STARTED, reason="")
        log.info(
            "job started" if not resume else "job resumed", extra=fields(job=rec.job_id, by=str(by))
        )
        return rec

    def cancel(self, caller: Identity, job_id: str, reason: str) -> JobRecord:
        check_text(reason, field="reason", limit=MAX_REASON_BYTES)
        why = f"cancelled by {caller}" + (f": {reason}" if reason else "")
        j = self.journal
        with j.cond:
            rec = j.get(job_id)
            if rec.state.terminal:
                raise JobStateError(f"job {job_id} is already {rec.state.value}; nothing to cancel")
            rec.cancelled_by = caller.uri  # an operator's cancel is a veto (Negotiation)
            if rec.state is JobState.RUNNING:
                rec.reason = why
                self._cancels[job_id].set()  # the worker records CANCELLED when the runner returns
                j.emit(rec, message=f"cancel requested: {why}")
            else:
                j.transition(
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
                    peer, rec.job_id, clip_utf8(why, MAX_REASON_BYTES)
                )  # recorded there as "cancelled by <us>: <why>"
            except SecfwtError as exc:  # already ended there, unreachable: its own state stands
                log.info(
                    "peer not cancelled",
                    extra=fields(job=rec.job_id, peer=str(ident), why=str(exc)),
                )

    # -- the worker ---------------------------------------------------------------------------

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
        j = self.journal
        while not self.stopping.is_set():
            try:
                job_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with j.cond:
                rec = j.records.get(job_id)
                if rec is None or rec.state is not JobState.STARTED:
                    continue  # cancelled while queued
                cancel = self._cancels[job_id] = threading.Event()
                self._running = job_id
                j.transition(rec, JobState.RUNNING, reason="")
            self._run_one(rec, cancel)

    def _run_one(self, rec: JobRecord, cancel: threading.Event) -> None:
        log.info(
            "job running",
            extra=fields(job=rec.job_id, attempt=rec.attempts, resume=rec.resume_requested),
        )
        j = self.journal

        def progress(**kw: Any) -> None:
            ev: dict[str, Any] = {
                k: kw[k] for k in ("phase", "step", "total_steps", "message") if k in kw
            }
            if "metrics" in kw:
                ev["metrics"] = tuple(
                    sorted((str(k), float(v)) for k, v in dict(kw["metrics"]).items())
                )
            with j.cond:
                j.emit(rec, **ev)

        state, reason = JobState.FINISHED, ""
        gate = None
        try:
            summary = self.runner.run(self._context(rec), progress, cancel)
            gate = (summary or {}).get("safety_gate")
            if cancel.is_set():
                state = JobState.CANCELLED
            elif gate is not None and not gate["released"]:
                state, reason = JobState.WITHHELD, f"safety: {gate['reason']}"
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
        with j.cond:
            if state in (JobState.FINISHED, JobState.WITHHELD) and summary is not None:
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
            final: dict[str, Any] = {}
            if gate is not None and state in (JobState.FINISHED, JobState.WITHHELD):
                # the gate's scores stay with the job's status (its last progress), over restarts
                final = {
                    "phase": "safety gate",
                    "metrics": tuple((k, float(gate[k])) for k in ("score_after", "score_before")),
                }
            j.transition(rec, state, reason=reason, **final)
            self._cancels.pop(rec.job_id, None)
            self._running = None
        log.info("job ended", extra=fields(job=rec.job_id, state=state.value, reason=reason))

    def close(self, *, timeout: float) -> None:
        """Stop taking jobs, cancel the running one, wait up to ``timeout`` for it, persist."""
        j = self.journal
        self.stopping.set()
        with j.cond:
            running = self._running
            if running is not None:
                rec = j.records[running]
                rec.reason = (
                    "cancelled: the daemon is shutting down; `secfwt job resume` continues from "
                    "its last checkpoint"
                )
                self._cancels[running].set()
            j.cond.notify_all()
        self._worker.join(timeout=timeout)
        with j.cond:
            if self._worker.is_alive() and self._running is not None:
                rec = j.records[self._running]
                j.transition(
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
