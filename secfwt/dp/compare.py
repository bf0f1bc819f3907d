"""``secfwt dp-compare``: accuracy against epsilon for forward-only tuning in MPC and DP-SGD.

One MPC session (model owner, data owner, dealer as processes) shares the model and data and
computes the frozen encoder once; from the same starting head it then runs zeroth-order SGD
without DP and DP-ZO at every epsilon (each run evaluated in MPC, none delivering parameters).
Then Opacus DP-SGD trains the same head in plaintext at the same epsilons. The report gives
accuracy, epsilon and wall time per run as JSON, a Markdown table and a PNG plot.

Wall time of an MPC run is reported as what a standalone job would take: the session's shared
part (start-up, sharing, frozen encoder, first evaluation) plus that run's tuning and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from secfwt.config import JobConfig, Mode, load_job
from secfwt.errors import ConfigError
from secfwt.roles import Role
from secfwt.runtime.contract import ComparisonOutcome, Variant

log = logging.getLogger(__name__)

EPSILONS = (1.0, 3.0, 8.0)
#: --quick: fewer rows, shorter reviews, fewer steps; a few minutes on 2 cores.
QUICK_OVERRIDES = (
    "data.shots_per_class=24",
    "data.eval_per_class=20",
    "model.max_length=16",
    "zo.steps=40",
    "zo.batch_size=16",
    "zo.directions=8",
    "zo.lr=0.3",
    "dp.baseline_steps=40",
)

Progress = Callable[[Role, dict[str, Any]], None]


def load_comparison_job(
    path: str | None, *, quick: bool, overrides: Sequence[str] = ()
) -> JobConfig:
    """The packaged comparison job (or ``path``), with --quick and --set overrides applied."""
    import importlib.resources

    if path is None:
        path = str(importlib.resources.files("secfwt.jobs").joinpath("dp_compare.toml"))
    cfg = load_job(path, overrides=[*(QUICK_OVERRIDES if quick else ()), *overrides])
    if cfg.job.mode is not Mode.ZO:
        raise ConfigError(
            f"{cfg.source}: job.mode = {cfg.job.mode.value!r}: dp-compare compares zeroth-order "
            "runs; use mode = 'zo'"
        )
    return cfg


def variants(cfg: JobConfig, epsilons: Sequence[float]) -> list[Variant]:
    """The MPC runs: no DP, then DP-ZO calibrated to each epsilon (other [dp] keys as given)."""
    no_dp = dataclasses.replace(cfg.dp, enabled=False)
    out = [Variant(label="zo (no DP)", config=dataclasses.replace(cfg, dp=no_dp))]
    for e in epsilons:
        dp = dataclasses.replace(
            cfg.dp, enabled=True, target_epsilon=float(e), noise_multiplier=None
        )
        out.append(Variant(label=f"dp-zo eps={e:g}", config=dataclasses.replace(cfg, dp=dp)))
    return out


def run_comparison(
    cfg: JobConfig,
    *,
    epsilons: Sequence[float] = EPSILONS,
    out_dir: Path,
    on_progress: Progress | None = None,
    skip_baseline: bool = False,
) -> dict[str, Any]:
    from secfwt.config import validate
    from secfwt.dp.baseline import baseline_plan, run_dp_baseline
    from secfwt.runtime.data_owner import count_train_rows
    from secfwt.runtime.simulate import machine_info
    from secfwt.tuning.accounting import plan

    if not epsilons or any(e <= 0 for e in epsilons):
        raise ConfigError(f"--epsilons {list(epsilons)}: give one or more values > 0, e.g. 1,3,8")
    runs = variants(cfg, epsilons)
    n_train = count_train_rows(cfg)
    for run in (v.config for v in runs):  # every budget is checked before any process starts
        validate(run)
        if run.dp.enabled:
            plan(
                run.dp,
                n_train=n_train,
                batch_size=run.zo.batch_size,
                steps=run.zo.steps,
                where=run.source,
            )
            if not skip_baseline:
                baseline_plan(run, n_train=n_train)
    progress = on_progress or (lambda role, msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mpc = _run_mpc(cfg, runs, out_dir, progress)
    rows = _mpc_rows(mpc, runs)
    if not skip_baseline:
        for e in epsilons:
            run = dataclasses.replace(
                cfg,
                dp=dataclasses.replace(
                    cfg.dp, target_epsilon=float(e), noise_multiplier=None, checkpoint_every=0
                ),
            )
            progress(
                Role.DATA_OWNER,
                {"kind": "phase", "phase": f"Opacus DP-SGD baseline at epsilon {e:g} (plaintext)"},
            )
            r = run_dp_baseline(run, on_progress=lambda msg: progress(Role.DATA_OWNER, msg))
            rows.append(
                {
                    "method": "opacus-dp-sgd",
                    "where": "plaintext (one party holds model and data)",
                    "target_epsilon": float(e),
                    "epsilon": r["epsilon"],
                    "noise_multiplier": r["noise_multiplier"],
                    "accuracy_before": r["accuracy_before"],
                    "accuracy_after": r["accuracy_after"],
                    "steps": r["steps"],
                    "wall_s": r["wall_s"],
                }
            )
    report = {
        "job": cfg.job.name,
        "job_file": cfg.source,
        "epsilons": [float(e) for e in epsilons],
        "delta": cfg.dp.delta,
        "accountant": cfg.dp.accountant.value,
        "max_grad_norm": cfg.dp.max_grad_norm,
        "n_train": n_train,
        "n_eval": mpc["n_eval"],
        "trainable": list(cfg.zo.trainable),
        "zo": dataclasses.asdict(cfg.zo),
        "baseline_lr": cfg.dp.baseline_lr,
        "runs": rows,
        "mpc_shared_s": mpc["shared_s"],
        "mpc_traffic": mpc["traffic"],
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    (out_dir / "dp-compare.json").write_text(json.dumps(report, indent=2))
    (out_dir / "dp-compare.md").write_text(markdown(report))
    plot(report, out_dir / "dp-compare.png")
    return report


def _run_mpc(
    cfg: JobConfig, runs: list[Variant], out_dir: Path, progress: Progress
) -> dict[str, Any]:
    from secfwt.models.checkpoint import resolve_model_path
    from secfwt.mpc import device as mpc_device
    from secfwt.mpc.launcher import new_queue, run_parties
    from secfwt.runtime.contract import ComparisonJob, PartyJob
    from secfwt.runtime.job import run_comparison_party
    from secfwt.runtime.simulate import provider_for

    queue = new_queue()
    job = PartyJob(
        config=cfg,
        out_dir=str(out_dir / "mpc"),
        progress=queue,
        model_dir=str(resolve_model_path(cfg.model.path)),
    )
    both = ComparisonJob(job=job, variants=tuple(runs))
    t0 = time.perf_counter()
    results = run_parties(
        run_comparison_party,
        payloads={Role.MODEL_OWNER: both, Role.DATA_OWNER: both},
        provider=provider_for(cfg, insecure_dev=False),
        timeout_s=cfg.run.timeout_s,
        messages=queue,
        on_message=progress,
        device=mpc_device.resolve(cfg.run.device, source=cfg.source),
    )
    wall = time.perf_counter() - t0
    do: ComparisonOutcome = results[Role.DATA_OWNER].value
    tuned = sum(v.tune_s for v in do.variants)
    return {
        "data_owner": do,
        "shared_s": wall - tuned,
        "n_eval": do.n_eval,
        "traffic": {r.value: res.link_counts() for r, res in results.items()},
    }


def _mpc_rows(mpc: dict[str, Any], runs: list[Variant]) -> list[dict[str, Any]]:
    do: ComparisonOutcome = mpc["data_owner"]
    rows = []
    for variant, v in zip(runs, do.variants, strict=True):
        label, run, dp = variant.label, variant.config, v.dp
        rows.append(
            {
                "method": "mpc-dp-zo" if run.dp.enabled else "mpc-zo",
                "where": "MPC (model owner, data owner, dealer)",
                "label": label,
                "target_epsilon": run.dp.target_epsilon if run.dp.enabled else None,
                "epsilon": dp["epsilon_against_each_party"] if dp else None,
                "epsilon_released_output": dp["epsilon_released_output"] if dp else None,
                "noise_multiplier": dp["noise_multiplier_per_party"] if dp else None,
                "accuracy_before": do.accuracy_before,
                "accuracy_after": v.accuracy_after,
                "steps": v.steps,
                "tune_s": v.tune_s,
                "wall_s": mpc["shared_s"] + v.tune_s,
                "data_owner_bytes_sent": v.bytes_sent,
                "dp": None if dp is None else dict(dp),
            }
        )
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# DP comparison: {report['job']}",
        "",
        f"{report['n_train']} training rows, {report['n_eval']} held-out rows; delta "
        f"{report['delta']:g}, {report['accountant']} accountant, "
        f"clip {report['max_grad_norm']:g}; machine: {report['machine']['cpus']} CPUs, commit "
        f"{report['machine']['commit']}; total {report['wall_s']:.0f} s.",
        "",
        "| method | target eps | eps (each party) | eps (released output) | noise mult. | "
        "accuracy before | accuracy after | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['method']} | {_fmt(r['target_epsilon'], 'g')} | {_fmt(r['epsilon'], '.3f')} | "
            f"{_fmt(r.get('epsilon_released_output'), '.3f')} | "
            f"{_fmt(r['noise_multiplier'], '.3f')} | {r['accuracy_before']:.3f} | "
            f"{r['accuracy_after']:.3f} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        "MPC wall time = the session's shared part (start-up, sharing, frozen encoder, first "
        f"evaluation: {report['mpc_shared_s']:.0f} s) + that run's tuning and evaluation. "
        "For Opacus, epsilon holds against anyone who sees the trained model; for DP-ZO, "
        "'each party' is the guarantee against one owner, who knows its own noise, and "
        "'released output' the one against anyone who sees only the result.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    runs = report["runs"]
    for method, style, name in (
        ("mpc-dp-zo", "o-", "DP-ZO in MPC"),
        ("opacus-dp-sgd", "s--", "Opacus DP-SGD (plaintext)"),
    ):
        pts = sorted((r["epsilon"], r["accuracy_after"]) for r in runs if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    nodp = [r for r in runs if r["method"] == "mpc-zo"]
    if nodp:
        ax.axhline(
            nodp[0]["accuracy_after"], color="tab:green", linestyle=":", label="ZO in MPC, no DP"
        )
        ax.axhline(nodp[0]["accuracy_before"], color="grey", linestyle="-.", label="before tuning")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(report["epsilons"], [f"{e:g}" for e in report["epsilons"]])
    ax.set_xlabel(f"epsilon (delta = {report['delta']:g})")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Accuracy vs privacy: {report['n_train']} training rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
