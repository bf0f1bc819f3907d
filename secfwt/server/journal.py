"""The jobs one party knows: their records and progress events, under one lock, always persisted.

Negotiation and execution both change jobs, and watchers read them from gRPC threads; they all
go through :class:`JobJournal`, so every state change is saved to the :class:`JobStore`, becomes
a progress event and wakes the watchers of that job, in one order that the lock (``cond``)
defines. The limit on concurrent progress streams (``limits.max_streams``) is enforced here.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from secfwt.pki.identity import Identity
from secfwt.server.errors import BusyError, JobNotFoundError, JobStateError
from secfwt.server.protocol import JobRecord, JobState, ProgressEvent, check_job_id
from secfwt.server.store import JobStore


class JobJournal:
    """Job records by id and their events; ``cond`` is the one lock over both."""

    def __init__(self, *, store: JobStore, identity: Identity, max_streams: int) -> None:
        self.store = store
        self.identity = identity
        self.max_streams = max_streams
        self.cond = threading.Condition()
        self.records: dict[str, JobRecord] = {}
        self._events: dict[str, list[ProgressEvent]] = {}
        self._streams = 0

    # -- reading ------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        """The record of ``job_id`` (caller holds the lock)."""
        check_job_id(job_id)
        rec = self.records.get(job_id)
        if rec is None:
            note = self.store.removed(job_id)
            if note is not None:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(note.get("time", 0)))
                raise JobNotFoundError(
                    f"job {job_id} was removed from {self.identity} on {when} "
                    f"({note.get('why', '?')}); its id stays reserved"
                )
            raise JobNotFoundError(f"no job {job_id!r} at {self.identity}")
        return rec

    def known(self, job_id: str) -> bool:
        """Whether ``job_id`` was ever proposed here, in memory or on disk (replay check)."""
        with self.cond:
            return job_id in self.records or self.store.job_dir(job_id).exists()

    @staticmethod
    def require(rec: JobRecord, allowed: set[JobState], action: str) -> None:
        if rec.state not in allowed:
            names = " or ".join(sorted(s.value for s in allowed))
            detail = f" ({rec.reason})" if rec.reason else ""
            raise JobStateError(
                f"cannot {action} job {rec.job_id}: it is {rec.state.value}{detail}; {action} "
                f"needs it {names}"
            )

    def status(self, job_id: str) -> JobRecord:
        """A copy of the record, safe to read outside the lock."""
        with self.cond:
            return dataclasses.replace(self.get(job_id))

    def artifact_files(self, job_id: str) -> list[Path]:
        with self.cond:
            rec = self.get(job_id)
            # a withheld job has artifacts too: its summary (both scores) and audit log, never a
            # tuned value (the runner wrote none)
            if rec.state not in (JobState.FINISHED, JobState.WITHHELD):
                raise JobStateError(
                    f"job {job_id} is {rec.state.value}; artifacts are served once it finished "
                    "or was withheld"
                )
        try:
            found = list(self.store.artifacts_dir(job_id).iterdir())
        except FileNotFoundError:  # an operator removed the job meanwhile
            raise JobNotFoundError(f"job {job_id} was removed from {self.identity}") from None
        return sorted(p for p in found if p.is_file() and not p.is_symlink())

    # -- changing -----------------------------------------------------------------------------

    def create(self, rec: JobRecord) -> None:
        self.store.create(rec)  # atomic: a concurrent replay of the same id loses here
        with self.cond:
            self.records[rec.job_id] = rec
            self._events[rec.job_id] = []
            self.emit(
                rec, message=f"{rec.state.value}: {rec.reason}" if rec.reason else rec.state.value
            )
            self.store.save(rec)

    def events_of(self, job_id: str) -> list[ProgressEvent]:
        evs = self._events.get(job_id)
        if evs is None:
            evs = self._events[job_id] = self.store.events(job_id)
        return evs

    def emit(self, rec: JobRecord, **kw: Any) -> ProgressEvent:
        """Append a progress event (caller holds the lock) and wake watchers."""
        evs = self.events_of(rec.job_id)
        ev = ProgressEvent(
            seq=(evs[-1].seq + 1) if evs else 1, time=time.time(), state=rec.state, **kw
        )
        evs.append(ev)
        self.store.append_event(rec.job_id, ev)
        rec.last_progress = ev
        self.cond.notify_all()
        return ev

    def transition(
        self, rec: JobRecord, state: JobState, *, reason: str | None = None, **event: Any
    ) -> None:
        """Change state (caller holds the lock), persist, and tell watchers. ``event``: more fields
        of the transition's progress event (``phase``, ``metrics``), kept as the job's last
        progress."""
        rec.state = state
        if reason is not None:
            rec.reason = reason
        rec.updated = time.time()
        self.emit(
            rec,
            message=state.value + (f": {rec.reason}" if rec.reason and state.terminal else ""),
            **event,
        )
        self.store.save(rec)

    def forget(self, rec: JobRecord, *, why: str, by: str) -> None:
        """Mark a job removed (caller holds the lock): its record and events leave memory, its
        folder keeps a note; the caller purges the files (outside the lock)."""
        self.store.mark_removed(
            rec.job_id,
            {
                "job_id": rec.job_id,
                "time": time.time(),
                "why": why,
                "by": by,
                "state": rec.state.value,
            },
        )
        del self.records[rec.job_id]
        self._events.pop(rec.job_id, None)
        self.cond.notify_all()

    def load(self) -> list[JobRecord]:
        """Read every stored job (caller holds the lock); a job that was running when the daemon
        stopped fails, resumably. Returns the started ones, still to be queued."""
        started = []
        for rec in self.store.load_all():
            self.records[rec.job_id] = rec
            if rec.state is JobState.RUNNING:
                rec.state = JobState.FAILED
                rec.reason = (
                    "interrupted: the daemon stopped while the job was running; `secfwt job "
                    "resume` continues from its last checkpoint"
                )
                rec.updated = time.time()
                self.emit(rec, message=f"failed: {rec.reason}")
                self.store.save(rec)
            elif rec.state is JobState.STARTED:
                started.append(rec)
        return started

    # -- progress streams ---------------------------------------------------------------------

    def watch(
        self,
        job_id: str,
        after_seq: int,
        *,
        active: Callable[[], bool],
        stopping: threading.Event,
        poll_s: float,
    ) -> Iterator[ProgressEvent]:
        """Progress events after ``after_seq``: the history, then live ones until the job ends."""
        with self.cond:
            self.get(job_id)
            if self._streams >= self.max_streams:
                raise BusyError(
                    f"{self.identity} already serves {self._streams} progress streams "
                    "(limits.max_streams); try again later"
                )
            self._streams += 1
        try:
            yield from self._follow(
                job_id, after_seq, active=active, stopping=stopping, poll_s=poll_s
            )
        finally:
            with self.cond:
                self._streams -= 1

    def _follow(
        self,
        job_id: str,
        after_seq: int,
        *,
        active: Callable[[], bool],
        stopping: threading.Event,
        poll_s: float,
    ) -> Iterator[ProgressEvent]:
        sent = after_seq
        while True:
            with self.cond:
                rec = self.get(job_id)
                evs = [e for e in self.events_of(job_id) if e.seq > sent]
                done = rec.state.terminal
                if not evs and not done:
                    self.cond.wait(timeout=poll_s)
                    evs = [e for e in self.events_of(job_id) if e.seq > sent]
                    done = rec.state.terminal
            for e in evs:
                yield e
                sent = e.seq
            if done or stopping.is_set() or not active():
                return
