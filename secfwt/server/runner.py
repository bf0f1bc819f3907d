"""What a daemon calls to run an accepted, started job: the :class:`JobRunner` interface.

The daemon owns the lifecycle (acceptance, queue, states, persistence, progress, artifacts);
a runner owns one party's computation. It gets a :class:`JobContext`, reports progress through
the callback, polls ``cancel`` between steps, writes its results into ``ctx.artifacts_dir`` and
returns a small JSON-able summary. An exception fails the job with its message as the reason.

:class:`MpcJobRunner` runs this party's side of the job's MPC session in a process of its own
(:func:`secfwt.mpc.launcher.spawn_party`): the model owner and the data owner run
:func:`secfwt.runtime.job.run_job_party` with what they hold (``[model]`` / ``[data]`` of
``party.toml``, never the job file's paths), the dealer serves Beaver triples. All MPC traffic
goes over the mutually authenticated TLS mesh (:mod:`secfwt.mpc.transport`) between the
parties' ``mpc_listen`` addresses, each peer pinned to the certificate name of the identity the
proposal names. A separate process per job keeps CrypTen's global state and memory out of the
daemon: a cancel or a failure kills it, and the daemon keeps serving.

Faults: the transport's keepalive is ``jobs.heartbeat_timeout_s / 2``, so a peer that dies or
vanishes is noticed within about ``heartbeat_timeout_s`` and the job fails with the peer named.
Checkpoints: every ``jobs.checkpoint_every_steps`` steps into the job's work folder;
``secfwt job resume`` restarts the process with ``resume`` and the parties continue from the
last step both of them checkpointed.
"""

from __future__ import annotations

import dataclasses
import logging
import queue as queue_mod
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from secfwt.config import JobConfig
from secfwt.errors import ConfigError, PartyFailedError
from secfwt.mpc import device as mpc_device
from secfwt.pki.identity import Identity
from secfwt.roles import Role
from secfwt.server.config import PartyConfig, PeerEntry
from secfwt.server.logs import fields
from secfwt.server.protocol import Proposal

if TYPE_CHECKING:
    from secfwt.runtime.contract import PartyJob

log = logging.getLogger("secfwt.server")


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

    def run(
        self, ctx: JobContext, progress: ProgressCallback, cancel: threading.Event
    ) -> dict[str, Any]: ...


class JobCancelled(Exception):
    """The runner stopped because ``cancel`` was set (the daemon records CANCELLED)."""


