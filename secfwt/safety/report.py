"""The safety evaluation's report as JSON (everything, replies included), Markdown (the table a
person reads) and PNG (refusal rates with their intervals, per suite and judge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STEM = "safety-eval"


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write ``safety-eval.{json,md,png}`` into ``out_dir``; returns their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{STEM}.{kind}" for kind in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["md"].write_text(markdown(report))
    write_plot(report, paths["png"])
    return {k: str(v) for k, v in paths.items()}


def _pct(rate: dict[str, Any]) -> str:
    if rate["rate"] is None:
        return "-"
    return f"{100 * rate['rate']:.1f}% [{100 * rate['ci_low']:.1f}, {100 * rate['ci_high']:.1f}]"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    clf = report["judges"]["classifier"]
    t = report["timing"]
    lines = [
        f"# Safety evaluation: {report['model']}"
        + (f" + adapter {report['adapter']['path']}" if report["adapter"] else ""),
        "",
        f"Greedy, up to {report['settings']['max_new_tokens']} new tokens, first assistant turn "
        f"only; {report['device']}; limit {report['settings']['limit'] or 'none'} per suite. "
        "Rates with 95% Wilson intervals. Harmful suites: refusal rate (higher is safer); "
        "benign suites: over-refusal rate (lower is better).",
        "",
        "| suite | kind | n | keyword judge | classifier judge | kappa |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in report["suites"]:
        lines.append(
            f"| {s['name']} | {s['kind']} | {s['n']} | {_pct(s['keyword'])} | "
            f"{_pct(s['classifier'])} | {_num(s['kappa'], '.2f')} |"
        )
    acc, kw_acc = clf["held_out_accuracy"], clf["keyword_held_out_accuracy"]
    parts = "; ".join(
        f"{name}: {_pct(acc[key])} (keyword judge {_pct(kw_acc[key])})"
        for key, name in (
            ("refusal_scorer", "human refusal labels"),
            ("objective_achieved", "harmful compliances"),
        )
    )
    lines += [
        "",
        f"Keyword judge: {report['judges']['keyword']['source']}.",
        "",
        f"Classifier judge: {clf['model']} on {clf['features']}; trained on {clf['n_train']} "
        f"replies ({clf['data']}). Held-out accuracy on {clf['n_held_out']} replies to unseen "
        f"prompts {_pct(acc['all'])}, keyword judge {_pct(kw_acc['all'])}; {parts}. Kappa "
        f"between the judges there {_num(clf['held_out_kappa_vs_keyword'], '.2f')}, on this "
        f"run's {report['judges']['replies_judged']} replies "
        f"{_num(report['judges']['kappa_on_replies'], '.2f')}.",
        "",
    ]
    u = report["utility"]
    if u:
        lines += [
            f"Utility: held-out reply loss {u['loss']:.4f} on {u['rows']} {u['dataset']} pairs "
            f"({u['reply_tokens']} reply tokens; {u['split']}).",
            "",
        ]
    lines += [
        f"Wall time {t['wall_s']:.0f} s (load {t['load_s']:.0f} s, generation "
        f"{t['generation_s']:.0f} s, {t['new_tokens']} new tokens, "
        f"{_num(t['new_tokens_per_s'], '.1f')} tokens/s).",
        "",
    ]
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = report["suites"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(suites) + 1.6))
    height = 0.38
    for j, (judge, colour) in enumerate((("keyword", "tab:blue"), ("classifier", "tab:orange"))):
        ys = [i + (j - 0.5) * height for i in range(len(suites))]
        rates = [100 * (s[judge]["rate"] or 0.0) for s in suites]
        err = [
            [100 * ((s[judge]["rate"] or 0.0) - (s[judge]["ci_low"] or 0.0)) for s in suites],
            [100 * ((s[judge]["ci_high"] or 0.0) - (s[judge]["rate"] or 0.0)) for s in suites],
        ]
        ax.barh(ys, rates, height=height, xerr=err, color=colour, label=f"{judge} judge")
    ax.set_yticks(range(len(suites)))
    ax.set_yticklabels([f"{s['name']} ({s['kind']}, n={s['n']})" for s in suites])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("refusal rate, % (95% Wilson interval)")
    ax.set_title(f"Refusals of {report['model']}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
