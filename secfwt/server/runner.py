"""What a daemon calls to run an accepted, started job: the :class:`JobRunner` interface.

The daemon owns the lifecycle (acceptance, queue, states, persistence, progress, artifacts);
a runner owns one party's computation. It gets a :class:`JobContext`, reports progress through
the callback, polls ``cancel`` between steps, writes its results into ``ctx.artifacts_dir`` and
returns a small JSON-able summary. An exception fails the job with its message as the reason.

:class:`MpcJobRunner` is the hook for the real thing: one party's MPC session over the TLS gRPC
transport with the peers named in the context. It is NOT implemented yet (issue #3: the
transport and the multi-host execution land separately); it fails every job with a clear
reason, so no daemon ever claims a result it did not compute.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from secfwt.config import JobConfig
from secfwt.roles import Role
from secfwt.server.config import PartyConfig, PeerEntry
from secfwt.server.identity import Identity
from secfwt.server.protocol import Proposal


@dataclasses.dataclass(frozen=True)
class JobContext:
    job_id: str
    role: Role
    identity: Identity
    job: JobConfig
    proposal: Proposal
    peers: Mapping[Role, PeerEntry]  # the other participants, with the addresses this party pinned
    party: PartyConfig  # TLS files, heartbeat timeout, checkpoint interval
    work_dir: Path  # scratch and checkpoints; kept across resumes
    artifacts_dir: Path  # everything written here is served by FetchArtifacts
    resume: bool  # continue from the last checkpoint in work_dir

    @property
    def checkpoint_every_steps(self) -> int:
        return self.party.jobs.checkpoint_every_steps

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.party.jobs.heartbeat_timeout_s


#: progress(phase=..., step=..., total_steps=..., metrics={...}, message=...): every key optional.
ProgressCallback = Callable[..., None]


class JobRunner(Protocol):
    """One party's side of a job. Must return (or raise) soon after ``cancel`` is set."""

    capabilities: tuple[str, ...]

    def run(self, ctx: JobContext, progress: ProgressCallback, cancel: threading.Event) -> dict[str, Any]: ...


class NotImplementedRunnerError(NotImplementedError):
    pass


class MpcJobRunner:
    """Runs the job's MPC session with the peers: to be filled in with the TLS gRPC transport."""

    capabilities: tuple[str, ...] = ()  # advertises nothing it cannot do yet

    def run(self, ctx: JobContext, progress: ProgressCallback, cancel: threading.Event) -> dict[str, Any]:
        raise NotImplementedRunnerError(
            "running jobs through the party daemons is not implemented yet: the MPC session over the "
            "TLS gRPC transport is wired in by a later change (issue #3); the job was accepted and "
            "started, nothing was computed. Use `secfwt simulate` on one machine meanwhile"
        )
