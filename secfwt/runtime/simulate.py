"""``secfwt simulate``: every party of a job as its own OS process on this machine."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from secfwt.config import JobConfig
from secfwt.data.inputs import InstructionInputs
from secfwt.errors import ConfigError
from secfwt.models.checkpoint import resolve_model_path
from secfwt.models.spec import Head
from secfwt.mpc import device as mpc_device
from secfwt.mpc import ring_tuning
from secfwt.mpc.launcher import PartyResult, new_queue, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from secfwt.runtime.contract import Checkpointing, PartyJob, PartyOutcome
from secfwt.runtime.gate import WITHHELD
from secfwt.runtime.job import run_job_party
from secfwt.runtime.links import LINKS, PartyCost, projections
from secfwt.runtime.policy import SafetyPolicy, check_policy

log = logging.getLogger(__name__)


def provider_for(cfg: JobConfig, *, insecure_dev: bool) -> Provider:
    if cfg.job.provider is Provider.TFP:
        if not insecure_dev:
            raise ConfigError(
                "job.provider = 'tfp' lets the model owner generate every Beaver triple "
                "and so learn the data owner's "
                "inputs; it needs --insecure-dev (development only). "
                "Use provider = 'ttp' (a dealer process) otherwise"
            )
        return Provider.TFP
    return Provider.TTP


def run_simulation(
    cfg: JobConfig,
    *,
    insecure_dev: bool = False,
    on_progress: Callable[[Role, dict[str, Any]], None] | None = None,
    insecure_fixed_seed: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    policy: SafetyPolicy | None = None,
) -> dict[str, Any]:
    """Run the job with one process per role; return the report (also written to the run folder).

    ``insecure_fixed_seed`` is for reproducibility tests only (every MPC seed predictable; see
    :func:`secfwt.mpc.session.init_party`); `secfwt simulate --insecure-fixed-seed` sets it,
    with a warning.
    ``checkpoint_dir``: each party checkpoints into ``checkpoint_dir/ROLE`` every
    ``checkpoint_every`` steps; ``resume`` continues from the latest step both hold (see
    :class:`secfwt.runtime.contract.Checkpointing`).
    ``policy``: the model owner's safety policy; a job that lacks what it requires is refused
    (:class:`~secfwt.errors.PolicyError`) before any party starts.
    """
    if policy is not None:
        check_policy(cfg, policy)
    device = mpc_device.resolve(cfg.run.device, source=cfg.source)  # before data or parties
    if resume and checkpoint_dir is None:
        raise ConfigError(
            "resume needs checkpoint_dir: the folder the parties' checkpoints were written to"
        )
    provider = provider_for(cfg, insecure_dev=insecure_dev)
    model_dir = resolve_model_path(cfg.model.path)
    data = preflight_causal(cfg, model_dir) if cfg.model.head is Head.CAUSAL_LM else None
    if cfg.dp.enabled:
        preflight_dp(cfg, n_train=None if data is None else data.n_train)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run.output_dir) / f"{cfg.job.name}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = new_queue()
    payloads = {
        role: PartyJob(
            config=cfg,
            out_dir=str(out_dir),
            model_dir=str(model_dir),
            data=data if role is Role.DATA_OWNER else None,
            progress=progress,
            checkpoints=None
            if checkpoint_dir is None
            else Checkpointing(
                folder=str(Path(checkpoint_dir) / role.value), every=checkpoint_every, resume=resume
            ),
        )
        for role in (Role.MODEL_OWNER, Role.DATA_OWNER)
    }
    machine = machine_info()  # before the parties start: the code they import
    t0 = time.perf_counter()
    results = run_parties(
        run_job_party,
        payloads=payloads,
        provider=provider,
        timeout_s=cfg.run.timeout_s,
        messages=progress,
        on_message=on_progress or (lambda role, msg: None),
        transport=cfg.run.transport,
        insecure_fixed_seed=insecure_fixed_seed,
        device=device,
    )
    wall = time.perf_counter() - t0
    do: PartyOutcome = results[Role.DATA_OWNER].value
    mo: PartyOutcome = results[Role.MODEL_OWNER].value
    before, after = do.accuracy_before, do.accuracy_after
    gain = None if before is None or after is None else 100.0 * (after - before)
    loss_before, loss_after = do.eval_loss_before, do.eval_loss_after
    drop = None if loss_before is None or loss_after is None else loss_before - loss_after
    report: dict[str, Any] = {
        "job": cfg.job.name,
        "job_file": cfg.source,
        "mode": cfg.job.mode.value,
        "model": cfg.model.path,
        "attention": cfg.model.attention.value,
        "embedding": cfg.model.embedding.value,
        "provider": provider.value,
        "transport": cfg.run.transport.value,
        "device": device_report(device, results),
        "accuracy_before": do.accuracy_before,
        "accuracy_after": do.accuracy_after,
        "accuracy_gain_points": gain,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "eval_loss_drop": drop,
        "state": "released" if do.released else WITHHELD,
        "safety_gate": None if do.safety_gate is None else dict(do.safety_gate),
        "steps": do.steps,
        "wall_s": wall,
        "frozen_prefix_s": do.prefix_s,
        "rows_recomputed": do.rows_recomputed,
        "cut_layer": do.cut_layer,
        "prefix_end": do.prefix_end,
        "joint_seed": do.joint_seed,
        "trainable": {"names": list(do.trainable_names), "numel": do.trainable_numel},
        "loss_history": do.loss_history,
        "resumed_from_step": do.resumed_from_step,
        "dp": None if do.dp is None else dict(do.dp),
        "disclosure_terms": cfg.terms.to_list(),
        "terms_digest": cfg.terms.digest(),
        "parties": parties_report(results),
        "traffic": traffic_report({Role.DATA_OWNER: do, Role.MODEL_OWNER: mo}),
        "projected_s": link_projections(results),
        "projection": _PROJECTION,
        "output_dir": str(out_dir),
        "machine": machine,
    }
    seen = {"before": mo.accuracy_before, "after": mo.accuracy_after}
    report["parties"]["model_owner"]["accuracy_seen"] = seen
    if mo.safety_gate is not None:
        report["parties"]["model_owner"]["safety_gate_seen"] = dict(mo.safety_gate)
    if cfg.model.head is Head.CAUSAL_LM:
        loss_seen = {"before": mo.eval_loss_before, "after": mo.eval_loss_after}
        report["parties"]["model_owner"]["eval_loss_seen"] = loss_seen
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


_PROJECTION = (
    "modelled, not measured: max_p wall_p + (max_p sent_p + max_p dealer_p) * 8 / bandwidth "
    "+ (max_p rounds_p + max_p dealer_requests_p) * RTT over the computing parties' whole "
    "processes (sent_p to the other party, dealer_p received from the dealer); "
    + ", ".join(link.describe() for link in LINKS)
)


def parties_report(results: Mapping[Role, PartyResult]) -> dict[str, dict[str, Any]]:
    """Per role: what it sent and how it ran. A computing party's counts are
    :meth:`~secfwt.mpc.launcher.PartyResult.link_counts` (``traffic`` has every count); the
    dealer (TTP provider) reports what it sent and received and the requests it answered,
    counted in its own process."""
    out: dict[str, dict[str, Any]] = {}
    for r, res in results.items():
        if r is Role.DEALER:
            out[r.value] = {
                "bytes_sent": res.bytes_sent,
                "bytes_received": res.traffic.get("received", 0),
                "requests": res.rounds,
                "wall_s": res.wall_s,
                "ring_matmul": res.ring_matmul,
            }
            continue
        out[r.value] = {
            **res.link_counts(),
            "wall_s": res.wall_s,
            "reveals": res.value.reveals if res.value else 0,
            "artifacts": dict(res.value.artifacts) if res.value else {},
            "phase_traffic": (
                {k: dict(v) for k, v in res.value.phase_traffic.items()} if res.value else {}
            ),
            "traffic": dict(res.traffic),
            "ring_matmul": res.ring_matmul,
        }
    return out


def device_report(device: Any, results: Mapping[Role, PartyResult]) -> dict[str, Any] | None:
    """``run.device`` and how many ring products of every process (the dealer's included) ran
    each way: on the device, or on the host where torch measured faster there (None: no
    device)."""
    if device is None:
        return None
    calls = {m.value: 0 for m in ring_tuning.Method}
    for res in results.values():
        for rec in res.ring_matmul:
            calls[rec["method"]] += rec["calls"]
    return {"device": ring_tuning.device_name(device), "products": calls}


#: The bytes of a phase on every link: what each computing party sent the other, what the dealer
#: sent (to rank 0) and the requests it received.
_WIRE = ("sent", "dealer_bytes", "dealer_sent")


def traffic_report(outcomes: Mapping[Role, PartyOutcome]) -> dict[str, Any] | None:
    """Bytes on the wire (both owners and the dealer, every direction) per phase: the frozen
    prefix per row it covers, and tuning per step; None where the parties counted no phases."""
    phases = [o.phase_traffic for o in outcomes.values()]
    if not all(phases):
        return None
    do = outcomes[Role.DATA_OWNER]

    def wire(phase: str) -> int:
        return sum(p[phase][k] for p in phases for k in _WIRE)

    prefix, tuning = wire("frozen_prefix"), wire("tuning")
    rows, steps = do.prefix_rows, do.steps
    return {
        "frozen_prefix": {
            "bytes": prefix,
            "rows": rows,
            "bytes_per_row": prefix / rows if rows else None,
        },
        "tuning": {
            "bytes": tuning,
            "steps": steps,
            "bytes_per_step": tuning / steps if steps else None,
        },
        "counted": "payload bytes both computing parties sent each other, plus the dealer's "
        "answers and the requests it received, during the phase",
    }


def link_projections(results: Mapping[Role, PartyResult]) -> dict[str, float]:
    """The job's time on each modelled link (:mod:`secfwt.runtime.links`), dealer included."""
    costs = [
        PartyCost(
            wall_s=res.wall_s,
            bytes_sent=res.traffic.get("sent", 0),
            bytes_received=res.traffic.get("received", 0),
            rounds=res.traffic.get("rounds", 0),
            dealer_bytes=res.traffic.get("dealer_bytes", 0),
            dealer_requests=res.traffic.get("dealer_requests", 0),
        )
        for r, res in results.items()
        if r is not Role.DEALER
    ]
    return projections(costs)


def preflight_causal(cfg: JobConfig, model_dir: Path) -> InstructionInputs:
    """A causal-LM job's checks before any party starts: the checkpoint is a decoder whose head
    the terms let the data owner use, and the data owner's pairs load, split, format and fit
    the response window (each defect raises here, naming the field). Returns the prepared rows,
    which the data owner's process then uses as they are."""
    from secfwt.models.checkpoint import check_architecture, load_config
    from secfwt.runtime.causal import check_causal_model
    from secfwt.runtime.data_owner import prepare_instruction_inputs

    config = load_config(model_dir)
    family = check_architecture(config)
    check_causal_model(
        cfg,
        family_is_decoder=family.is_decoder,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )
    if cfg.safety_gate.enabled:  # the gate's prompts load and fit (the model owner's side)
        from secfwt.runtime.gate import gate_rows

        gate_rows(cfg, model_dir)
    if cfg.safety_gate.safe_delta:  # trainables it can correct; calibration apart from the gate
        from secfwt.models.checkpoint import spec_of_config
        from secfwt.runtime.safe_delta import job_calibration
        from secfwt.tuning.trainable import trainable_set

        trainable_set(cfg, spec_of_config(model_dir, head=cfg.model.head))
        job_calibration(cfg)
    return prepare_instruction_inputs(cfg, tokenizer_dir=model_dir)


def preflight_dp(cfg: JobConfig, *, n_train: int | None = None) -> None:
    """Refuse an impossible privacy budget before any party process starts (the parties check
    again with the row count they agree on); ``n_train``: the rows already prepared, else the
    classification split's count."""
    from secfwt.runtime.data_owner import count_train_rows
    from secfwt.tuning.accounting import plan

    plan(
        cfg.dp,
        n_train=count_train_rows(cfg) if n_train is None else n_train,
        batch_size=cfg.zo.batch_size,
        steps=cfg.zo.steps,
        where=cfg.source,
    )


def machine_info() -> dict[str, Any]:
    """Python, torch, CPUs and the commit of the secfwt code that runs. Call it when a run
    starts: the commit is read from the repository the imported package lives in (None for an
    installed copy or without git), not from the working directory, so a report names the code
    its parties imported even if the checkout moves on during a long run."""
    import os

    import torch

    root = Path(__file__).resolve().parents[2]  # secfwt/runtime/simulate.py -> the checkout

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "--short", "HEAD") if top and Path(top).resolve() == root else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "commit": commit,
    }
