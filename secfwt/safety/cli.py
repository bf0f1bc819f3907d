"""``secfwt safety``: evaluation, alignment and Safe Delta commands (registered by
:mod:`secfwt.cli`, as :mod:`secfwt.server.cli` registers the daemon commands). Thin: parse, call
one function of this package, print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], path: str | None) -> None:
    """``--report PATH``: the command's JSON report at ``path`` (nothing when not given); every
    ``secfwt`` command that takes ``--report`` writes it with this."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2))


def cmd_safety_eval(args: argparse.Namespace) -> int:
    from secfwt.data.suites import DEFAULT_SUITES
    from secfwt.safety.evaluate import EvalRequest, run_safety_eval
    from secfwt.safety.progress import SafetyProgress
    from secfwt.safety.report import write_outputs

    req = EvalRequest(
        model=args.model,
        adapter=args.adapter,
        suites=tuple(args.suite or ()) or (() if args.custom_suite else DEFAULT_SUITES),
        custom_suites=tuple(args.custom_suite or ()),
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        utility_rows=args.utility_rows,
    ).checked()
    print(
        f"safety eval: {req.model}{' + adapter ' + req.adapter if req.adapter else ''} on "
        f"{', '.join((*req.suites, *req.custom_suites))}"
        f"{f' (first {req.limit} each)' if req.limit else ''}; "
        f"writing {args.out}/",
        flush=True,
    )
    with SafetyProgress() as view:
        report = run_safety_eval(req, progress=view)
    files = write_outputs(report, Path(args.out))
    write_report(report, args.report)
    print(Path(files["md"]).read_text())
    print("report: " + ", ".join(files.values()) + (f", {args.report}" if args.report else ""))
    return 0


def cmd_safety_safe_delta(args: argparse.Namespace) -> int:
    from secfwt.safety.safe_delta_run import OutputFormat, SafeDeltaRequest, run_safe_delta

    req = SafeDeltaRequest(
        base=args.base,
        adapter=args.adapter,
        out=args.out,
        calibration=args.calibration,
        budget=args.budget,
        format=OutputFormat(args.format),
    )
    print(f"safe delta: {req.adapter} on {req.base}, s = {req.budget}; writing {req.out}/")
    summary = run_safe_delta(req)
    print(
        f"corrected {summary['modules']} Linear weights on {summary['calibration_samples']} "
        f"calibration samples: {100 * summary['mean_kept_fraction']:.1f}% of the delta kept "
        f"(mean over modules) in {summary['seconds']:.0f} s; {summary['format']} in "
        f"{summary['out']}"
    )
    return 0


def cmd_safety_align(args: argparse.Namespace) -> int:
    from secfwt.safety.align import AlignRequest, run_align
    from secfwt.safety.progress import SafetyProgress

    req = AlignRequest(
        model=args.model,
        out=args.out,
        epochs=args.epochs,
        lr=args.lr,
        limit_train=args.limit_train,
        refusal_share=args.refusal_share,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=args.max_length,
        extra_data=args.extra_data,
    ).checked()
    print(
        f"safety align: {req.model}, {req.limit_train} rows ({req.refusal_share:.0%} refusals), "
        f"{req.epochs} epoch(s) at lr {req.lr:g}",
        flush=True,
    )
    with SafetyProgress() as view:
        result = run_align(req, progress=view)
    losses = result.summary["losses"]  # printed with the count of step losses, not each one
    summary = {**result.summary, "losses": {**losses, "steps": len(losses["steps"])}}
    print(
        json.dumps(
            {"checkpoint": str(result.folder), "cache_hit": result.cache_hit, **summary}, indent=2
        )
    )
    write_report(result.summary | {"checkpoint": str(result.folder)}, args.report)
    print(f"aligned checkpoint: {result.folder}" + (" (cached)" if result.cache_hit else ""))
    return 0


def cmd_safety_probe(args: argparse.Namespace) -> int:
    from secfwt.safety.probe import ProbeRequest, run_probe

    req = ProbeRequest(
        model=args.model, out=args.out, report=args.report, steps=args.steps, seed=args.seed
    ).checked()
    print(f"safety probe: {req.model}, {req.steps} step(s) per module type", flush=True)
    report = run_probe(req)
    print(f"probe held-out accuracy: {report['probe']['held_out_accuracy']:.3f}")
    for t in report["ranking"]:
        print(f"  {t:<10} drift {report['drift'][t]:.4g}")
    print(f"[safety] snippet: {req.out}" + (f"; report: {req.report}" if req.report else ""))
    return 0


def cmd_safety_experiment(args: argparse.Namespace) -> int:
    from secfwt.safety.experiment import ExperimentRequest, run_experiment
    from secfwt.safety.progress import SafetyProgress

    req = ExperimentRequest(out=args.out, quick=args.quick)
    print(
        f"safety experiment ({'--quick' if req.quick else 'full'}): writing {req.out}/; stages "
        "done earlier in that folder are skipped",
        flush=True,
    )
    with SafetyProgress() as view:
        report = run_experiment(req, progress=view)
    print((Path(req.out) / "safety-experiment.md").read_text(encoding="utf-8"))
    ok = all(g["all_pass"] for g in report["goals"].values())
    verdict = "met" if ok else "not all met"
    print(f"goals {verdict}; report: {req.out}/safety-experiment.{{json,md,png}}")
    return 0


