"""The suite's outputs: ``bench.json``, ``bench.md`` (tables, targets) and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secfwt.bench.metrics import LINKS

_MB = 1e6


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write bench.json, bench.md and the plots into ``out_dir``; return the file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "bench.json", "md": out_dir / "bench.md"}
    plots = write_plots(report, out_dir)
    report = {**report, "files": {**{k: str(v) for k, v in files.items()}, **plots}}
    files["json"].write_text(json.dumps(report, indent=2, default=_jsonable))
    files["md"].write_text(markdown(report, plots=plots))
    return {**{k: str(v) for k, v in files.items()}, **plots}


def _jsonable(x: Any) -> Any:
    if hasattr(x, "value"):
        return x.value
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _case_row(c: dict[str, Any]) -> str:
    if "failed" in c:  # its parties failed: nothing was measured
        return f"| {c['label']} | **failed**: {c['failed']} |" + " - |" * 9
    rss = max((p.get("peak_rss_mb") or 0) for p in c["parties"].values())
    proj = c["projected_s"]
    err = c.get("max_abs_err")
    dealer = c["parties"].get("dealer") or {}
    return (
        f"| {c['label']} | {_f(c['time_s'])} | {_f(c['bytes_sent_total'] / _MB)} "
        f"| {c['rounds']} | {_f(c['dealer_bytes'] / _MB)} | {dealer.get('requests', '-')} "
        f"| {rss:.0f} | {_f(_cores_busy(c))} | {_f(proj['LAN'])} | {_f(proj['WAN'])} "
        f"| {'-' if err is None else f'{err:.2g}'} |"
    )


def _cores_busy(c: dict[str, Any]) -> float | None:
    """How many cores the machine kept busy on average over the case's measured section."""
    busy = c.get("machine_busy_s")
    return None if busy is None or c["time_s"] <= 0 else busy / c["time_s"]


