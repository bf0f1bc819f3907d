"""What a computing party's process is given and what it returns.

``secfwt simulate``, the party daemons' runner and ``secfwt dp-compare`` build a
:class:`PartyJob` (or a :class:`ComparisonJob`) per party; :mod:`secfwt.runtime.job` runs it
and returns a :class:`PartyOutcome` (or a :class:`ComparisonOutcome`). All are frozen
dataclasses of picklable fields: ``multiprocessing`` pickles them into and out of the party
processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from secfwt.config import DataSection, JobConfig, SafetyGateSection, SafetySection
from secfwt.data.inputs import DataOwnerInputs, InstructionInputs
from secfwt.errors import ConfigError
from secfwt.runtime.checkpoint import PREFIX_AT_LAYER


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """This party's checkpoints (:mod:`secfwt.runtime.checkpoint`). Set on both computing
    parties or on neither, with equal ``every`` and ``resume`` (the parties agree on them)."""

    folder: str  # this party's own checkpoint folder
    #: write a checkpoint after every this many tuning steps (ZO/DP-ZO steps, CMA-ES
    #: iterations), never mid-step
    every: int = 10
    #: continue from the latest step both parties checkpointed (agreed over the MPC channel);
    #: with no common checkpoint the job starts from step 0 (a job killed before its first
    #: checkpoint can only restart, and does so with the same result). False with checkpoints
    #: already in the folder is refused.
    resume: bool = False
    #: tests only: raise :class:`~secfwt.runtime.checkpoint.CheckpointStop` right after the
    #: checkpoint of this step is written, as if the process had been killed there
    stop_after_step: int | None = None

    def __post_init__(self) -> None:
        e = self.every
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            raise ConfigError(f"checkpoint_every = {e!r}: must be a whole number of steps >= 1")


@dataclasses.dataclass(frozen=True)
class PartyJob:
    """One computing party's job, the same from ``secfwt simulate`` and from the daemons.

    Progress messages on ``progress`` are ``(role, {"kind": ...})`` with kinds ``phase``
    (``phase``: text), ``prefix`` (``done``, ``total``, ``elapsed``), ``eval`` (``when``,
    ``accuracy``, or ``loss`` for a causal-LM job), ``step`` (``step``, ``total``, ``loss``,
    ``elapsed``) and ``checkpoint`` (``step``, ``path``); a resume sends the phase
    ``"resumed from step k"`` (or ``"no common checkpoint: starting from step 0"``).
    """

    config: JobConfig
    out_dir: str  # this party writes under out_dir/ROLE
    model_dir: str  # the model owner's checkpoint; the data owner's tokenizer
    # the data owner's prepared inputs (else read in the party process)
    data: DataOwnerInputs | InstructionInputs | None = None
    # the data owner's own holdings (a daemon's party.toml [data]: source, path, columns), read in
    # the party process in place of the job file's; the job's settings, which the parties agree
    # on, stay those of the job file (as the model owner's checkpoint is model_dir, not
    # config.model.path)
    held_data: DataSection | None = None
    progress: Any = None  # a multiprocessing queue, or None
    checkpoints: Checkpointing | None = None  # None writes no checkpoints


@dataclasses.dataclass(frozen=True)
class Variant:
    """One tuning run of a comparison: a label and the job settings it tunes with."""

    label: str
    config: JobConfig


@dataclasses.dataclass(frozen=True)
class ComparisonJob:
    """Several tuning runs from the same start on one session's cached prefix (``secfwt
    dp-compare``); each is evaluated, none delivers parameters or checkpoints."""

    job: PartyJob
    variants: tuple[Variant, ...]

    def __post_init__(self) -> None:
        if self.job.checkpoints is not None:
            raise ConfigError(
                "checkpoint_dir: comparison variants (dp-compare) do not checkpoint; "
                "run them without checkpoint_dir"
            )


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One tuning step (1-based) and its mean loss where the terms reveal it to this party."""

    step: int
    loss: float | None


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """The public shape of the model the parties agreed on."""

    family: str
    layers: int
    hidden: int


