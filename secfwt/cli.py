"""The ``secfwt`` command. Thin: parse, call one runtime function, print, map errors to exit
codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from secfwt.errors import ConfigError, ProtocolError, SecfwtError, exit_code_for
from secfwt.safety.cli import write_report

log = logging.getLogger("secfwt")


def cmd_verify_model(args: argparse.Namespace) -> int:
    from secfwt.models.attention import RFASettings
    from secfwt.models.spec import Attention, EmbeddingMode
    from secfwt.mpc.provider import Provider
    from secfwt.runtime.verify import VerifyRequest, check, run_verify

    provider = Provider.TFP if args.insecure_dev else Provider.TTP
    req = VerifyRequest(
        model_path=args.model_dir,
        attention=Attention(args.attention),
        seq_len=args.seq_len,
        embedding=EmbeddingMode(args.embedding),
        rfa=RFASettings(num_features=args.rfa_features, sigma=args.rfa_sigma, seed=args.seed),
        seed=args.seed,
        provider=provider,
        max_abs_tol=args.max_abs_tol,
        mean_abs_tol=args.mean_abs_tol,
        samples=args.samples,
        per_layer=args.per_layer,
        min_argmax_agreement=args.min_argmax_agreement,
        max_mean_err_over_std=args.max_mean_err_over_std,
    )
    print(
        f"verify-model: secure {req.attention.value} forward of {args.model_dir} at seq-len "
        f"{req.seq_len} (3 processes: model owner, data owner, dealer) ...",
        flush=True,
    )
    report = run_verify(req)
    write_report(report, args.report)
    if "logits_mean_abs_err" in report:  # a decoder: logits on chat prompts
        for row in report.get("per_layer", []):
            print(
                f"  layer {row['layer']}: max_abs_err {row['max_abs_err']:.3e}  mean_abs_err "
                f"{row['mean_abs_err']:.3e}  (reference mean abs {row['reference_mean_abs']:.3g})"
            )
        for line in report["ranges_not_covered"]:
            print(f"  WARNING: {line}")
        summary = (
            f"logits over {report['positions']} positions: max_abs_err "
            f"{report['logits_max_abs_err']:.3e}  mean_abs_err {report['logits_mean_abs_err']:.3e} "
            f"({100 * report['logits_mean_abs_err_over_std']:.3f}% of the logits' std "
            f"{report['logits_std']:.3g})  argmax_agreement {report['argmax_agreement']:.4f}"
            + (
                f" ({report['argmax_agreement_outside_near_ties']:.4f} outside "
                f"{report['argmax_near_ties']} near-tie position(s))"
                if report["argmax_near_ties"]
                else ""
            )
        )
        for d in report["argmax_disagreements"]:
            print(
                f"  argmax differs at position {d['position']}: the reference's top-1 logit leads "
                f"by {d['reference_lead_over_std']:.3g} of the logits' std"
            )
    else:
        summary = (
            f"max_abs_err {report['max_abs_err']:.3e}  mean_abs_err {report['mean_abs_err']:.3e}  "
            f"argmax_agreement {report['argmax_agreement']:.4f}"
        )
    print(
        f"{summary}  ({report['reference']})\n"
        f"wall {report['wall_s']:.1f} s, secure compute {report['secure_compute_s']:.1f} s; "
        + ", ".join(
            f"{r}: {p['bytes_sent'] / 1e6:.1f} MB sent, {p['rounds']} rounds"
            for r, p in report["parties"].items()
        )
    )
    check(report)
    print("PASS: within tolerance " + json.dumps(report["tolerance"]))
    return 0


def cmd_prepare_models(args: argparse.Namespace) -> int:
    """Resolve packaged models once, so that no party process converts one on its first run."""
    import time

    from secfwt.models.packaged import PACKAGED_MODELS, resolve_packaged

    for name in args.names or list(PACKAGED_MODELS):
        name = name.removeprefix("packaged:")
        t0 = time.perf_counter()
        path = resolve_packaged(name)
        print(f"packaged:{name} -> {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from secfwt.config import load_job
    from secfwt.runtime.progress import ProgressView
    from secfwt.runtime.simulate import run_simulation

    cfg = load_job(args.job, overrides=args.set or ())
    policy = None
    if args.policy:
        from secfwt.runtime.policy import load_policy

        policy = load_policy(args.policy)
    if args.insecure_dev:
        print(
            "WARNING: --insecure-dev: development shortcuts are allowed for this run; never use it "
            "with real data.",
            file=sys.stderr,
        )
    if args.resume and not args.checkpoint_dir:
        raise ConfigError(
            "--resume needs --checkpoint-dir (the folder the interrupted run checkpointed into)"
        )
    if args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every = {args.checkpoint_every}: must be >= 1")
    if args.insecure_fixed_seed is not None:
        print(
            "WARNING: --insecure-fixed-seed: every MPC seed is derived from a known number, so "
            "every share is predictable; reproducibility tests only.",
            file=sys.stderr,
        )
    print(
        f"simulate: job {cfg.job.name!r} ({cfg.source}), mode {cfg.job.mode.value}, model "
        f"{cfg.model.path}"
    )
    print("disclosure terms accepted by both owners:")
    for line in cfg.terms.describe():
        print(f"  - {line}")
    with ProgressView() as view:
        report = run_simulation(
            cfg,
            insecure_dev=args.insecure_dev,
            on_progress=view.update,
            insecure_fixed_seed=args.insecure_fixed_seed,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            policy=policy,
        )
    write_report(report, args.report)
    print(f"{_held_out_line(report)} after {report['steps']} steps in {report['wall_s']:.0f} s")
    gate = report.get("safety_gate")
    if gate is not None:
        print(
            f"safety gate: score {gate['score_before']:.4f} -> {gate['score_after']:.4f} on "
            f"{gate['prompts']} prompts: {gate['state']} ({gate['reason']})"
        )
    for role, p in report["parties"].items():
        if "requests" in p:  # the dealer
            print(
                f"  {role}: {p['bytes_sent'] / 1e6:.1f} MB sent, "
                f"{p['bytes_received'] / 1e6:.2f} MB received, {p['requests']} requests answered"
            )
            continue
        print(
            f"  {role}: {p['bytes_sent'] / 1e6:.1f} MB sent, {p['bytes_received'] / 1e6:.1f} MB "
            f"received, {p['dealer_bytes'] / 1e6:.1f} MB from the dealer, {p['rounds']} rounds, "
            f"{p['reveals']} reveals, artifacts: {', '.join(p['artifacts'].values()) or '-'}"
        )
    traffic = report.get("traffic")
    if traffic is not None:
        pre, tun = traffic["frozen_prefix"], traffic["tuning"]
        parts = []
        if pre["bytes_per_row"] is not None:
            parts.append(
                f"frozen prefix {pre['bytes_per_row'] / 1e6:.1f} MB per row ({pre['rows']} rows)"
            )
        if tun["bytes_per_step"] is not None:
            parts.append(
                f"tuning {tun['bytes_per_step'] / 1e6:.2f} MB per step ({tun['steps']} steps)"
            )
        if parts:
            print("  on the wire (both owners and the dealer): " + ", ".join(parts))
    on = report.get("device")
    if on is not None:
        n = on["products"]
        print(
            f"  ring products on {on['device']}: {n['device']} of the {sum(n.values())} large "
            "ones (the others where torch's int64 matmul measured faster, and every small one, "
            "on the host)"
        )
    print(
        "  modelled link time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["projected_s"].items())
        + " (dealer traffic included)"
    )
    print(f"report: {args.report or report['output_dir'] + '/report.json'}")
    if report.get("state", "released") != "released":
        from secfwt.errors import SafetyGateWithheld

        print(
            "the tuned parameters were withheld by the safety gate and deleted by every party",
            file=sys.stderr,
        )
        return SafetyGateWithheld.exit_code
    return 0


def _held_out_line(report: dict) -> str:
    """The held-out metric before and after tuning, as the data owner saw it."""
    if report.get("eval_loss_before") is not None or report.get("eval_loss_after") is not None:
        b, a, d = (report[k] for k in ("eval_loss_before", "eval_loss_after", "eval_loss_drop"))
        change = "" if d is None else f" ({-d:+.4f})"
        return f"held-out response loss: {_num(b)} -> {_num(a)}{change}"
    b, a, g = (report[k] for k in ("accuracy_before", "accuracy_after", "accuracy_gain_points"))
    change = "" if g is None else f" ({g:+.1f} points)"
    return f"held-out accuracy: {_num(b)} -> {_num(a)}{change}"


def _num(x: float | None) -> str:
    return "hidden by the terms" if x is None else f"{x:.4f}"


def cmd_dp_baseline(args: argparse.Namespace) -> int:
    from secfwt.config import load_job
    from secfwt.dp.baseline import run_dp_baseline
    from secfwt.roles import Role
    from secfwt.runtime.progress import ProgressView

    cfg = load_job(args.job, overrides=args.set or ())
    print(
        f"dp-baseline: Opacus DP-SGD in plaintext on job {cfg.job.name!r} ({cfg.source}), model "
        f"{cfg.model.path}"
    )
    with ProgressView() as view:
        report = run_dp_baseline(
            cfg,
            checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
            resume=args.resume,
            stop_at_step=args.stop_at_step,
            on_progress=lambda msg: view.update(Role.DATA_OWNER, msg),
        )
    write_report(report, args.report)
    r = report
    print(
        f"epsilon {r['epsilon']:.4f} (delta {r['delta']:g}, {r['accountant']}) after "
        f"{r['steps']}/{r['planned_steps']} steps: "
        f"noise multiplier {r['noise_multiplier']:.4f}, sample rate {r['sample_rate']:.4g}, max "
        f"grad norm {r['max_grad_norm']:g}"
    )
    if r["completed"]:
        print(
            f"held-out accuracy: {r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} "
            f"({r['accuracy_gain_points']:+.1f} points) in {r['wall_s']:.0f} s"
        )
    else:
        print(
            f"stopped at step {r['steps']}; continue with --resume --checkpoint-dir "
            f"{r['checkpoint_dir']}"
        )
    if args.report:
        print(f"report: {args.report}")
    return 0


def cmd_dp_compare(args: argparse.Namespace) -> int:
    from secfwt.dp.compare import load_comparison_job, run_comparison
    from secfwt.runtime.progress import ProgressView

    cfg = load_comparison_job(args.job, quick=args.quick, overrides=args.set or ())
    try:
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    except ValueError as exc:
        raise ConfigError(
            f"--epsilons {args.epsilons!r}: expected numbers separated by commas, e.g. 1,3,8"
        ) from exc
    out = Path(args.out)
    print(
        f"dp-compare: job {cfg.job.name!r} ({cfg.source}{', --quick' if args.quick else ''}) at "
        f"epsilon {', '.join(f'{e:g}' for e in epsilons)}; writing {out}/"
    )
    with ProgressView() as view:
        report = run_comparison(
            cfg,
            epsilons=epsilons,
            out_dir=out,
            on_progress=view.update,
            skip_baseline=args.skip_baseline,
        )
    write_report(report, args.report)
    print((out / "dp-compare.md").read_text())
    print(f"report: {out}/dp-compare.json, {out}/dp-compare.md, {out}/dp-compare.png")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from secfwt.bench.plan import BenchPlan, parse_names
    from secfwt.bench.progress import BenchProgress
    from secfwt.bench.report import write_outputs
    from secfwt.bench.suite import run_suite

    names = parse_names(args.names)
    plan = (BenchPlan.quick_plan() if args.quick else BenchPlan.full()).with_overrides(args.set)
    sets = "".join(f" --set {item}" for item in args.set)
    print(
        f"bench: {', '.join(n.value for n in names)}{' (--quick)' if args.quick else ''}{sets}; "
        f"writing {args.out}/",
        flush=True,
    )
    with BenchProgress() as view:
        report = run_suite(names, plan, on_case=view.case)
    report["overrides"] = list(args.set)
    files = write_outputs(report, Path(args.out))
    write_report(report, args.report)
    for t in report["targets"]:
        status = {True: "met", False: "MISSED", None: "not run"}[t["passed"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(
            f"  {t['key']:<28} {value:>8}   target {'>=' if t['at_least'] else '<='} "
            f"{t['threshold']:g}: {status}"
        )
    print(f"done in {report['duration_s']:.0f} s; " + ", ".join(files.values()))
    failed_cases, stopped = report.get("failed_cases") or [], report.get("failed_benchmarks") or []
    if failed_cases or stopped:
        for f in failed_cases:
            print(f"secfwt: bench: case failed: {f['label']}: {f['message']}", file=sys.stderr)
        for f in stopped:
            print(f"secfwt: bench: {f['benchmark']} stopped: {f['message']}", file=sys.stderr)
        raise ProtocolError(
            f"bench: the run is incomplete; {args.out}/bench.md lists what failed under Failed"
        )
    missed = [t["key"] for t in report["targets"] if t["passed"] is False]
    if args.check and missed:
        print(f"secfwt: bench --check: targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


#: One --set syntax for every command (secfwt.overrides): PATH is the field's dotted path in the
#: contract (SECTION.KEY in a job, KEY in the flat bench plan); VALUE is TOML, bare words need no
#: quotes and a list may be given comma-separated.
_SET_RULES = "VALUE is TOML; bare words need no quotes; lists may be comma-separated"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="secfwt",
        description="Privacy-preserving multi-party forward-only fine-tuning (CrypTen MPC).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser(
        "verify-model", help="secure forward of a checkpoint vs its plaintext forward"
    )
    v.add_argument(
        "model_dir",
        help="Hugging Face checkpoint folder, packaged:all-minilm-l6-v2 or "
        "packaged:smollm2-135m-instruct",
    )
    v.add_argument("--attention", choices=["softmax", "rfa"], default="softmax")
    v.add_argument("--seq-len", type=int, default=128)
    v.add_argument(
        "--embedding",
        choices=["private", "table_to_data_owner"],
        default="private",
        help="private: one-hot ids x secret table (default)",
    )
    v.add_argument("--report", help="write the JSON report here")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--rfa-features", type=int, default=64)
    v.add_argument("--rfa-sigma", type=float, default=1.5)
    v.add_argument("--max-abs-tol", type=float, default=0.1, help="encoders: hidden states")
    v.add_argument("--mean-abs-tol", type=float, default=0.01, help="encoders: hidden states")
    v.add_argument(
        "--samples", type=int, default=3, help="decoders: chat prompts in the batch (default 3)"
    )
    v.add_argument(
        "--per-layer",
        action="store_true",
        help="decoders: also reveal and compare every layer's output (where the error comes from)",
    )
    v.add_argument("--min-argmax-agreement", type=float, default=0.99, help="decoders")
    v.add_argument(
        "--max-mean-err-over-std",
        type=float,
        default=0.01,
        help="decoders: mean abs logit error as a fraction of the logits' std",
    )
    v.add_argument(
        "--insecure-dev",
        action="store_true",
        help="use the TFP provider (model owner learns inputs); development only",
    )
    v.set_defaults(func=cmd_verify_model)

    pm = sub.add_parser(
        "prepare-models",
        help="install-time step: convert packaged GGUF models into the cache (make setup runs it)",
    )
    pm.add_argument("names", nargs="*", help="packaged model names (default: all)")
    pm.set_defaults(func=cmd_prepare_models)

    s = sub.add_parser("simulate", help="run a job with every party as a local process")
    s.add_argument("job", nargs="?", help="job TOML (default: the packaged default job)")
    s.add_argument("--report", help="also write the JSON report here")
    s.add_argument(
        "--policy",
        metavar="FILE",
        help="the model owner's safety policy ([safety_policy] of a party.toml or a policy file): "
        "a job that lacks its gate or defences is refused before any party starts",
    )
    s.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help=f"override a job setting (repeatable; {_SET_RULES}), e.g. --set zo.steps=10",
    )
    s.add_argument(
        "--insecure-dev", action="store_true", help="allow job.provider = 'tfp'; development only"
    )
    s.add_argument(
        "--insecure-fixed-seed",
        type=int,
        metavar="N",
        help=(
            "TESTS ONLY: every MPC seed derived from N (bit-for-bit reproducible, e.g. to compare "
            "with party daemons run with the same flag); every share is predictable"
        ),
    )
    s.add_argument(
        "--checkpoint-dir",
        help=(
            "each party checkpoints its own state into DIR/ROLE (shares only, never plaintext "
            "secrets)"
        ),
    )
    s.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        metavar="N",
        help="checkpoint after every N tuning steps (default 10)",
    )
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest step both parties checkpointed in --checkpoint-dir",
    )
    s.set_defaults(func=cmd_simulate)
    d = sub.add_parser(
        "dp-baseline",
        help=(
            "non-MPC baseline: Opacus DP-SGD in plaintext on the job's model, data and trainable "
            "set"
        ),
    )
    d.add_argument("job", help="job TOML (its [dp] section sets the privacy budget)")
    d.add_argument("--report", help="write the JSON report here")
    d.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help=f"override a job setting (repeatable; {_SET_RULES}), e.g. --set dp.target_epsilon=3",
    )
    d.add_argument(
        "--checkpoint-dir",
        help="write checkpoints here (every dp.checkpoint_every steps, on stop and at the end)",
    )
    d.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose checkpoint is in --checkpoint-dir",
    )
    d.add_argument(
        "--stop-at-step",
        type=int,
        metavar="N",
        help="stop after step N (checkpoint written); continue later with --resume",
    )
    d.set_defaults(func=cmd_dp_baseline)

    c = sub.add_parser(
        "dp-compare",
        help="accuracy vs epsilon: ZO and DP-ZO in MPC against the Opacus DP-SGD baseline",
    )
    c.add_argument(
        "job",
        nargs="?",
        help="job TOML (default: the packaged comparison job secfwt/jobs/dp_compare.toml)",
    )
    c.add_argument(
        "--epsilons", default="1,3,8", help="comma-separated target epsilons (default 1,3,8)"
    )
    c.add_argument(
        "--quick",
        action="store_true",
        help="fewer rows, shorter reviews, fewer steps: a few minutes",
    )
    c.add_argument(
        "--out",
        default="dp-compare",
        help="folder for dp-compare.json, .md and .png (default ./dp-compare)",
    )
    c.add_argument("--report", help="also write the JSON report here")
    c.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help=f"override a job setting, after --quick's (repeatable; {_SET_RULES}), "
        "e.g. --set zo.lr=0.2",
    )
    c.add_argument("--skip-baseline", action="store_true", help="MPC runs only (no Opacus)")
    c.set_defaults(func=cmd_dp_compare)

    b = sub.add_parser(
        "bench",
        help="MPC cost benchmarks: time, bytes, rounds, memory per party; LAN/WAN projections",
    )
    b.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=(
            "sub-benchmarks; default: forward, attention, fot-vs-backprop, fot-vs-full-ft, "
            "vanilla, transport, time-to-target; only when named: decoder (packaged SmolLM2 "
            "and the example instruction job's ZO step), safe-delta (Safe Delta on shares)"
        ),
    )
    b.add_argument(
        "--quick", action="store_true", help="shorter sequences and smaller batches: a few minutes"
    )
    b.add_argument(
        "--out",
        default="bench-results",
        help="folder for bench.json, bench.md and the plots (default ./bench-results)",
    )
    b.add_argument("--report", help="also write the JSON report here")
    b.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a performance target (listed in bench.md, e.g. "
        "vs_plaintext_ratio <= 40) is missed",
    )
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override a field of the plan by its bare name (the plan is flat: KEY, not plan.KEY), "
            f"e.g. --set fot_seq_len=512 (repeatable; {_SET_RULES}; "
            "the fields are in bench.json's plan)"
        ),
    )
    b.set_defaults(func=cmd_bench)

    from secfwt.safety.cli import register as register_safety_commands  # eval, align, ...

    register_safety_commands(sub)

    from secfwt.server.cli import register as register_server_commands  # party, job, certs

    register_server_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return int(args.func(args) or 0)
    except SecfwtError as exc:
        print(f"secfwt: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("secfwt: interrupted; all party processes were stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
