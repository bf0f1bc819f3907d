"""A party's job state on disk, so a daemon restart loses no job and no finished result.

Layout under ``state_dir``::

    jobs/ID/job.json        the JobRecord, replaced atomically (write, fsync, rename) on every
                            change
    jobs/ID/events.jsonl    progress events, appended
    jobs/ID/artifacts/      results the runner wrote (served by FetchArtifacts)
    jobs/ID/work/           the runner's scratch space and checkpoints
    jobs/ID/removed.json    only this, once the job was removed (secfwt.server.retention)

A job folder is created when a proposal is recorded and never deleted: its existence is what
makes a replayed job id detectable across restarts. Removing a job empties it down to
``removed.json`` (when, why, by whom), which is all that remains of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from secfwt.errors import ConfigError
from secfwt.server.errors import JobExistsError
from secfwt.server.protocol import JobRecord, ProgressEvent, check_job_id

log = logging.getLogger(__name__)

REMOVED = "removed.json"


def _write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` atomically: write a sibling, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _purge(d: Path) -> int:
    freed = 0
    for p in sorted(d.iterdir()):
        if p.name == REMOVED:
            continue
        if p.is_dir() and not p.is_symlink():
            for root, _dirs, files in os.walk(p):  # never follows a link out of the folder
                freed += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
            shutil.rmtree(p)
        else:
            freed += p.lstat().st_size
            p.unlink()
    return freed


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
        _write_json(self.job_dir(rec.job_id) / "job.json", rec.to_dict())

    # -- removal ------------------------------------------------------------------------------

    def mark_removed(self, job_id: str, note: dict[str, Any]) -> None:
        """Record that ``job_id`` is gone (atomic); :meth:`purge` then deletes its files."""
        _write_json(self.job_dir(job_id) / REMOVED, note)

    def removed(self, job_id: str) -> dict[str, Any] | None:
        """The removal note of ``job_id``, or None when it was not removed (or never existed)."""
        try:
            note = json.loads((self.job_dir(job_id) / REMOVED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return note if isinstance(note, dict) else None

    def purge(self, job_id: str) -> int:
        """Delete every file of a job marked removed except the note; the bytes they held."""
        return _purge(self.job_dir(job_id))

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
        """Every stored job; a removed one is skipped (and purged, if a crash left files)."""
        out = []
        for d in sorted(self.root.iterdir()):
            if (d / REMOVED).is_file():
                if any(p.name != REMOVED for p in d.iterdir()):
                    _purge(d)
                continue
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