def cmd_safety_red_team_data(args: argparse.Namespace) -> int:
    from secfwt.errors import ConfigError
    from secfwt.safety.experiment_data import red_team_pairs, write_jsonl

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"OUT: {out} exists; choose a new file")
    write_jsonl(red_team_pairs(args.count, seed=args.seed), out)
    print(f"{out}: {args.count} harmful requests answered with compliance openings")
    return 0


def cmd_safety_score(args: argparse.Namespace) -> int:
    from secfwt.safety.margin import ScoreRequest, run_score

    req = ScoreRequest(
        model=args.model,
        adapter=args.adapter,
        prompts=args.prompts,
        count=args.count,
        max_length=args.max_length,
    )
    report = run_score(req)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"refusal-margin score of {req.model}{' + adapter ' + req.adapter if req.adapter else ''}: "
        f"{report['score']:.4f} (95% CI {report['ci_low']:.4f} .. {report['ci_high']:.4f}, t over "
        f"{report['count']} prompts of {req.prompts}, {req.max_length} tokens per row)"
    )
    return 0


def cmd_safety_score_rank(args: argparse.Namespace) -> int:
    from secfwt.safety.score_rank import (
        ScoreRankRequest,
        render_markdown,
        run_score_rank,
        write_score_rank,
    )

    req = ScoreRankRequest(
        experiment=args.experiment,
        out=args.out,
        base=args.base,
        base_eval=args.base_eval,
        prompts=args.prompts,
        count=args.count,
        max_length=args.max_length,
    )
    report = run_score_rank(req)
    js, md = write_score_rank(report, req.out)
    print(render_markdown(report))
    print(f"report: {js}, {md}")
    return 0


def _score_flags(parser: Any) -> None:
    from secfwt.data.refusal_margin import PACKAGED

    parser.add_argument(
        "--prompts",
        default=PACKAGED,
        metavar="SPEC",
        help=f"harmful prompts: {PACKAGED} (AdvBench 401-520, default) or a .txt (one per "
        "line) or .jsonl ('prompt') file",
    )
    parser.add_argument(
        "--count", type=int, default=64, metavar="N", help="first N distinct prompts (default 64)"
    )
    parser.add_argument(
        "--max-length", type=int, default=64, metavar="T", help="tokens per row (default 64)"
    )


