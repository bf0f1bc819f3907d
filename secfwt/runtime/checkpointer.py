"""A party's checkpoints during one MPC session: agreement on resume, writes every k steps.

The files and their safety are :mod:`secfwt.runtime.checkpoint`'s; this is the session side:
both parties agree on whether and how often they checkpoint, on the step to resume from, and
on an id per write, so shares of different writes are never combined.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

import torch

from secfwt.errors import ConfigError
from secfwt.roles import Role
from secfwt.runtime.checkpoint import (
    Checkpoint,
    CheckpointStop,
    PartyCheckpoints,
    common_checkpoint,
    from_share,
    is_shared,
    precision_bits,
    share_of,
)
from secfwt.runtime.contract import Checkpointing, StepRecord
from secfwt.runtime.session import PartySession
from secfwt.tuning.trainable import TrainableSet

log = logging.getLogger(__name__)


def agree_checkpointing(
    settings: Checkpointing | None,
    *,
    sess: PartySession,
    progress: Any,
    job_digest: str,
    terms_digest: str,
) -> JobCheckpointer | None:
    """Agree with the peer on checkpointing (both parties must write at the same steps: each
    write agrees an id over the channel); this party's checkpointer, or None."""
    s = settings
    sess.agree(
        (s is not None, None if s is None else s.every, False if s is None else s.resume),
        what="checkpointing (checkpoint_dir set, checkpoint_every, resume)",
    )
    if settings is None:
        return None
    store = PartyCheckpoints(
        settings.folder, role=sess.role, job_digest=job_digest, terms_digest=terms_digest
    )
    return JobCheckpointer(store, sess=sess, progress=progress, settings=settings)


class JobCheckpointer:
    """This party's checkpoints during one session."""

    def __init__(
        self, store: PartyCheckpoints, *, sess: PartySession, progress: Any, settings: Checkpointing
    ) -> None:
        self.store, self.sess, self.progress = store, sess, progress
        self.every, self.resume = settings.every, settings.resume
        self.stop_after = settings.stop_after_step
        self.written: list[int] = []
        self._restored: Checkpoint | None = None
        self._seed = 0
        self._acc_before: float | None = None
        self._cache: Any = None
        self._prefix_end = ""
        self._prefix_id = ""

    def agree_resume(self) -> tuple[Checkpoint, torch.Tensor | None] | None:
        """Agree with the peer on the checkpoint to continue from (None: start from step 0)."""
        mine = self.store.available()  # refuses files of another job, terms or role
        listed = [(r.step, r.checkpoint_id) for r in mine]
        theirs = {
            r: self.sess.broadcast(listed, src=r) for r in (Role.MODEL_OWNER, Role.DATA_OWNER)
        }
        peer = theirs[Role.DATA_OWNER if self.sess.role is Role.MODEL_OWNER else Role.MODEL_OWNER]
        if not self.resume:
            if mine or peer:
                held = ", ".join(f"{r.value}: steps {[s for s, _ in v]}" for r, v in theirs.items())
                raise ConfigError(
                    f"checkpoint_dir already holds checkpoints of this job ({held}); "
                    "resume it (Checkpointing(resume=True), "
                    "`secfwt job resume`) or empty both parties' folders to start over"
                )
            return None
        ref = common_checkpoint(mine, [tuple(x) for x in peer])
        self.sess.agree(
            "none" if ref is None else (ref.step, ref.checkpoint_id),
            what="the checkpoint to resume from",
        )
        if ref is None:
            log.warning(
                "resume: no checkpoint both parties hold (%s); starting from step 0",
                {r.value: [s for s, _ in v] for r, v in theirs.items()},
            )
            self.progress(kind="phase", phase="no common checkpoint: starting from step 0")
            return None
        ckpt, cache = self.store.load(ref)
        self.sess.agree(ckpt.prefix_id, what="the cached prefix of the checkpoint")
        self.progress(kind="phase", phase=f"resumed from step {ckpt.step}")
        log.info("resuming from step %d (checkpoint %s)", ckpt.step, ckpt.checkpoint_id)
        self._restored = ckpt
        if cache is not None:
            self._prefix_id = ckpt.prefix_id
        return ckpt, cache

    def start(
        self,
        *,
        joint_seed: int,
        accuracy_before: float | None,
        cache: Any,
        prefix_end: str,
        resumed: Checkpoint | None,
    ) -> None:
        """Called once the job is where the tuning loop starts (restored or from scratch);
        ``prefix_end`` says where ``cache`` ends (:data:`~secfwt.runtime.checkpoint.PREFIX_AT_LAYER`
        or :data:`~secfwt.runtime.checkpoint.PREFIX_AFTER_ATTENTION`)."""
        from secfwt.mpc.seeding import insecure_reseed

        self._seed, self._acc_before, self._cache = joint_seed, accuracy_before, cache
        self._prefix_end = prefix_end
        if resumed is not None:
            insecure_reseed(f"step/{resumed.step}")  # the same reseed the writer did (tests only)

    def history(self) -> list[StepRecord]:
        """The steps already done (restored from the checkpoint), or none."""
        if self._restored is None:
            return []
        return [StepRecord(step=int(h["step"]), loss=h["loss"]) for h in self._restored.history]

    def local_state(self) -> Any:
        return None if self._restored is None else self._restored.local

    def _agreed_id(self) -> str:
        return str(
            self.sess.broadcast(
                secrets.token_hex(8) if self.sess.role is Role.MODEL_OWNER else None,
                src=Role.MODEL_OWNER,
            )
        )

    def after_step(
        self, step: int, *, history: list[StepRecord], theta: dict[str, Any], local: Any = None
    ) -> None:
        """Write this party's checkpoint if ``step`` is a checkpoint step (between steps only)."""
        if step % self.every:
            return
        from secfwt.mpc.seeding import insecure_reseed

        checkpoint_id = self._agreed_id()
        if not self._prefix_id and is_shared(self._cache):
            self._prefix_id = self._agreed_id()
            self.store.write_prefix(self._prefix_id, share_of(self._cache), end=self._prefix_end)
        path = self.store.write(
            step=step,
            checkpoint_id=checkpoint_id,
            joint_seed=self._seed,
            history=[dataclasses.asdict(h) for h in history],
            accuracy_before=self._acc_before,
            theta_shares={n: share_of(x) for n, x in theta.items()},
            precision_bits=precision_bits(),
            prefix_id=self._prefix_id,
            local=local() if callable(local) else local,
        )
        self.written.append(step)
        log.info("checkpoint of step %d written to %s", step, path)
        self.progress(kind="checkpoint", step=step, path=str(path))
        insecure_reseed(
            f"step/{step}"
        )  # tests only: later randomness no longer depends on the past
        if self.stop_after is not None and step == self.stop_after:
            raise CheckpointStop(step)


def restore_theta(ckpt: Checkpoint, trainable: TrainableSet) -> dict[str, Any]:
    """The parameter shares of ``ckpt``, checked against the job's trainable set."""
    names = set(trainable.names)
    if set(ckpt.theta_shares) != names:
        raise ConfigError(
            f"checkpoint of step {ckpt.step} holds parameters {sorted(ckpt.theta_shares)}, "
            f"the job trains {sorted(names)}"
        )
    out = {}
    for n, shape in trainable.shapes:
        share = ckpt.theta_shares[n]
        if tuple(share.shape) != tuple(shape):
            raise ConfigError(
                f"checkpoint of step {ckpt.step}: {n} has shape {tuple(share.shape)}, "
                f"the job's is {tuple(shape)}"
            )
        out[n] = from_share(share, ckpt.precision_bits)
    return out