@dataclasses.dataclass(frozen=True)
class MpcJobRunner:
    """This party's MPC process of a job, over the TLS mesh with the job's pinned peers.

    ``insecure_fixed_seed`` (``secfwt party --insecure-fixed-seed``): every MPC seed derived
    from it, so a daemon run can be compared bit for bit with ``secfwt simulate`` of the same
    seed. Anyone who knows it can unmask every share: reproducibility tests only.
    """

    insecure_fixed_seed: int | None = None
    poll_s: float = 0.2
    capabilities: tuple[str, ...] = ("mpc-tls", "checkpoint-resume")

    def run(
        self, ctx: JobContext, progress: ProgressCallback, cancel: threading.Event
    ) -> dict[str, Any]:
        from secfwt.mpc.launcher import collect_one, party_context, spawn_party, stop_processes
        from secfwt.mpc.provider import Provider

        if ctx.party.party.insecure:
            raise ConfigError(
                "this daemon runs with --insecure (no certificates): the MPC traffic of a job is "
                "only ever sent over mutually authenticated TLS between daemons; run the daemons "
                "with certificates (`secfwt certs`), or use `secfwt simulate` locally"
            )
        tls = mpc_tls_settings(ctx)
        from secfwt.runtime.contract import PartyOutcome
        from secfwt.runtime.job import run_job_party

        payload = None if ctx.role is Role.DEALER else party_payload(ctx)
        mpctx = party_context()
        results = mpctx.Queue()
        messages = mpctx.Queue() if payload is not None else None
        if payload is not None:
            payload = dataclasses.replace(payload, progress=messages)

        peer_list = ", ".join(
            f"{r.value} at {e.mpc_peer_address}"
            for r, e in sorted(ctx.peers.items(), key=lambda kv: kv[0].rank)
        )
        progress(phase="mpc", message=f"MPC session on {tls.listen} with {peer_list}")
        proc = spawn_party(
            ctx.role,
            target=None if ctx.role is Role.DEALER else run_job_party,
            payload=payload,
            results=results,
            provider=Provider.TTP,
            tls=tls,
            insecure_fixed_seed=self.insecure_fixed_seed,
            device=mpc_device.resolve(ctx.job.run.device),
        )
        log.info(
            "mpc process started", extra=fields(job=ctx.job_id, pid=proc.pid, resume=ctx.resume)
        )
        try:
            item = self._wait(proc, results, messages, progress, cancel)
            res = collect_one(item)
        finally:
            stop_processes([proc])
            log.debug("mpc process ended", extra=fields(pid=proc.pid, exitcode=proc.exitcode))
            for q in (results, messages):
                if q is not None:
                    q.close()
                    q.cancel_join_thread()
        if payload is not None:
            _collect_artifacts(Path(payload.out_dir) / ctx.role.value, ctx.artifacts_dir)
        summary = res.value.summary() if isinstance(res.value, PartyOutcome) else {}
        summary.update(role=ctx.role.value, **res.link_counts(), party_wall_s=res.wall_s)
        return summary

    def _wait(
        self,
        proc: Any,
        results: Any,
        messages: Any,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> tuple[Any, ...]:
        while True:
            if messages is not None:
                _forward_progress(messages, progress)
            try:
                item = results.get(timeout=self.poll_s)
            except queue_mod.Empty:
                item = None
            if item is not None:
                if messages is not None:
                    _forward_progress(messages, progress)
                return item
            if cancel.is_set():
                raise JobCancelled("cancelled; the MPC process was stopped")
            if proc.exitcode is not None:
                try:  # it may have reported just before exiting
                    return results.get(timeout=1.0)
                except queue_mod.Empty:
                    raise PartyFailedError(
                        "this party",
                        f"its MPC process exited with code {proc.exitcode} without a result",
                    ) from None


def mpc_tls_settings(ctx: JobContext) -> Any:
    """TLS mesh settings of this party for one job: own files, every peer's MPC address pinned to
    the certificate name of the identity the proposal names for that role."""
    from secfwt.mpc.transport import tls_settings

    missing = [r.value for r in Role if r is not ctx.role and r not in ctx.peers]
    if missing:
        raise ConfigError(
            f"job {ctx.job_id}: no pinned peer for {', '.join(missing)} in {ctx.party.source}; "
            "every participant needs a [[peers]] entry"
        )
    hb = ctx.heartbeat_timeout_s
    return tls_settings(
        role=ctx.role,
        ca_cert=ctx.party.tls.ca,
        cert=ctx.party.tls.cert,
        key=ctx.party.tls.key,
        listen=ctx.party.party.mpc_listen_address,
        peers={r: e.mpc_peer_address for r, e in ctx.peers.items()},
        session_id=ctx.job_id,
        peer_names={r: e.identity.dns_name for r, e in ctx.peers.items()},
        own_name=ctx.identity.dns_name,
        connect_timeout_s=max(60.0, 2 * hb),
        keepalive_s=hb / 2,
    )


def party_payload(ctx: JobContext) -> PartyJob:
    """What :func:`secfwt.runtime.job.run_job_party` gets on this host: the job with this party's
    own holdings in place of the job file's model and data locations."""
    from secfwt.models.checkpoint import resolve_model_path
    from secfwt.runtime.contract import Checkpointing, PartyJob

    cfg = ctx.job
    held_data = None
    if ctx.role is Role.MODEL_OWNER:
        assert ctx.party.model is not None  # checked when party.toml was read
        model_dir = resolve_model_path(ctx.party.model.path)
    else:
        held = ctx.party.data
        assert held is not None
        held_data = dataclasses.replace(
            cfg.data,
            source=held.source,
            path=held.path,
            text_column=held.text_column,
            label_column=held.label_column,
            labels=held.labels,
            prompt_column=held.prompt_column,
            response_column=held.response_column,
            system_column=held.system_column,
        )
        try:
            model_dir = resolve_model_path(held.tokenizer or cfg.model.path)
        except Exception as exc:
            raise ConfigError(
                f"{ctx.party.source}: the data owner needs the model's tokenizer (public) to "
                f"encode its data: {exc}; "
                "set [data] tokenizer = a folder with the tokenizer files, or packaged:NAME"
            ) from None
    return PartyJob(
        config=cfg,
        out_dir=str(ctx.work_dir / "run"),
        model_dir=str(model_dir),
        held_data=held_data,
        checkpoints=Checkpointing(
            folder=str(ctx.work_dir / "checkpoints"),
            every=ctx.checkpoint_every_steps,
            resume=ctx.resume,
        ),
    )


def _forward_progress(messages: Any, progress: ProgressCallback) -> None:
    """Party-process progress messages (see :class:`secfwt.runtime.contract.PartyJob`) as
    daemon progress events."""
    while True:
        try:
            _role, msg = messages.get_nowait()
        except queue_mod.Empty:
            return
        kind = msg.get("kind")
        metrics = {
            k: v
            for k, v in msg.items()
            if k in ("loss", "accuracy", "elapsed") and isinstance(v, (int, float))
        }
        if kind == "step":
            progress(
                phase="tuning",
                step=int(msg["step"]),
                total_steps=int(msg["total"]),
                metrics=metrics,
            )
        elif kind == "prefix":
            progress(phase="frozen prefix", step=int(msg["done"]), total_steps=int(msg["total"]))
        elif kind == "eval":
            # a causal job's evaluation is its held-out response loss, a classifier's its accuracy
            what = "loss" if "loss" in msg else "accuracy"
            progress(
                phase="evaluation",
                message=f"{what} {msg.get('when')}: {msg.get(what)}",
                metrics=metrics,
            )
        elif kind == "gate":
            progress(
                phase="safety gate",
                message=f"{msg['state']}: {msg['reason']}",
                metrics={k: float(msg[k]) for k in ("score_before", "score_after")},
            )
        elif kind == "checkpoint":
            progress(
                phase="checkpoint",
                step=int(msg.get("step", 0)),
                message=f"checkpoint at step {msg.get('step')}",
            )
        else:
            progress(phase=str(msg.get("phase", kind)), message=str(msg.get("message", "")) or None)


def _collect_artifacts(src: Path, dst: Path) -> None:
    """Copy the party's result files (final parameters, audit log, ...) where FetchArtifacts serves
    them."""
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, dst / f.name)
