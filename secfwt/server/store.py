"""A party's job state on disk, so a daemon restart loses no job and no finished result.

Layout under ``state_dir``::

    jobs/ID/job.json        the JobRecord, replaced atomically (write, fsync, rename) on every
                            change
    jobs/ID/events.jsonl    progress events, appended
    jobs/ID/artifacts/      results the runner wrote (served by FetchArtifacts)
    jobs/ID/work/           the runner's scratch space and checkpoints

A job folder is created when a proposal is recorded and is never removed by the daemon: its
existence is what makes a replayed job id detectable across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from secfwt.errors import ConfigError
from secfwt.server.errors import JobExistsError
from secfwt.server.protocol import JobRecord, ProgressEvent, check_job_id

log = logging.getLogger(__name__)


class JobStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "jobs"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"party.state_dir {state_dir}: cannot create it: {exc}") from exc
        self._lock = threading.Lock()

    def job_dir(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    def artifacts_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "artifacts"

    def work_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "work"

    def create(self, rec: JobRecord) -> None:
        """Record a new job; JobExistsError if this id was ever seen (its folder exists)."""
        d = self.job_dir(rec.job_id)
        with self._lock:
            try:
                d.mkdir()
            except FileExistsError:
                raise JobExistsError(
                    f"job id {rec.job_id!r} was already proposed to this party; job ids are "
                    "never reused (replay refused)"
                ) from None
        (d / "artifacts").mkdir()
        (d / "work").mkdir()
        self.save(rec)

    def save(self, rec: JobRecord) -> None:
        d = self.job_dir(rec.job_id)
        tmp = d / "job.json.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(rec.to_dict(), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, d / "job.json")

    def append_event(self, job_id: str, ev: ProgressEvent) -> None:
        with open(self.job_dir(job_id) / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(ev.to_dict()) + "\n")

    def events(self, job_id: str) -> list[ProgressEvent]:
        p = self.job_dir(job_id) / "events.jsonl"
        if not p.is_file():
            return []
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(ProgressEvent.from_dict(json.loads(line)))
            except (ValueError, KeyError):
                log.warning("skipping a torn progress line in %s", p)  # a crash mid-append
        return out

    def load_all(self) -> list[JobRecord]:
        out = []
        for d in sorted(self.root.iterdir()):
            f = d / "job.json"
            if not f.is_file():
                log.warning(
                    "state: %s has no job.json (crash during proposal?); the id stays reserved", d
                )
                continue
            try:
                out.append(JobRecord.from_dict(json.loads(f.read_text(encoding="utf-8"))))
            except (ValueError, ConfigError) as exc:
                log.error(
                    "state: cannot read %s: %s; the job is skipped, its id stays reserved", f, exc
                )
        return out