@dataclasses.dataclass(frozen=True)
class PartyOutcome:
    """What a party's tuning job returns to its launcher (values this party learned)."""

    accuracy_before: float | None  # held-out accuracy, None where the terms hide it
    accuracy_after: float | None
    history: tuple[StepRecord, ...]
    trainable_names: tuple[str, ...]
    trainable_numel: int
    cut_layer: int  # first layer not in the cached frozen prefix
    joint_seed: int
    prefix_s: float  # seconds spent on the frozen prefix
    party_wall_s: float
    resumed_from_step: int | None
    checkpoints_written: tuple[int, ...]
    artifacts: Mapping[str, str]  # what -> path of the files this party saved
    reveals: int  # values revealed in this session (every one is in the audit log)
    dp: Mapping[str, Any] | None  # the DP-ZO guarantee (secfwt.tuning.dp_zo.guarantee)
    model: ModelFacts
    # causal-LM jobs: the held-out mean response loss, None where the terms hide it (their
    # accuracy fields are None)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    #: causal-LM jobs: rows (of the frozen prefix or of a later forward's upper layers) whose
    #: hidden states failed the range check and were computed again
    rows_recomputed: int = 0
    #: jobs with a safety gate: :meth:`secfwt.runtime.gate.GateDecision.to_dict` (both owners
    #: learn it); None without a gate
    safety_gate: Mapping[str, Any] | None = None
    #: this party's traffic per phase (``frozen_prefix``, ``tuning``), each the fields of
    #: :class:`secfwt.mpc.traffic.Traffic`; empty where the process counts no traffic
    phase_traffic: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    #: rows the frozen prefix was computed for (training and held-out)
    prefix_rows: int = 0
    #: where the cached prefix ends: PREFIX_AT_LAYER (below ``cut_layer``) or
    #: PREFIX_AFTER_ATTENTION (after that layer's attention half:
    #: secfwt.tuning.trainable.TrainableSet.attention_frozen)
    prefix_end: str = PREFIX_AT_LAYER

    @property
    def released(self) -> bool:
        """False when the safety gate withheld the tuned parameters."""
        return self.safety_gate is None or bool(self.safety_gate["released"])

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def loss_history(self) -> list[float | None]:
        return [h.loss for h in self.history]

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (a daemon's job summary); the artifacts are served as files."""
        return {
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "rows_recomputed": self.rows_recomputed,
            "safety_gate": None if self.safety_gate is None else dict(self.safety_gate),
            "steps": self.steps,
            "history": [dataclasses.asdict(h) for h in self.history],
            "trainable": {"names": list(self.trainable_names), "numel": self.trainable_numel},
            "cut_layer": self.cut_layer,
            "prefix_end": self.prefix_end,
            "joint_seed": self.joint_seed,
            "prefix_s": self.prefix_s,
            "party_wall_s": self.party_wall_s,
            "resumed_from_step": self.resumed_from_step,
            "checkpoints_written": list(self.checkpoints_written),
            "reveals": self.reveals,
            "dp": None if self.dp is None else dict(self.dp),
            "spec": dataclasses.asdict(self.model),
            "phase_traffic": {k: dict(v) for k, v in self.phase_traffic.items()},
            "prefix_rows": self.prefix_rows,
        }


@dataclasses.dataclass(frozen=True)
class VariantOutcome:
    """One comparison run as this party saw it."""

    label: str
    accuracy_after: float | None
    tune_s: float
    loss_history: tuple[float | None, ...]
    bytes_sent: int  # what this party sent the other computing party during the run
    rounds: int
    dp: Mapping[str, Any] | None

    @property
    def steps(self) -> int:
        return len(self.loss_history)


@dataclasses.dataclass(frozen=True)
class ComparisonOutcome:
    """What a party's comparison session returns."""

    accuracy_before: float | None
    n_eval: int
    prefix_s: float
    joint_seed: int
    variants: tuple[VariantOutcome, ...]
    party_wall_s: float


def public_job_digest(cfg: JobConfig) -> str:
    """SHA-256 of the job's settings (not its file name): the parties agree on it, and every
    checkpoint names the job it belongs to by it."""
    public = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("source",)}
    # sections a job leaves at their defaults are left out: the digest jobs had before those
    # sections existed, so their checkpoints still resume
    if cfg.safety == SafetySection():
        del public["safety"]
    if cfg.safety_gate == SafetyGateSection():
        del public["safety_gate"]
    else:
        public["safety_gate"] = cfg.safety_gate.digest_form()
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()
