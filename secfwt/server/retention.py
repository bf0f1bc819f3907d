"""How long a party keeps jobs, and how many unaccepted ones each caller may leave with it.

Every proposal costs the party memory and disk (a job file of up to ``limits.max_job_toml_bytes``,
its record and progress), whoever sent it, and a refused one used to stay forever so that its id
is never reused: 300 proposals of 62 KB grew a daemon by 20 MB of memory and 24 MB of disk. So:

- An **unaccepted** job is one this party's operator never accepted: proposed, refused, or
  cancelled before acceptance. Each caller may have at most ``limits.max_proposals_per_caller``
  of them here; beyond, Propose is refused (:class:`TooManyProposalsError`, RESOURCE_EXHAUSTED)
  before anything is parsed or stored.
- An unaccepted job is removed ``jobs.proposal_ttl_s`` after its last change (a sweep runs every
  quarter of that, at least every minute, and when the daemon starts).
- Every other job (accepted, queued, running, finished, failed, cancelled after acceptance)
  stays, with its artifacts, until an operator of this party removes it (:meth:`remove`,
  ``secfwt job remove``), which needs it ended: refused, finished, failed or cancelled.
- A removed job leaves ``jobs/ID/removed.json`` (about 200 bytes): its id stays reserved, so a
  replay is still ALREADY_EXISTS, and Status says when and why it went.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from secfwt.pki.identity import Identity
from secfwt.server.config import PartyConfig
from secfwt.server.errors import TooManyProposalsError
from secfwt.server.journal import JobJournal
from secfwt.server.logs import fields
from secfwt.server.protocol import JobRecord, JobState

log = logging.getLogger("secfwt.server")

#: The states an unaccepted job can be in.
_UNACCEPTED_STATES = frozenset({JobState.PROPOSED, JobState.REFUSED, JobState.CANCELLED})
#: The states in which an operator may remove a job.
REMOVABLE = {JobState.REFUSED, JobState.FINISHED, JobState.FAILED, JobState.CANCELLED}


def unaccepted(rec: JobRecord) -> bool:
    """Whether this party's operator never accepted ``rec`` (nothing of it ever ran here)."""
    return not rec.accepted_terms_digest and rec.state in _UNACCEPTED_STATES


class Retention:
    """The per-caller bound on unaccepted jobs, their expiry, and removal by an operator."""

    def __init__(
        self, *, config: PartyConfig, journal: JobJournal, clock: Callable[[], float] = time.time
    ) -> None:
        self.identity = config.identity
        self.journal = journal
        self.max_per_caller = config.limits.max_proposals_per_caller
        self.ttl_s = config.jobs.proposal_ttl_s
        self.clock = clock
        self._stop = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep_every,
            args=(min(self.ttl_s / 4, 60.0),),
            name=f"secfwt-retention-{self.identity.party_id}",
            daemon=True,
        )

    def admit(self, caller: Identity) -> None:
        """Refuse a new proposal from ``caller`` when it is at its bound (caller holds the
        journal's lock, so that the count and the record it creates are one step)."""
        mine = sum(
            1
            for r in self.journal.records.values()
            if r.proposed_by == caller.uri and unaccepted(r)
        )
        if mine >= self.max_per_caller:
            raise TooManyProposalsError(
                f"{caller} already has {mine} jobs at {self.identity} that it never accepted "
                f"(limits.max_proposals_per_caller = {self.max_per_caller}); they are removed "
                f"{self.ttl_s:g} s after their last change (jobs.proposal_ttl_s), or sooner by "
                "an operator of this party (`secfwt job remove`)"
            )

    def sweep(self) -> list[str]:
        """Remove every unaccepted job whose last change is older than the TTL; their ids."""
        j = self.journal
        now = self.clock()
        with j.cond:
            expired = [
                r for r in j.records.values() if unaccepted(r) and now - r.updated >= self.ttl_s
            ]
            for r in expired:
                j.forget(
                    r,
                    why=f"{r.state.value} and never accepted here for jobs.proposal_ttl_s = "
                    f"{self.ttl_s:g} s",
                    by="",
                )
        for r in expired:
            j.store.purge(r.job_id)
        if expired:
            log.info(
                "unaccepted jobs expired",
                extra=fields(jobs=len(expired), first=expired[0].job_id, ttl_s=self.ttl_s),
            )
        return [r.job_id for r in expired]

    def remove(self, caller: Identity, job_id: str) -> int:
        """An operator's removal of an ended job; the bytes its folder held."""
        j = self.journal
        with j.cond:
            rec = j.get(job_id)
            j.require(rec, REMOVABLE, "remove")
            j.forget(rec, why=f"removed by {caller}", by=caller.uri)
        freed = j.store.purge(job_id)
        log.info("job removed", extra=fields(job=job_id, by=str(caller), freed_bytes=freed))
        return freed

    # -- the sweeper thread --------------------------------------------------------------------

    def start(self) -> None:
        self.sweep()
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=5.0)

    def _sweep_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sweep()
            except OSError as exc:  # a full or read-only disk: retried at the next sweep
                log.error("retention sweep failed", extra=fields(error=str(exc)))
