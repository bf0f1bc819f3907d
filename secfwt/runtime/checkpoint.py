"""One computing party's checkpoints of a tuning job: its own shares, written atomically.

What a party writes (into its own ``checkpoint_dir``; nothing here crosses the network):

* ``step-NNNNNNNN.pt`` every ``checkpoint_every`` steps, never mid-step: this party's raw
  share tensors of the trainable parameters (int64, one per name), the step count, the loss
  history, the joint seed, the held-out accuracy it saw before tuning, the job and terms
  digests, and a **checkpoint id** both parties agreed on when they wrote it (the model owner
  draws it, the data owner receives it). A share means something only together with the
  peer's share written at the same moment; on resume the parties compare (step, id) pairs and
  load only a pair both hold, so shares of different writes can never be combined.
* ``prefix-ID.pt`` once per MPC session: this party's shares of the cached frozen prefix
  (N x T x H int64 for a mid-layer cut: large, but it is the expensive part of a job, so a
  resume loads it instead of recomputing it). It does not change between steps, so it is
  written once and every step file names it; pruning keeps it while a step file refers to it.
* ``local-NNNNNNNN.pkl`` (data owner, SecFwT mode only): the data owner's CMA-ES state (the
  ``cma`` library object and numpy's global generator, which ``cma`` draws from). See
  :meth:`PartyCheckpoints.load` for why this one file is a pickle.

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``, fsync of the
folder): a crash leaves either the old or the new file, never half of one. The last two step
files are kept, so a crash while one party writes step k still leaves step k - every on both.
Tensor files are read with ``torch.load(weights_only=True)``: no code runs from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ConfigError, SecfwtError
from secfwt.roles import Role

log = logging.getLogger(__name__)

#: Version of the files below; a file of another version is refused, not guessed at.
FORMAT = 1
#: Where a cached prefix ends: at a layer boundary (every prefix file written before this was
#: recorded, which carry no mark), or after the attention half of the first trained layer
#: (:meth:`secfwt.tuning.trainable.TrainableSet.attention_frozen`).
PREFIX_AT_LAYER, PREFIX_AFTER_ATTENTION = "layer", "attention"
#: Step files kept per party (two: a crash during one party's write still leaves a common step).
KEEP = 2
_STEP_RE = re.compile(r"step-([0-9]{8})\.pt")  # fullmatch: "$" passes a final newline


class CheckpointStop(SecfwtError):
    """Raised by the test hook ``stop_after_step`` once the checkpoint of that step is written."""

    exit_code = 75

    def __init__(self, step: int) -> None:
        super().__init__(
            f"stopped after writing the checkpoint of step {step} (Checkpointing.stop_after_step; "
            "tests only)"
        )
        self.step = step

    def __reduce__(self):  # picklable across processes with its one-argument constructor
        return (type(self), (self.step,))


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A step file this party holds: the public facts the parties compare on resume."""

    step: int
    checkpoint_id: str
    path: Path