_CASE_HEADER = (
    "| case | time (s) | MB sent (both parties) | rounds | MB from dealer | dealer requests "
    "| peak RSS (MB) | cores busy | LAN (s) | WAN (s) | max abs err |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)

#: What the case tables' "cores busy" and "max abs err" columns are.
_CASE_TABLE_NOTE = (
    "Case tables' cores busy: CPU seconds the whole machine was busy in the measured section "
    "(the three party processes, and any other work the load line above reports) over the "
    "section's time. At the machine's core count the parties were bound by computation, not by "
    "waiting on each other or on the network: there, only less work or more cores make them "
    "faster. Max abs err: against float64; for an output, the largest over every repetition "
    "(each has its own truncations); for a tuning step's loss, as its section says."
)


def markdown(report: dict[str, Any], *, plots: dict[str, str] | None = None) -> str:
    m = report["machine"]
    b = completed(report["benchmarks"])
    lines = [
        f"# secfwt benchmarks{' (--quick)' if report['quick'] else ''}",
        "",
        f"Command: `secfwt bench {' '.join(report['selected'])}"
        f"{' --quick' if report['quick'] else ''}"
        f"{''.join(' --set ' + o for o in report.get('overrides') or ())}`, "
        f"{report['started']}, {report['duration_s'] / 60:.1f} min, "
        f"commit {report.get('commit') or '?'}{_code_note(report)}.",
        f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
        f"torch {m.get('torch')}, "
        f"Python {m.get('python')}; {_load_note(m, report['duration_s'])}",
        "Parties: model owner, data owner and a dealer (TTP provider), each its own process "
        "with one torch thread; gloo on loopback.",
        "",
        "## Headline ratios",
        "",
        "| ratio | value | target | met |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "not run"}[t["passed"]]
        op = ">=" if t["at_least"] else "<="
        lines.append(
            f"| `{t['key']}` | {_f(t['value'])} | {op} {t['threshold']:g} ({t['text']}) | {met} |"
        )
    lines += [
        "",
        "Ratios: `fot_vs_full_ft_*` = MPC full fine-tuning iteration / forward-only (ZO) "
        "iteration; `fot_vs_backprop_*` = backprop / forward-only step, same trainable set; "
        "`vs_vanilla_crypten_ratio` = vanilla / secfwt time; "
        "`vs_plaintext_ratio` = secfwt secure / plaintext torch time; "
        "exponents = least-squares slope of log cost vs log T.",
        "",
        _CASE_TABLE_NOTE,
        "",
    ]
    lines += _section_failures(report)
    lines += _section_forward(b.get("forward"))
    lines += _section_vanilla(b.get("vanilla"))
    lines += _section_attention(b.get("attention"))
    lines += _section_fot(b.get("fot-vs-backprop"))
    lines += _section_full_ft(b.get("fot-vs-full-ft"))
    lines += _section_time_to_target(b.get("time-to-target"))
    lines += _section_transport(b.get("transport"))
    lines += _section_decoder(b.get("decoder"))
    lines += _section_safe_delta(b.get("safe-delta"))
    lines += _section_breakdown(b)
    lines += _section_ring_matmul(report.get("ring_matmul"))
    lines += [
        "## How times are projected",
        "",
        "Modelled, not measured under an emulated link: "
        f"`{report['projection']}`, per measured section, for "
        + ", ".join(link.describe() for link in LINKS)
        + ". wall = the party's measured time on this machine (loopback transfers included); "
        "sent = payload bytes to the other "
        "computing party (the busier direction of a full-duplex link); "
        "dealer = bytes received from the dealer; every CrypTen "
        "communication call is one round, charged a full RTT.",
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()] + [""]
    return "\n".join(lines)


def completed(benchmarks: dict[str, Any]) -> dict[str, Any]:
    """The sub-benchmarks that ran to the end (a failed one has only its ``failure``)."""
    return {k: v for k, v in benchmarks.items() if "failure" not in v}


def _section_failures(report: dict[str, Any]) -> list[str]:
    """What failed: each sub-benchmark that stopped at a failed case (with the cases it had
    completed), and each case that failed inside a sub-benchmark that went on."""
    stopped = report.get("failed_benchmarks") or []
    cases = report.get("failed_cases") or []
    if not stopped and not cases:
        return []
    out = [
        "## Failed",
        "",
        "**This run is incomplete**: the parties of the cases below failed (a party killed, e.g. "
        "for memory, exits with code -9; a timeout names the parties still running). Nothing "
        "they would have measured is in this report.",
        "",
        "| case | error |",
        "|---|---|",
        *(f"| {f['label']} | {f['error']}: {f['message']} |" for f in cases),
        "",
    ]
    for f in stopped:
        name = f["benchmark"]
        done = report["benchmarks"][name].get("completed_cases") or []
        out += [
            f"`{name}` stopped at case {f['case']!r}: {f['error']}: {f['message']}. It has no "
            "results of its own; the cases it had completed, with their costs only (a "
            "sub-benchmark checks its cases' outputs as it builds its results, "
            "which this one did not reach):",
            "",
        ]
        out += [_CASE_HEADER, *map(_case_row, done), ""] if done else ["(none)", ""]
    return out


def _code_note(report: dict[str, Any]) -> str:
    code = report.get("code") or {}
    note = " with uncommitted changes" if code.get("uncommitted_changes") else ""
    note += f" (code sha256 {code['sha256'][:12]})" if code.get("sha256") else ""
    if code.get("changed_during_run"):
        note += "; **the code changed during the run: later cases measured different code**"
    return note


#: Share of one core that other processes may take during a run before its times are flagged
#: (an idle machine's daemons and kernel threads take about 1%).
BUSY_SHARE = 0.05


def _load(la: Sequence[float] | None) -> str:
    return "?" if not la else ", ".join(f"{x:.1f}" for x in la)


def _load_note(m: dict[str, Any], duration_s: float) -> str:
    """What other work did to the run: the CPU time other processes took during it (busy CPU time
    of the machine minus the bench's and its parties'), with the load averages for context."""
    text = (
        f"load average before the run {_load(m.get('load_average_at_start'))}, "
        f"at the end {_load(m.get('load_average_at_end'))} (the bench's own parties add about 2)"
    )
    other = m.get("other_cpu_s")
    if other is None:
        return text + "; CPU time of other work not measured on this platform."
    share = other / max(duration_s, 1e-9)
    text += f"; other processes used {other:.1f} CPU-s during the run ({share:.0%} of one core)"
    if share > BUSY_SHARE:
        return text + ": **other work shared the cores, times are upper bounds**."
    return text + ": the machine was otherwise idle."


def _section_forward(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    p = r["plaintext_layer"]
    intro = (
        f"Plaintext {p['shape']} layer, T={p['seq_len']}: "
        f"{p['best_s'] * 1e3:.1f} ms best of {p['reps']} ({p['what']}). "
        f"secfwt secure softmax layer / plaintext = **{_f(r['vs_plaintext_ratio'])}x** "
        f"(RFA: {_f(r.get('vs_plaintext_ratio_rfa'))}x)."
    )
    after: list[str] = []
    soft = r["cases"][0]
    first = soft.get("first_rep")
    if first:
        shown = (
            "the table shows the fastest of "
            f"{soft['reps']} forwards, whose time includes the work the data owner and the dealer "
            "do ahead for the next forward"
            if soft.get("reps", 1) > 1
            else "the table shows that one forward (a single repetition)"
        )
        after += [
            "secfwt's frozen weights stay with the model owner (`secfwt.mpc.owned`): "
            "each weight's mask is sent once per "
            f"session, in the first forward ({_f(first['time_s'])} s, "
            f"{_f(first['bytes_sent_total'] / 1e6)} MB for the softmax layer); {shown}.",
            "",
        ]
    after += _cpu_split(soft)
    minilm = r["cases"][-1]
    if "plaintext" in minilm:
        after += [
            "MiniLM plaintext (transformers, float32): "
            f"{minilm['plaintext']['best_s'] * 1e3:.1f} ms; "
            f"secure / plaintext = {_f(minilm['vs_plaintext_ratio'])}x. "
            "Input: word embeddings shared by the data owner "
            "(SecFwT's table-to-data-owner setting); "
            "measured: embeddings LayerNorm + 6 layers.",
            "",
        ]
    return _cases_section("## Secure forward vs plaintext (`forward`)", [intro], r["cases"], after)


def _cpu_split(c: dict[str, Any]) -> list[str]:
    """Where the CPU of a case's measured section went: each computing party's own, and the
    rest of the machine's (the dealer, plus any other work)."""
    parties = c.get("parties") or {}
    own = [parties.get(r, {}).get("cpu_s") for r in ("model_owner", "data_owner")]
    busy = c.get("machine_busy_s")
    if busy is None or None in own:
        return []
    mo, do = own
    return [
        f"CPU in the measured section of {c['label']} ({_f(c['time_s'])} s): model owner "
        f"{_f(mo)} s, data owner "
        f"{_f(do)} s, the rest of the machine (the dealer, and any other work) "
        f"{_f(max(busy - mo - do, 0.0))} s; {_f(busy)} CPU-s in all.",
        "",
    ]


def _cases_section(
    title: str, intro: Sequence[str], cases: Sequence[dict[str, Any]], after: Sequence[str] = ()
) -> list[str]:
    """A section: heading, introduction, the table of its cases, then any closing lines."""
    return [title, "", *intro, "", _CASE_HEADER, *[_case_row(c) for c in cases], "", *after]


def _section_vanilla(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    intro = (
        f"vanilla / secfwt time = **{_f(r['vs_vanilla_crypten_ratio'])}x**, "
        f"bytes = {_f(r['vs_vanilla_bytes_ratio'])}x (T={r['seq_len']}). {r['definition']}"
    )
    return _cases_section("## secfwt vs vanilla CrypTen 0.4.1 (`vanilla`)", [intro], r["cases"])


def _section_attention(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    out = [
        "## Attention: softmax vs Random Feature Attention (`attention`)",
        "",
        f"Attention core only (q, k, v private, shape (1, {r['heads']}, T, {r['head_dim']}); "
        "QK^T, softmax or RFA, x V).",
        "",
        "| T | softmax time (s) | softmax MB | softmax rounds "
        "| RFA time (s) | RFA MB | RFA rounds | RFA max abs err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(row["attention"], row["seq_len"]): row for row in r["rows"]}
    for t in r["seq_lens"]:
        s, f = by.get(("softmax", t)), by.get(("rfa", t))
        if s is None or f is None:
            continue
        out.append(
            f"| {t} | {_f(s['time_s'])} | {_f(s['bytes_sent_total'] / _MB)} | {s['rounds']} "
            f"| {_f(f['time_s'])} | {_f(f['bytes_sent_total'] / _MB)} | {f['rounds']} "
            f"| {_f(f['max_abs_err'], 2)} |"
        )
    ex = r["exponents"]
    out += [
        "",
        "Growth exponents (slope of log cost vs log T): "
        + "; ".join(f"{k}: time {v['time']:.2f}, bytes {v['bytes']:.2f}" for k, v in ex.items()),
        "",
    ]
    return out


def _wrong_lines(r: dict[str, Any]) -> list[str]:
    """A bold line for each case whose loss was off by more than the tolerance, and a line for
    each case with a repetition that was (another repetition, right, counted)."""
    out: list[str] = []
    for label in r.get("wrong_results") or ():
        out += [
            f"**{label} computed a wrong loss: its time and bytes measure a broken computation, "
            "and ratios against it mean little.**",
            "",
        ]
    wrong = set(r.get("wrong_results") or ())
    for c in r["cases"]:
        if c.get("wrong_reps") and c["label"] not in wrong:
            losses = ", ".join(_f(v, 4) for v in c["loss_each_rep"])
            refs = c.get("loss_reference_each_rep")  # CMA-ES: each iteration its own candidates
            ref = _f(c["loss_reference"], 4) if not refs else ", ".join(_f(v, 4) for v in refs)
            out += [
                f"{c['label']}: {c['wrong_reps']} of {c['reps']} repetitions computed a wrong "
                f"loss (losses {losses}; float64 {ref}); repetition "
                f"{c['rep'] + 1}, right, counts.",
                "",
            ]
    return out


def _step_section(
    title: str, intro: Sequence[str], r: dict[str, Any], loss_note: Sequence[str]
) -> list[str]:
    """A tuning-step section: its cases, the note on losses, the wrong ones called out, and the
    setup docstring on one line."""
    setup = "Setup: " + " ".join(
        line.strip() for line in (r["setup"] or "").splitlines() if line.strip()
    )
    return _cases_section(title, intro, r["cases"], [*loss_note, *_wrong_lines(r), setup, ""])


def _section_fot(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    intro = [
        f"{r['shape']}; trainable: `{'`, `'.join(r['trainable_patterns'])}` "
        f"({r['cases'][0]['trainable_numel']:,} values) on both sides; "
        f"batch {r['batch']}, T={r['seq_len']}, {r['directions']} SPSA direction(s).",
        "backprop / forward-only (RFA): "
        f"time **{_f(r['fot_vs_backprop_time_ratio'])}x**, "
        f"bytes **{_f(r['fot_vs_backprop_bytes_ratio'])}x**; "
        "backprop / forward-only (softmax): "
        f"time {_f(r['fot_softmax_vs_backprop_time_ratio'])}x, "
        f"bytes {_f(r['fot_softmax_vs_backprop_bytes_ratio'])}x; "
        "vanilla-CrypTen backprop / forward-only (RFA): "
        f"time {_f(r.get('fot_vs_vanilla_backprop_time_ratio'))}x, "
        f"bytes {_f(r.get('fot_vs_vanilla_backprop_bytes_ratio'))}x.",
    ]
    after: list[str] = []
    refs = r.get("loss_references")
    if refs:
        after += [
            "max abs err: |loss of the secure step - "
            "float64 plaintext loss at the starting parameters| "
            f"(plaintext: softmax {_f(refs.get('softmax'), 4)}, RFA {_f(refs.get('rfa'), 4)}); "
            f"tolerance {_f(r.get('loss_tolerance'))}.",
            "",
        ]
    return _step_section(
        "## Forward-only step vs MPC backpropagation step (`fot-vs-backprop`)", intro, r, after
    )


def _section_full_ft(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    intro = [
        f"Batch {r['batch']}, {r['directions']} SPSA direction(s), CMA-ES population "
        f"{r['population']} x {r['prompt_length']}-token prompts. Headline row: "
        f"{r['headline_row']}. Ratios = full fine-tuning / forward-only (time, bytes sent by "
        "both parties); none where the baseline's loss is wrong.",
        "",
        "ZO: LoRA on the top layers with the model owner's weights, on query and value (QV) "
        "or on the feed-forward layers (FFN: the first trained layer's attention half is in the "
        "cached prefix); the headline is the faster placement. ZO, top layers secret: every "
        "weight of the top layers secret-shared.",
        "",
        "| model | T | ZO attention | headline placement | full FT / ZO time "
        "| full FT / ZO bytes | QV: time | bytes | FFN: time | bytes "
        "| full FT / ZO, top layers secret: time | bytes "
        "| full FT / CMA-ES time | full FT / CMA-ES bytes | baseline loss right |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["pairings"]:
        intro.append(
            f"| {row['model']} ({row.get('pooling', 'cls')} pooling) | {row['seq_len']} "
            f"| {row['zo_attention']} "
            f"| {row.get('zo_lora_placement', 'query and value')} "
            f"| {_f(row['fot_vs_full_ft_time_ratio'])} | {_f(row['fot_vs_full_ft_bytes_ratio'])} "
            f"| {_f(row.get('fot_lora_qv_vs_full_ft_time_ratio'))} "
            f"| {_f(row.get('fot_lora_qv_vs_full_ft_bytes_ratio'))} "
            f"| {_f(row.get('fot_lora_ffn_vs_full_ft_time_ratio'))} "
            f"| {_f(row.get('fot_lora_ffn_vs_full_ft_bytes_ratio'))} "
            f"| {_f(row['fot_layer_vs_full_ft_time_ratio'])} "
            f"| {_f(row['fot_layer_vs_full_ft_bytes_ratio'])} "
            f"| {_f(row['fot_cma_vs_full_ft_time_ratio'])} "
            f"| {_f(row['fot_cma_vs_full_ft_bytes_ratio'])} "
            f"| {_baseline_state(row)} |"
        )
    after = [
        "max abs err: |loss of the iteration - float64 plaintext loss| (CMA-ES: largest over the "
        f"candidates); tolerance {_f(r['loss_tolerance'])}.",
        "",
    ]
    return _step_section(
        "## Forward-only tuning vs MPC full fine-tuning (`fot-vs-full-ft`)", intro, r, after
    )


def _baseline_state(row: dict[str, Any]) -> str:
    if row.get("baseline_failed"):
        return "**failed**"
    return "yes" if row["baseline_correct"] else "**no**"


def _section_time_to_target(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    names = {
        "zo": "secfwt default job (ZO, head)",
        "backprop_top": "MPC backprop, top layer + head",
        "backprop_full": "MPC backprop, full model",
    }
    zo_runs = r["twins"]["zo"]["runs"]
    intro = [
        f"Target: held-out accuracy +{r['target_gain'] * 100:g} points, held for "
        f"{r['confirm_steps']} more steps; steps from the plaintext twins (ZO at seeds "
        f"{', '.join(str(z['seed']) for z in zo_runs)}: "
        f"{', '.join(str(z['steps']) for z in zo_runs)} steps, the median counting); costs in "
        "MPC. Ratios = backprop / secfwt: full model "
        f"time **{_f(r['time_to_target_ratio'])}x**, bytes **{_f(r['bytes_to_target_ratio'])}x**, "
        f"LAN {_f(r['lan_time_to_target_ratio'])}x, WAN {_f(r['wan_time_to_target_ratio'])}x; "
        f"top layer + head time {_f(r['top_layer_time_to_target_ratio'])}x, "
        f"bytes {_f(r['top_layer_bytes_to_target_ratio'])}x.",
        "",
        "| method | steps | per step (s / MB) | one-time (s / MB) | total (s) | total (MB) "
        "| LAN (s) | WAN (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, m in r["methods"].items():
        per, once, tot = m["per_step"], m["one_time"], m["total"] or {}
        intro.append(
            f"| {names.get(key, key)} | {m['steps'] if m['steps'] is not None else 'not reached'} "
            f"| {_f(per['time_s'])} / {_f(per['bytes_sent_total'] / _MB)} "
            f"| {_f(once['time_s'])} / {_f(once['bytes_sent_total'] / _MB)} "
            f"| {_f(tot.get('time_s'))} "
            f"| {_f(None if not tot else tot['bytes_sent_total'] / _MB)} "
            f"| {_f(tot.get('LAN_s'))} | {_f(tot.get('WAN_s'))} |"
        )
    intro.append("")
    after = [
        "max abs err: |secure loss (prefix: revealed value) - float64 plaintext|; tolerance "
        f"{_f(r['loss_tolerance'])}.",
        "",
    ]
    return _step_section("## Time and bytes to accuracy (`time-to-target`)", intro, r, after)


def _section_transport(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    intro = (
        f"TLS / gloo time = {_f(r['tls_vs_gloo_time_ratio'])}x for the same secure layer "
        "(bytes are payload bytes, the same on both)."
    )
    return _cases_section("## Transport: gloo vs TLS (`transport`)", [intro], r["cases"])


def _section_decoder(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    rows = [*r["cases"], r["zo_step"]]
    intro = [
        f"{r['model']}. Secure forward: all layers, final norm and LM head to the logits of one "
        "chat-template row (weights with the model owner, key mask secret); ZO step: "
        f"{r['zo_step']['label']}, {r['zo_step']['loss_rows']} response rows of logits; its "
        "max abs err is its mean loss's against float64, the largest over its repetitions.",
    ]
    after = [
        "| case | party | time (s) | MB sent | rounds (dealer: requests answered) |",
        "|---|---|---|---|---|",
    ]
    for c in rows:
        for party, p in c["parties"].items():
            rounds = p["rounds"] if "rounds" in p else p.get("requests")
            after.append(
                f"| {c['label']} | {party} | {_f(p.get('wall_s'))} "
                f"| {_f(p['bytes_sent'] / _MB)} | {rounds} |"
            )
    after.append("")
    for c in r["cases"]:
        first = c.get("first_rep") or {}
        after.append(
            f"T={c['seq_len']}: plaintext (transformers float32) "
            f"{c['plaintext']['best_s'] * 1e3:.1f} ms; secure / plaintext = "
            f"{_f(c['vs_plaintext_ratio'])}x; first forward of the session (sends the weights' "
            f"masks) {_f(first.get('time_s'))} s, {_f((first.get('bytes_sent_total') or 0) / _MB)}"
            " MB."
        )
    after.append("")
    return _cases_section("## SmolLM2 in MPC (`decoder`)", intro, rows, after)


def _section_safe_delta(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    intro = (
        f"One Linear's Safe Delta on secret shares (the model owner's U in the clear): "
        f"{r['kept_secure']} of {r['entries']} entries kept at s = {r['budget']} (float64: "
        f"{r['kept']}; {r['kept_differs']} decided differently, nearest cumulative cost "
        f"{r['boundary_margin']:.1e} budgets from the budget); max abs err = corrected delta "
        "against float64."
    )
    return _cases_section("## Safe Delta on shares (`safe-delta`)", [intro], [r["case"]])


def _section_ring_matmul(r: dict[str, Any] | None) -> list[str]:
    """The machine's int64 matmul timings and the parties' choices (secfwt.bench.gemm)."""
    if not r:
        return []
    m = r["machine"]
    out = [
        "## Int64 matmul on this machine: torch vs float64 limbs",
        "",
        f"The {m['shape']} layer's products at T={m['seq_len']}, one torch thread, best of "
        f"{m['reps']}, in the bench process before the cases ({m['machine_key']}). "
        "limbs: secfwt's exact float64 GEMMs on 22-bit limbs (`secfwt.mpc.ring`); prepared: the "
        "right operand split once (a fixed weight mask); narrow: the model owner's own weights "
        "against torch on the same narrow operand; float64: one float64 GEMM of that shape.",
        "",
        "| product | shapes | torch int64 (ms) | limbs (ms) | limbs, prepared (ms) "
        "| narrow: torch / limbs (ms) | float64 GEMM (ms) | faster | bit-identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if m.get("device"):
        out[2] += (
            f" device: the limbs on {m['device']} (run.device) as a party runs them, operands "
            "copied there and the result back; prepared and narrow operands kept there."
        )
        out[4] += " device (ms) | device, prepared (ms) | device, narrow (ms) |"
        out[5] += "---|---|---|"
    for p in m["products"]:
        narrow = (
            f"{_f(p['narrow_torch_ms'])} / {_f(p['limbs_narrow_ms'])}"
            if "limbs_narrow_ms" in p
            else "-"
        )
        shapes = f"{'x'.join(map(str, p['a']))} @ {'x'.join(map(str, p['b']))}"
        out.append(
            f"| {p['product']} | {shapes} | {_f(p['torch_ms'])} | {_f(p['limbs_ms'])} "
            f"| {_f(p.get('limbs_prepared_ms'))} | {narrow} | {_f(p['float64_ms'])} "
            f"| {p['faster']} | {'yes' if p['bit_identical'] else '**no**'} |"
            + (
                f" {_f(p['device_ms'])} | {_f(p.get('device_prepared_ms'))} "
                f"| {_f(p.get('device_narrow_ms'))} |"
                if m.get("device")
                else ""
            )
        )
    out += [
        "",
        "What the party processes chose (`secfwt.mpc.ring_tuning`: each process times both ways "
        "at the first product of a shape class, batch/M/K/N rounded up to powers of two, and "
        "keeps the limbs, or with `--set device` the limbs on the device, only when they beat "
        "torch by 10%), over every case of this run:",
        "",
        "| kind | class (batch, M, K, N <=) | first product | processes: torch / limbs / device "
        "| products: torch / limbs / device | median ms: torch / limbs / device |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["choices"]:
        k = c["class"]
        p, n = c["processes"], c["calls"]
        out.append(
            f"| {c['kind']} | {k['batch']}, {k['m']}, {k['k']}, {k['n']} | {c['example']} "
            f"| {p['torch']} / {p['limbs']} / {p['device']} "
            f"| {n['torch']} / {n['limbs']} / {n['device']} "
            f"| {_f(c['torch_ms_median'])} / {_f(c['limbs_ms_median'])} "
            f"/ {_f(c.get('device_ms_median'))} |"
        )
    return out + [""]


def breakdown_cases(benchmarks: dict[str, Any]) -> list[dict[str, Any]]:
    """The single-layer cases (secfwt and vanilla, one shape) that carry a per-op-class
    breakdown."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for name in ("forward", "vanilla"):
        for c in (benchmarks.get(name) or {}).get("cases", []):
            if c.get("kind") != "layer" or "breakdown" not in c or c["label"] in seen:
                continue
            if out and c["shape"] != out[0]["shape"]:
                continue
            seen.add(c["label"])
            out.append(c)
    return out


def _section_breakdown(b: dict[str, Any]) -> list[str]:
    cases = breakdown_cases(b)
    if not cases:
        return []
    classes = sorted({k for c in cases for k in c["breakdown"]})
    out = [
        "## Cost by layer part (model owner's view)",
        "",
        "Time (s) / MB sent by the model owner / rounds per op class, timed around each op "
        "inside the party; in brackets the CPU seconds the model owner and the data owner "
        "spent in it (each process's own, its threads' included; the dealer's CPU is the rest "
        "of the machine's in the forward section).",
        "",
    ]
    out.append("| op class | " + " | ".join(c["label"] for c in cases) + " |")
    out.append("|---|" + "---|" * len(cases))
    for k in classes:
        cells = []
        for c in cases:
            v = c["breakdown"].get(k)
            cells.append(
                "-"
                if v is None
                else f"{v['time_s']:.2f} s{_class_cpu(c, k)} / {v['bytes_sent'] / _MB:.0f} MB "
                f"/ {v['rounds']}"
            )
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return out + [""]


def _class_cpu(c: dict[str, Any], k: str) -> str:
    """`` (CPU mo + do)`` of op class ``k``, or nothing where either was not measured."""
    mo = (c["breakdown"].get(k) or {}).get("cpu_s")
    do = ((c.get("breakdown_data_owner") or {}).get(k) or {}).get("cpu_s")
    return "" if mo is None or do is None else f" (CPU {mo:.2f} + {do:.2f})"


# -- plots ---------------------------------------------------------------------------------------


def write_plots(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = completed(report["benchmarks"])
    files: dict[str, str] = {}

    def save(fig: Any, key: str, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[key] = str(path)

    att = b.get("attention")
    if att:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for kind, marker in (("softmax", "o"), ("rfa", "s")):
            rows = sorted(
                (r for r in att["rows"] if r["attention"] == kind), key=lambda r: r["seq_len"]
            )
            ts = [r["seq_len"] for r in rows]
            ex = att["exponents"][kind]
            axes[0].loglog(
                ts,
                [r["time_s"] for r in rows],
                marker=marker,
                label=f"{kind} (slope {ex['time']:.2f})",
            )
            axes[1].loglog(
                ts,
                [r["bytes_sent_total"] / _MB for r in rows],
                marker=marker,
                label=f"{kind} (slope {ex['bytes']:.2f})",
            )
        for ax, what in zip(axes, ("time (s)", "MB sent, both parties"), strict=True):
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(
            f"MPC attention core, {att['heads']} heads x {att['head_dim']}: softmax vs RFA"
        )
        save(fig, "attention_plot", "bench-attention.png")
    cases = breakdown_cases(b)
    if cases:
        classes = sorted({k for c in cases for k in c["breakdown"]})
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 * len(cases) + 2.5))
        labels = [c["label"].split(": ", 1)[-1] for c in cases]
        for ax, key, scale, what in (
            (axes[0], "time_s", 1.0, "time (s)"),
            (axes[1], "bytes_sent", _MB, "MB sent by the model owner"),
        ):
            left = [0.0] * len(cases)
            for k in classes:
                vals = [c["breakdown"].get(k, {}).get(key, 0) / scale for c in cases]
                ax.barh(labels, vals, left=left, label=k)
                left = [a + v for a, v in zip(left, vals, strict=True)]
            ax.set_xlabel(what)
        axes[1].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"Cost by layer part: {cases[0]['shape']}, T={cases[0]['seq_len']}")
        save(fig, "breakdown_plot", "bench-breakdown.png")
    fot = b.get("fot-vs-backprop")
    if fot:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        names = [
            "forward-only\n(RFA)",
            "forward-only\n(softmax)",
            "backprop\n(ring matmul)",
            "backprop\n(vanilla CrypTen)",
        ]
        cs = fot["cases"]
        colors = ["tab:green", "tab:blue", "tab:red", "tab:brown"][: len(cs)]
        axes[0].bar(names[: len(cs)], [c["time_s"] for c in cs], color=colors)
        axes[0].set_ylabel("time per step (s)")
        axes[1].bar(names[: len(cs)], [c["bytes_sent_total"] / _MB for c in cs], color=colors)
        axes[1].set_ylabel("MB sent per step, both parties")
        fig.suptitle(
            f"One tuning step in MPC ({fot['shape'].split(' (')[0]}, "
            f"B={fot['batch']}, T={fot['seq_len']})"
        )
        save(fig, "fot_plot", "bench-fot-vs-backprop.png")
    return files