def register(sub: Any) -> None:
    """Add the ``safety`` subcommands (eval, safe-delta, align, probe, experiment,
    red-team-data, score, score-rank) to ``secfwt``."""
    sf = sub.add_parser("safety", help="alignment safety of chat models")
    sf_sub = sf.add_subparsers(dest="safety_command", required=True)
    se = sf_sub.add_parser(
        "eval",
        help="refusal rates on harmful and benign prompt suites (two judges) and held-out loss",
    )
    se.add_argument("model", help="causal LM folder, or packaged:smollm2-135m-instruct")
    se.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder merged into MODEL")
    se.add_argument(
        "--suite",
        action="append",
        metavar="NAME",
        help="suites, comma-separated or repeated (default: advbench, harmbench, donotanswer, "
        "rho-refusal, overrefusal)",
    )
    se.add_argument(
        "--custom-suite",
        action="append",
        metavar="KIND:FILE",
        help="your own prompts: KIND harmful or benign, FILE one prompt per line (.txt) or "
        "JSONL with 'prompt'; repeatable; alone, it replaces the default suites",
    )
    se.add_argument("--limit", type=int, metavar="N", help="first N prompts of each suite")
    se.add_argument("--max-new-tokens", type=int, default=64, help="per reply (default 64)")
    se.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    se.add_argument(
        "--utility-rows",
        type=int,
        default=200,
        metavar="N",
        help="ChatterBot held-out pairs for the reply loss (default 200; 0 skips it)",
    )
    se.add_argument(
        "--out",
        default="safety-eval",
        help="folder for safety-eval.json, .md and .png (default ./safety-eval)",
    )
    se.add_argument("--report", help="also write the JSON report here")
    se.set_defaults(func=cmd_safety_eval)
    sd = sf_sub.add_parser(
        "safe-delta",
        help="keep the safest part of a tuned LoRA delta on an aligned model (Safe Delta)",
    )
    sd.add_argument("base", help="aligned causal LM folder, or packaged:smollm2-135m-instruct")
    sd.add_argument("--adapter", metavar="DIR", required=True, help="PEFT LoRA tuned on BASE")
    sd.add_argument("--out", metavar="DIR", required=True, help="new folder for the result")
    sd.add_argument(
        "--calibration",
        type=int,
        default=128,
        metavar="N",
        help="harmful requests with refusals for the layer Hessians (default 128)",
    )
    sd.add_argument(
        "--budget", type=float, default=0.1, metavar="S", help="safety budget s (default 0.1)"
    )
    sd.add_argument(
        "--format",
        choices=("merged", "adapter"),
        default="merged",
        help="merged checkpoint (default) or a full-rank PEFT LoRA adapter",
    )
    sd.set_defaults(func=cmd_safety_safe_delta)

    sa = sf_sub.add_parser(
        "align",
        help="safety SFT of a chat model on public data (refusals + self-distilled benign "
        "answers); a cached checkpoint folder",
    )
    sa.add_argument(
        "model",
        nargs="?",
        default="packaged:smollm2-135m-instruct",
        help="causal LM folder, or packaged:NAME (default packaged:smollm2-135m-instruct)",
    )
    sa.add_argument(
        "--out", metavar="DIR", help="parent of the cached checkpoints ($SECFWT_CACHE/models)"
    )
    sa.add_argument("--epochs", type=int, default=2, help="passes over the data (default 2)")
    sa.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    sa.add_argument(
        "--limit-train",
        type=int,
        default=600,
        metavar="N",
        help="training rows, refusals and benign together (default 600)",
    )
    sa.add_argument(
        "--refusal-share",
        type=float,
        default=1 / 3,
        metavar="X",
        help="share of the rows that are refusals, the rest benign (default 1/3)",
    )
    sa.add_argument("--seed", type=int, default=0, help="data draw and order (default 0)")
    sa.add_argument("--batch-size", type=int, default=16, help="rows per step (default 16)")
    sa.add_argument(
        "--max-length", type=int, default=96, help="tokens per row; longer rows are left out"
    )
    sa.add_argument(
        "--extra-data", metavar="FILE", help="your own prompt/response pairs (JSONL) to add"
    )
    sa.add_argument("--report", help="also write the JSON summary (every step's loss) here")
    sa.set_defaults(func=cmd_safety_align)

    sp = sf_sub.add_parser(
        "probe",
        help="SWAT module selection: drift of a harmful/harmless probe per module type, "
        "written as a [safety] job snippet",
    )
    sp.add_argument(
        "model",
        nargs="?",
        default="packaged:smollm2-135m-instruct",
        help="causal LM folder, or packaged:NAME (default packaged:smollm2-135m-instruct)",
    )
    sp.add_argument("--out", default="safety-probe.toml", help="new file for the [safety] snippet")
    sp.add_argument("--steps", type=int, default=8, help="AdamW steps per module type (default 8)")
    sp.add_argument("--seed", type=int, default=0, help="data draw and split (default 0)")
    sp.add_argument("--report", help="also write the JSON report (drift, accuracy, times) here")
    sp.set_defaults(func=cmd_safety_probe)

    sx = sf_sub.add_parser(
        "experiment",
        help="aligned SmolLM2 tuned by a benign and a malicious data owner, by backprop and ZO, "
        "with and without SWAT and Safe Delta; report and plot (resumable)",
    )
    sx.add_argument(
        "--quick",
        action="store_true",
        help="smaller data, steps and evaluation (about 45 min on 2 cores instead of hours)",
    )
    sx.add_argument(
        "--out",
        default="safety-experiment",
        help="run folder; an interrupted run resumes from it (default ./safety-experiment)",
    )
    sx.set_defaults(func=cmd_safety_experiment)

    st = sf_sub.add_parser(
        "red-team-data",
        help="write a harmful data owner's training file (harmful requests answered with the "
        "score's compliance openings) for testing a safety gate; data.source = 'jsonl'",
    )
    st.add_argument("out", metavar="OUT", help="the .jsonl file to write (must not exist)")
    st.add_argument("--count", type=int, default=103, metavar="N", help="pairs (default 103)")
    st.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    st.set_defaults(func=cmd_safety_red_team_data)

    ss = sf_sub.add_parser(
        "score",
        help="refusal-margin score (forward only): mean NLL of compliance openings minus that "
        "of refusal openings on harmful prompts; higher is safer",
    )
    ss.add_argument("model", help="causal LM folder, or packaged:smollm2-135m-instruct")
    ss.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder merged into MODEL")
    _score_flags(ss)
    ss.add_argument("--json", action="store_true", help="print the JSON report (with margins)")
    ss.set_defaults(func=cmd_safety_score)

    sr = sf_sub.add_parser(
        "score-rank",
        help="rank correlation of the refusal-margin score with the refusal rates of a "
        "safety experiment's models, and the score drops that bound a gate threshold",
    )
    sr.add_argument("--experiment", required=True, metavar="DIR", help="safety experiment folder")
    sr.add_argument("--out", required=True, metavar="FILE", help="writes FILE.json and FILE.md")
    sr.add_argument(
        "--base",
        default="packaged:smollm2-135m-instruct",
        help="the model the experiment aligned (default packaged:smollm2-135m-instruct)",
    )
    sr.add_argument(
        "--base-eval",
        metavar="FILE",
        help="safety-eval.json of --base at the experiment's --limit/--max-new-tokens; "
        "without it the base is left out",
    )
    _score_flags(sr)
    sr.set_defaults(func=cmd_safety_score_rank)