@dataclasses.dataclass
class Checkpoint:
    """What one step file holds, loaded."""

    step: int
    checkpoint_id: str
    joint_seed: int
    history: list[dict[str, Any]]
    accuracy_before: float | None
    theta_shares: dict[str, torch.Tensor]
    precision_bits: int
    prefix_id: str
    local: Any  # the data owner's local optimiser state (SecFwT), else None
    #: where the cached prefix ends: :data:`PREFIX_AT_LAYER` or :data:`PREFIX_AFTER_ATTENTION`
    prefix_end: str = PREFIX_AT_LAYER


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_tensors(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001  (truncated, foreign or tampered file)
        raise ConfigError(
            f"checkpoint {path}: cannot read it ({type(exc).__name__}: {exc}); remove the file or "
            "the folder to start over"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ConfigError(
            f"checkpoint {path}: not a secfwt checkpoint of format {FORMAT}; remove it or point "
            "checkpoint_dir elsewhere"
        )
    return obj


def precision_bits() -> int:
    """Fractional bits of CrypTen's fixed-point encoding in this session (16 by default)."""
    from secfwt.crypten_compat import crypten

    return int(crypten.cfg.encoder.precision_bits)


def is_shared(x: Any) -> bool:
    from secfwt.crypten_compat import crypten

    return isinstance(x, crypten.mpc.MPCTensor) and x.ptype is crypten.mpc.arithmetic


def share_of(x: Any) -> torch.Tensor:
    """This party's raw int64 share of an arithmetic MPC tensor at the session's precision."""
    if not is_shared(x):
        raise TypeError(f"only arithmetic MPC tensors are checkpointed, got {type(x).__name__}")
    bits = int(x._tensor.encoder._precision_bits)
    if bits != precision_bits():
        raise ValueError(
            f"an MPC tensor at {bits} fractional bits; checkpoints assume the session's "
            f"{precision_bits()}"
        )
    return x.share.clone()


def from_share(share: torch.Tensor, precision_bits: int) -> Any:
    """The MPC tensor whose share on this party is ``share`` (the peer loads its own)."""
    from secfwt.crypten_compat import crypten

    return crypten.mpc.MPCTensor.from_shares(share, precision=precision_bits)


class PartyCheckpoints:
    """The checkpoint folder of one party for one job."""

    def __init__(
        self, folder: str | Path, *, role: Role, job_digest: str, terms_digest: str
    ) -> None:
        self.folder = Path(folder)
        self.role = role
        self.job_digest = job_digest
        self.terms_digest = terms_digest
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------
    def available(self) -> list[CheckpointRef]:
        """This party's step files, oldest first. Refuses files of another job, terms or role."""
        out = []
        for p in sorted(self.folder.iterdir()):
            m = _STEP_RE.fullmatch(p.name)
            if m is None:
                continue
            head = _load_tensors(p)
            self._check_owner(head, p)
            out.append(
                CheckpointRef(
                    step=int(head["step"]), checkpoint_id=str(head["checkpoint_id"]), path=p
                )
            )
        return sorted(out, key=lambda r: r.step)

    def _check_owner(self, head: dict[str, Any], path: Path) -> None:
        if head.get("role") != self.role.value:
            raise ConfigError(
                f"checkpoint {path} was written by the {head.get('role')}, not the "
                f"{self.role.value}; give each party its own checkpoint_dir"
            )
        if head.get("job_digest") != self.job_digest:
            raise ConfigError(
                f"checkpoint {path} belongs to another job (job digest "
                f"{str(head.get('job_digest'))[:12]}..., this job "
                f"{self.job_digest[:12]}...); point checkpoint_dir at this job's own folder or "
                "empty it"
            )
        if head.get("terms_digest") != self.terms_digest:
            raise ConfigError(
                f"checkpoint {path} was written under other disclosure terms (digest "
                f"{str(head.get('terms_digest'))[:12]}...); "
                "a job resumes only under the terms both parties accepted; empty the folder to "
                "start over"
            )

    def load(self, ref: CheckpointRef) -> tuple[Checkpoint, torch.Tensor | None]:
        """Load a step file and the prefix shares it names (None if it cached none).

        The data owner's CMA-ES state is the one pickle: the ``cma`` object has no tensor form,
        and the file is this party's own, written by its own process into its own folder. Its
        SHA-256 is recorded in the step file (read with ``weights_only=True``) and checked
        before unpickling, so a file of another write or a corrupted one is refused first;
        whoever can rewrite both files can also change this party's code, so the folder needs
        the same protection as the installation.
        """
        head = _load_tensors(ref.path)
        self._check_owner(head, ref.path)
        local = None
        if head.get("local") is not None:
            lp = self.folder / head["local"]["file"]
            try:
                raw = lp.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"checkpoint {ref.path} names {lp}, which cannot be read: {exc}"
                ) from exc
            if hashlib.sha256(raw).hexdigest() != head["local"]["sha256"]:
                raise ConfigError(
                    f"checkpoint {lp}: its SHA-256 does not match the one recorded in "
                    f"{ref.path.name}; refusing to unpickle it"
                )
            local = pickle.loads(raw)  # noqa: S301  (own file, digest checked above)
        cache, prefix_end = None, PREFIX_AT_LAYER
        prefix_id = str(head["prefix_id"])
        if prefix_id:
            pp = self.folder / f"prefix-{prefix_id}.pt"
            if not pp.exists():
                raise ConfigError(
                    f"checkpoint {ref.path} needs the prefix shares {pp.name}, which are missing; "
                    "empty the folder to start over"
                )
            pre = _load_tensors(pp)
            self._check_owner(pre, pp)
            if pre.get("prefix_id") != prefix_id:
                raise ConfigError(
                    f"{pp}: holds prefix {pre.get('prefix_id')}, the step file needs {prefix_id}"
                )
            cache = pre["share"]
            prefix_end = str(pre.get("prefix_end", PREFIX_AT_LAYER))
        ckpt = Checkpoint(
            step=int(head["step"]),
            checkpoint_id=str(head["checkpoint_id"]),
            joint_seed=int(head["joint_seed"]),
            history=list(head["history"]),
            accuracy_before=head["accuracy_before"],
            theta_shares=dict(head["theta"]),
            precision_bits=int(head["precision_bits"]),
            prefix_id=prefix_id,
            local=local,
            prefix_end=prefix_end,
        )
        return ckpt, cache

    # -- writing -------------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "role": self.role.value,
            "job_digest": self.job_digest,
            "terms_digest": self.terms_digest,
        }

    def write_prefix(self, prefix_id: str, share: torch.Tensor, *, end: str) -> None:
        """This party's shares of the cached frozen prefix, once per session; ``end``: where
        the prefix ends (:data:`PREFIX_AT_LAYER`, :data:`PREFIX_AFTER_ATTENTION`)."""
        path = self.folder / f"prefix-{prefix_id}.pt"
        if not path.exists():
            head = {**self._header(), "prefix_id": prefix_id, "prefix_end": end}
            _atomic_write(path, _torch_bytes({**head, "share": share}))

    def write(
        self,
        *,
        step: int,
        checkpoint_id: str,
        joint_seed: int,
        history: list[dict[str, Any]],
        accuracy_before: float | None,
        theta_shares: dict[str, torch.Tensor],
        precision_bits: int,
        prefix_id: str,
        local: Any = None,
    ) -> Path:
        """Write the step file (and the local optimiser state), then prune old files."""
        local_ref = None
        if local is not None:
            raw = pickle.dumps(local)
            name = f"local-{step:08d}.pkl"
            _atomic_write(self.folder / name, raw)
            local_ref = {"file": name, "sha256": hashlib.sha256(raw).hexdigest()}
        body = {
            **self._header(),
            "step": step,
            "checkpoint_id": checkpoint_id,
            "joint_seed": joint_seed,
            "history": history,
            "accuracy_before": accuracy_before,
            "theta": theta_shares,
            "precision_bits": precision_bits,
            "prefix_id": prefix_id,
            "local": local_ref,
        }
        path = self.folder / f"step-{step:08d}.pt"
        _atomic_write(path, _torch_bytes(body))
        self._prune()
        return path

    def _prune(self) -> None:
        steps = sorted(p for p in self.folder.iterdir() if _STEP_RE.fullmatch(p.name))
        for old in steps[:-KEEP]:
            old.unlink()
            loc = self.folder / old.name.replace("step-", "local-").replace(".pt", ".pkl")
            loc.unlink(missing_ok=True)
        kept_prefixes = set()
        kept_locals = set()
        for p in steps[-KEEP:]:
            head = _load_tensors(p)
            if head.get("prefix_id"):
                kept_prefixes.add(f"prefix-{head['prefix_id']}.pt")
            if head.get("local"):
                kept_locals.add(head["local"]["file"])
        for p in self.folder.iterdir():
            if (p.name.startswith("prefix-") and p.name not in kept_prefixes) or (
                p.name.startswith("local-") and p.name not in kept_locals
            ):
                p.unlink()

    def discard_tuned(self) -> list[str]:
        """Delete every step file and optimiser state (shares of tuned values) of this job; the
        frozen prefix stays (it holds no tuned value). Returns the names deleted."""
        gone = []
        for p in sorted(self.folder.iterdir()):
            if _STEP_RE.fullmatch(p.name) or p.name.startswith("local-"):
                p.unlink()
                gone.append(p.name)
        return gone

    def forget_prefix(self, prefix_id: str) -> None:
        """Remove a prefix file no step file refers to (a session that wrote no step)."""
        (self.folder / f"prefix-{prefix_id}.pt").unlink(missing_ok=True)


def common_checkpoint(
    mine: list[CheckpointRef], theirs: list[tuple[int, str]]
) -> CheckpointRef | None:
    """The latest step file this party holds whose (step, id) the peer holds too."""
    other = set(theirs)
    both = [r for r in mine if (r.step, r.checkpoint_id) in other]
    return max(both, key=lambda r: r.step) if both else None
