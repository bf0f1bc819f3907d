"""``secfwt simulate``: every party of a job as its own OS process on this machine."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secfwt.config import JobConfig
from secfwt.errors import ConfigError
from secfwt.models.checkpoint import resolve_model_path
from secfwt.mpc.launcher import new_queue, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from secfwt.runtime.job import run_job_party

log = logging.getLogger(__name__)


def provider_for(cfg: JobConfig, *, insecure_dev: bool) -> Provider:
    if cfg.job.provider is Provider.TFP:
        if not insecure_dev:
            raise ConfigError(
                "job.provider = 'tfp' lets the model owner generate every Beaver triple and so learn the data owner's "
                "inputs; it needs --insecure-dev (development only). Use provider = 'ttp' (a dealer process) otherwise"
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
) -> dict[str, Any]:
    """Run the job with one process per role; return the report (also written to the run folder).

    ``insecure_fixed_seed`` is for reproducibility tests only (every MPC seed predictable; see
    :func:`secfwt.mpc.session.init_party`); `secfwt simulate --insecure-fixed-seed` sets it,
    with a warning.
    ``checkpoint_dir``: each party checkpoints into ``checkpoint_dir/ROLE`` every
    ``checkpoint_every`` steps; ``resume`` continues from the latest step both hold (see
    :func:`secfwt.runtime.job.run_job_party`).
    """
    provider = provider_for(cfg, insecure_dev=insecure_dev)
    model_dir = resolve_model_path(cfg.model.path)
    if cfg.dp.enabled:
        preflight_dp(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run.output_dir) / f"{cfg.job.name}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = new_queue()
    common = {"config": cfg, "out_dir": str(out_dir), "progress": progress, "model_dir": str(model_dir), "checkpoint_every": checkpoint_every, "resume": resume}
    payloads = {role: {**common, "checkpoint_dir": None if checkpoint_dir is None else str(Path(checkpoint_dir) / role.value)} for role in (Role.MODEL_OWNER, Role.DATA_OWNER)}
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
    )
    wall = time.perf_counter() - t0
    do = results[Role.DATA_OWNER].value
    mo = results[Role.MODEL_OWNER].value
    report = {
        "job": cfg.job.name,
        "job_file": cfg.source,
        "mode": cfg.job.mode.value,
        "model": cfg.model.path,
        "attention": cfg.model.attention.value,
        "embedding": cfg.model.embedding.value,
        "provider": provider.value,
        "transport": cfg.run.transport.value,
        "accuracy_before": do["accuracy_before"],
        "accuracy_after": do["accuracy_after"],
        "accuracy_gain_points": None if do["accuracy_before"] is None else 100.0 * (do["accuracy_after"] - do["accuracy_before"]),
        "steps": do["steps"],
        "wall_s": wall,
        "frozen_prefix_s": do["prefix_s"],
        "cut_layer": do["cut_layer"],
        "joint_seed": do["joint_seed"],
        "trainable": do["trainable"],
        "loss_history": [h["loss"] for h in do["history"]],
        "resumed_from_step": do.get("resumed_from_step"),
        "dp": do["dp"],
        "disclosure_terms": cfg.terms.to_list(),
        "terms_digest": cfg.terms.digest(),
        "parties": {
            r.value: {"bytes_sent": res.bytes_sent, "rounds": res.rounds, "wall_s": res.wall_s, "reveals": res.value["reveals"] if res.value else 0, "artifacts": res.value["artifacts"] if res.value else {}}
            for r, res in results.items()
            if r is not Role.DEALER
        },
        "output_dir": str(out_dir),
        "machine": machine_info(),
    }
    report["parties"]["model_owner"]["accuracy_seen"] = {"before": mo["accuracy_before"], "after": mo["accuracy_after"]}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def preflight_dp(cfg: JobConfig) -> None:
    """Refuse an impossible privacy budget before any party process starts (the parties check
    again with the row count they agree on)."""
    from secfwt.dp.accounting import plan
    from secfwt.runtime.data_owner import count_train_rows

    plan(cfg.dp, n_train=count_train_rows(cfg), batch_size=cfg.zo.batch_size, steps=cfg.zo.steps, where=cfg.source)


def machine_info() -> dict[str, Any]:
    import os

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "platform": platform.platform(), "commit": commit}
