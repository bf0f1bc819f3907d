"""``secfwt bench`` end to end on tiny shapes: real party processes, files written, no timing
checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from secfwt.bench.plan import BenchPlan, parse_names
from secfwt.bench.shapes import TINY
from secfwt.bench.suite import TIME_TO_TARGET_KEYS
from secfwt.cli import main
from secfwt.errors import ConfigError

HEADLINE = (
    "fot_vs_backprop_time_ratio",
    "fot_vs_backprop_bytes_ratio",
    "fot_vs_full_ft_time_ratio",
    "fot_vs_full_ft_bytes_ratio",
    "vs_vanilla_crypten_ratio",
    "vs_plaintext_ratio",
    "rfa_time_growth_exponent",
    "rfa_bytes_growth_exponent",
    *TIME_TO_TARGET_KEYS,
)


#: time-to-target's twins on the tiny job: +1 of its 10 held-out rows, held for 1 more step
TTA_TINY = {
    "tta_model": "tiny",
    "tta_batch": 2,
    "tta_seq_len": 8,
    "tta_directions": 2,
    "tta_prefix_rows": 3,
    "tta_prefix_chunk": 2,
    "tta_seeds": (0, 1),
    "tta_gain": 0.1,
    "tta_confirm": 1,
    "tta_lr_top": 0.05,
    "tta_lr_full": 0.05,
    "tta_max_steps": 12,
}


def _tiny_plan() -> BenchPlan:
    return BenchPlan(
        quick=True,
        layer=TINY,
        layer_seq_len=8,
        minilm_seq_len=8,
        attention_seq_lens=(8, 16),
        attention_heads=2,
        attention_head_dim=8,
        fot_shape=TINY,
        fot_layers=1,
        fot_batch=2,
        fot_seq_len=8,
        full_ft_models=("tiny",),
        full_ft_seq_lens=(8,),
        cma_population=3,
        cma_intrinsic_dim=4,
        transport_shape=TINY,
        transport_seq_len=8,
        plaintext_reps=2,
        reps=1,
        timeout_s=300.0,
        **TTA_TINY,
    )


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(BenchPlan, "quick_plan", classmethod(lambda cls: _tiny_plan()))


def test_unknown_name_is_a_config_error(capsys):
    with pytest.raises(
        ConfigError,
        match="choose from: forward, attention, fot-vs-backprop, fot-vs-full-ft, vanilla, "
        "transport",
    ):
        parse_names(["attention", "nope"])
    assert main(["bench", "nope", "--quick"]) == 2
    assert "unknown sub-benchmark 'nope'" in capsys.readouterr().err


def test_plan_overrides_are_typed_and_checked(capsys):
    plan = _tiny_plan().with_overrides(
        ["fot_seq_len=512", "attention_seq_lens=64,128", "timeout_s=60", "seed=0"]
    )
    assert (plan.fot_seq_len, plan.attention_seq_lens, plan.timeout_s, plan.seed) == (
        512,
        (64, 128),
        60.0,
        0,
    )
    assert plan.fot_batch == _tiny_plan().fot_batch  # the rest unchanged
    # fot-vs-full-ft's rows a bigger machine can add: models by name, lengths
    plan = _tiny_plan().with_overrides(
        ["full_ft_models=minilm,bert-base", "full_ft_seq_lens=128,512"]
    )
    assert (plan.full_ft_models, plan.full_ft_seq_lens) == (("minilm", "bert-base"), (128, 512))
    for item, message in (
        ("fot_len=5", "bench --set fot_len: not a field of the plan; choose from: .*fot_seq_len"),
        ("fot_seq_len", "expected KEY=VALUE, e.g. --set fot_seq_len=512"),
        ("fot_seq_len=long", "bench --set fot_seq_len=long: expected int"),
        ("attention_seq_lens=64;128", "expected comma-separated integers"),
        ("fot_batch=0", "bench --set fot_batch=0: must be positive"),
        ("layer=x", "not a field of the plan"),  # shapes are not settable
        ("full_ft_models=roberta", "unknown model \\['roberta'\\]; choose from: minilm, bert"),
    ):
        with pytest.raises(ConfigError, match=message):
            _tiny_plan().with_overrides([item])
    assert main(["bench", "vanilla", "--quick", "--set", "fot_len=5"]) == 2
    assert "not a field of the plan" in capsys.readouterr().err


def test_names_keep_suite_order():
    assert [n.value for n in parse_names(["vanilla", "attention"])] == ["attention", "vanilla"]
    assert len(parse_names([])) == 7


def test_the_help_names_the_default_suite_and_the_rest():
    from secfwt.bench.plan import BenchName
    from secfwt.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    (names,) = [a for a in bench._actions if a.dest == "names"]
    default, _, rest = names.help.partition("; only when named: ")
    assert [n.value for n in parse_names([])] == default.split("default: ")[1].split(", ")
    others = {b.value for b in BenchName} - {n.value for n in parse_names([])}
    assert others and all(f"{n} (" in rest for n in others)


#: The headline keys each sub-benchmark fills (None when it was not selected).
HEADLINE_OF = {
    "forward": ("vs_plaintext_ratio",),
    "attention": ("rfa_time_growth_exponent", "rfa_bytes_growth_exponent"),
    "fot-vs-backprop": ("fot_vs_backprop_time_ratio", "fot_vs_backprop_bytes_ratio"),
    "fot-vs-full-ft": ("fot_vs_full_ft_time_ratio", "fot_vs_full_ft_bytes_ratio"),
    "vanilla": ("vs_vanilla_crypten_ratio",),
    "transport": (),
    "time-to-target": TIME_TO_TARGET_KEYS,
}
#: The plots each sub-benchmark draws (the op-class breakdown from forward's or vanilla's layer).
PLOTS_OF = {
    "forward": ("bench-breakdown.png",),
    "attention": ("bench-attention.png",),
    "fot-vs-backprop": ("bench-fot-vs-backprop.png",),
    "fot-vs-full-ft": (),
    "vanilla": ("bench-breakdown.png",),
    "transport": (),
    "time-to-target": (),
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_headline(report, selected):
    """Every selected sub-benchmark's headline keys hold a real number; the others are None."""
    assert {k for keys in HEADLINE_OF.values() for k in keys} == set(HEADLINE)
    filled = {k for name in selected for k in HEADLINE_OF[name]}
    for key in HEADLINE:
        value = report[key]
        if key not in filled:
            assert value is None, (key, value)
            continue
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        if key.endswith("_ratio") or key == "rfa_bytes_growth_exponent":
            assert value > 0, (key, value)  # time and bytes ratios; bytes grow with T


def _check_plots(out, report, selected):
    """Each expected plot was written, is listed in the report, and is a non-empty PNG."""
    expected = {png for name in selected for png in PLOTS_OF[name]}
    assert {p.name for p in out.glob("*.png")} == expected
    assert {Path(f).name for f in report["files"].values()} >= expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, (name, len(data))


def _check_outputs(out, report_path, selected):
    report = json.loads((out / "bench.json").read_text())
    assert json.loads(report_path.read_text())["selected"] == selected
    for key in HEADLINE:
        assert key in report
    _check_headline(report, selected)
    assert report["machine"]["cores"] and report["machine"]["torch"] and "commit" in report
    assert report["selected"] == selected
    md = (out / "bench.md").read_text()
    assert "| ratio | value | target | met |" in md
    _check_plots(out, report, selected)
    # per party: what one computing party sends, the other receives
    for bench in report["benchmarks"].values():
        for case in bench.get("cases", []) + bench.get("rows", []):
            mo, do = case["parties"]["model_owner"], case["parties"]["data_owner"]
            assert (
                mo["bytes_sent"] == do["bytes_received"]
                and do["bytes_sent"] == mo["bytes_received"]
            )
            assert case["time_s"] > 0 and case["rounds"] > 0
            assert set(case["projected_s"]) == {"LAN", "WAN"}
            # the dealer's part of the section, counted at the computing parties' ends
            dealer = case["parties"]["dealer"]
            assert dealer["bytes_sent"] == case["dealer_bytes"] > 0
            assert dealer["requests"] == mo["dealer_requests"] + do["dealer_requests"] > 0
            assert dealer["bytes_received"] == mo["dealer_sent"] + do["dealer_sent"] > 0
            _check_cpu(case)
    _check_ring_matmul(report, md)
    return report, md


def _check_cpu(case):
    """Each computing party's CPU in the section, and the whole machine's, which holds both
    (less /proc/stat's 10 ms ticks on each core and the parties' windows' skew at the barrier)."""
    mo, do = case["parties"]["model_owner"]["cpu_s"], case["parties"]["data_owner"]["cpu_s"]
    assert mo > 0 and do > 0, (mo, do)
    busy = case["machine_busy_s"]
    if busy is not None:  # Linux
        assert busy >= mo + do - 0.05, (busy, mo, do)


def _check_ring_matmul(report, md):
    """The machine's int64 matmul timings (every limb result bit-identical) and the parties'
    choices are in the report."""
    ring = report["ring_matmul"]
    products = ring["machine"]["products"]
    assert len(products) == 5 and all(p["bit_identical"] for p in products)
    for p in products:
        assert p["torch_ms"] > 0 and p["limbs_ms"] > 0 and p["float64_ms"] > 0
        assert p["faster"] == ("limbs" if p["limbs_ms"] < p["torch_ms"] else "torch")
    assert isinstance(ring["choices"], list)
    assert "## Int64 matmul on this machine: torch vs float64 limbs" in md
    assert "| dealer requests |" in md
    assert "| cores busy |" in md and "Case tables' cores busy" in md


@pytest.mark.multiprocess
@pytest.mark.slow  # 14 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
def test_tiny_selection_writes_json_md_png(tmp_path, tiny, capsys):
    out = tmp_path / "res"
    rc = main(
        ["bench", "vanilla", "--quick", "--out", str(out), "--report", str(tmp_path / "r.json")]
    )
    assert rc == 0
    report, md = _check_outputs(out, tmp_path / "r.json", ["vanilla"])
    assert report["vs_vanilla_crypten_ratio"] is not None
    assert report["fot_vs_backprop_time_ratio"] is None  # not selected
    assert (out / "bench-breakdown.png").exists()
    assert "not run" in md
    case = report["benchmarks"]["vanilla"]["cases"][0]
    assert {"linear (weights)", "softmax", "GELU", "LayerNorm"} <= set(case["breakdown"])
    assert case["max_abs_err"] < 0.1  # the secure layer computed the right function
    assert "vs_vanilla_crypten_ratio" in capsys.readouterr().out


@pytest.mark.multiprocess
@pytest.mark.slow  # 27 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
def test_tiny_tuning_steps_compute_the_plaintext_loss(tmp_path, tiny):
    from secfwt.bench.cases.fot_vs_backprop import LOSS_TOLERANCE
    from secfwt.bench.report import markdown

    out = tmp_path / "res"
    argv = [
        "bench",
        "fot-vs-backprop",
        "--quick",
        "--set",
        "fot_seq_len=12",
        "--out",
        str(out),
        "--report",
        str(tmp_path / "r.json"),
    ]
    assert main(argv) == 0
    report, md = _check_outputs(out, tmp_path / "r.json", ["fot-vs-backprop"])
    fot = report["benchmarks"]["fot-vs-backprop"]
    assert (
        fot["seq_len"] == 12 and report["plan"]["fot_seq_len"] == 12
    )  # the override reached the run
    assert "`secfwt bench fot-vs-backprop --quick --set fot_seq_len=12`" in md
    assert len(fot["cases"]) == 4
    for case in fot["cases"]:
        # each step's loss (secret until revealed for the bench) against secfwt's float64 plaintext
        # encoder on the same prefix and parameters: the steps computed what they claim to
        assert case["max_abs_err"] == pytest.approx(abs(case["loss"] - case["loss_reference"]))
        assert case["max_abs_err"] < LOSS_TOLERANCE, case["label"]
    assert fot["wrong_results"] == [] and "computed a wrong loss" not in md
    assert "max abs err: |loss of the secure step" in md
    # a case off by more than the tolerance is called out in the Markdown
    fot["wrong_results"] = [fot["cases"][2]["label"]]
    assert f"**{fot['cases'][2]['label']} computed a wrong loss" in markdown(report)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "pooling",
    [
        "cls",
        # 40 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
        pytest.param("mean", marks=pytest.mark.slow),
    ],
)
def test_tiny_full_fine_tuning_pairing(tmp_path, tiny, pooling):
    """fot-vs-full-ft end to end on a 2-layer tiny model: every iteration's loss (the full
    fine-tuning baseline's, each ZO step's, each CMA-ES candidate's) against float64 plaintext,
    and the keys filled with positive ratios; with BERT's pooler on token 0 and with the
    default job's mean pooling (no pooler)."""
    from secfwt.bench.cases.fot_vs_backprop import LOSS_TOLERANCE

    out = tmp_path / "res"
    argv = ["bench", "fot-vs-full-ft", "--quick", "--out", str(out)]
    argv += ["--set", f"full_ft_pooling={pooling}"]
    assert main([*argv, "--report", str(tmp_path / "r.json")]) == 0
    report, md = _check_outputs(out, tmp_path / "r.json", ["fot-vs-full-ft"])
    full = report["benchmarks"]["fot-vs-full-ft"]
    (row,) = full["pairings"]
    assert (row["model"], row["layers"], row["seq_len"]) == ("tiny", 2, 8)
    assert row["pooling"] == pooling and f"T=8, {pooling} pooling)" in row["cases"][0]["label"]
    # full fine-tuning, then ZO with the top layer secret and ZO LoRA on query and value, each
    # with softmax and RFA, then ZO LoRA on the feed-forward layers, then CMA-ES
    assert len(row["cases"]) == 7
    base = row["cases"][0]
    assert base["label"].startswith("full fine-tuning step, every weight secret")
    # every layer's weights, the pooler and the classifier trained: the whole model but the
    # embeddings (the cases start from the embeddings' output)
    # (mean pooling has no pooler)
    skip = ("embeddings.", "pooler.") if pooling == "mean" else ("embeddings.",)
    spec_numel = sum(
        math.prod(s) for n, s in _tiny_spec().param_shapes if not any(k in n for k in skip)
    )
    assert base["trainable_numel"] == spec_numel
    # the baseline's repetitions each start from the same weights and are checked one by one
    assert len(base["loss_each_rep"]) == base["reps"] >= 2 and base["wrong_reps"] == 0
    for v in base["loss_each_rep"]:
        assert abs(v - base["loss_reference"]) < LOSS_TOLERANCE
    # so are the ZO steps' (each repetition is the same step from the same parameters)
    for case in row["cases"]:
        if case["label"].startswith("forward-only SPSA step"):
            assert len(case["loss_each_rep"]) == case["reps"] >= 2 and case["wrong_reps"] == 0
            for v in case["loss_each_rep"]:
                assert abs(v - case["loss_reference"]) < LOSS_TOLERANCE, case["label"]
    # and each CMA-ES iteration's candidates (its repetitions are successive iterations)
    cma = row["cases"][-1]
    assert cma["label"].startswith("forward-only CMA-ES iteration")
    assert len(cma["loss_each_rep"]) == len(cma["loss_reference_each_rep"]) == cma["reps"] >= 2
    assert len(set(cma["loss_reference_each_rep"])) == cma["reps"]  # new candidates each time
    assert cma["wrong_reps"] == 0
    for case in row["cases"]:
        assert case["max_abs_err"] < LOSS_TOLERANCE, case["label"]
        assert case["max_abs_err"] >= abs(case["loss"] - case["loss_reference"]) - 1e-12
    assert row["baseline_correct"] and full["wrong_results"] == []
    assert row["zo_attention"] in ("softmax", "rfa")
    keys = ("fot_vs_full_ft", "fot_layer_vs_full_ft", "fot_cma_vs_full_ft")
    for key in (*keys, "fot_lora_qv_vs_full_ft", "fot_lora_ffn_vs_full_ft"):
        for what in ("time", "bytes"):
            assert full[f"{key}_{what}_ratio"] == row[f"{key}_{what}_ratio"] > 0
    assert all(c["time_s_all_reps"][1:] for c in row["cases"])  # each iteration twice at least
    layers = [c for c in row["cases"] if ", top 1 layer(s) + head" in c["label"]]
    layer = min(layers, key=lambda c: c["time_s"])
    assert full["fot_layer_vs_full_ft_time_ratio"] == pytest.approx(
        base["time_s"] / layer["time_s"]
    )
    # the ZO LoRA steps: LoRA factors and the classifier secret, every other weight the model
    # owner's. Query and value: each A (r, H) and B (H, r), plus the classifier's H x 2 + 2; the
    # faster attention counts. Feed-forward: A (r, H), B (I, r) and A (r, I), B (H, r); its step
    # starts after the top layer's attention (cached). The headline is the faster placement.
    loras = [c for c in row["cases"] if ", LoRA r=8 on the top" in c["label"]]
    qvs = [c for c in loras if "query and value" in c["label"]]
    (ffn,) = [c for c in loras if "feed-forward" in c["label"]]
    qv = min(qvs, key=lambda c: c["time_s"])
    assert qv["label"].startswith(f"forward-only SPSA step, secfwt {row['zo_attention']}, LoRA")
    spec = _tiny_spec()
    h, i = spec.hidden_size, spec.intermediate_size
    assert {c["trainable_numel"] for c in qvs} == {2 * (8 * h + h * 8) + h * 2 + 2}
    assert ffn["trainable_numel"] == 8 * h + i * 8 + 8 * i + h * 8 + h * 2 + 2
    assert ffn["attention_cached"] and not any(c["attention_cached"] for c in qvs)
    lora = min((qv, ffn), key=lambda c: c["time_s"])
    assert row["zo_lora_placement"] == ("feed-forward" if lora is ffn else "query and value")
    assert report["fot_vs_full_ft_time_ratio"] == pytest.approx(base["time_s"] / lora["time_s"])
    assert report["fot_vs_full_ft_bytes_ratio"] == pytest.approx(
        base["bytes_sent_total"] / lora["bytes_sent_total"]
    )
    assert full["fot_lora_ffn_vs_full_ft_time_ratio"] == pytest.approx(
        base["time_s"] / ffn["time_s"]
    )
    # the check can see a layer missing: the float64 loss from layer 0 and from layer 1 (the
    # ZO step's cut, the same hidden states) differ by more than the tolerance; and the adapters
    # change the loss by more than it too
    # (with CLS pooling: the mean over this tiny model's 8 tokens dampens each part's effect
    # on the loss to 0.013-0.068, below the tolerance; the mean-pooled baseline's gradients are
    # checked in tests/bench/test_vanilla.py)
    if pooling == "cls":
        assert abs(base["loss_reference"] - layer["loss_reference"]) > LOSS_TOLERANCE
        assert abs(qv["loss_reference"] - layer["loss_reference"]) > LOSS_TOLERANCE
        assert abs(ffn["loss_reference"] - layer["loss_reference"]) > LOSS_TOLERANCE
    assert "## Forward-only tuning vs MPC full fine-tuning (`fot-vs-full-ft`)" in md


def _tiny_spec():
    from secfwt.bench.shapes import synthetic_model
    from secfwt.models.spec import Head

    return synthetic_model(TINY, layers=2, head=Head.SEQUENCE_CLASSIFICATION, seed=0)[0]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_tiny_full_suite(tmp_path, tiny, monkeypatch, tiny_tok_dir):
    _tiny_job(tmp_path, monkeypatch, tiny_tok_dir)
    out = tmp_path / "res"
    assert main(["bench", "--quick", "--out", str(out), "--report", str(tmp_path / "r.json")]) == 0
    report, _ = _check_outputs(
        out,
        tmp_path / "r.json",
        [
            "forward",
            "attention",
            "fot-vs-backprop",
            "fot-vs-full-ft",
            "vanilla",
            "transport",
            "time-to-target",
        ],
    )
    for key in HEADLINE:
        assert report[key] is not None, key
    assert (out / "bench-fot-vs-backprop.png").exists() and (out / "bench-attention.png").exists()
    assert {c["transport"] for c in report["benchmarks"]["transport"]["cases"]} == {"gloo", "tls"}


def _canned_report(value: float) -> dict:
    from secfwt.bench import metrics

    headline = {key: value for key in HEADLINE}
    return {
        **headline,
        "targets": [
            {
                "key": t.key,
                "text": t.text,
                "threshold": t.threshold,
                "at_least": t.at_least,
                "value": value,
                "passed": t.passed(value),
            }
            for t in metrics.TARGETS
        ],
        "benchmarks": {},
        "selected": ["vanilla"],
        "quick": True,
        "plan": {},
        "projection": "modelled",
        "machine": {"cores": 2, "torch": "x"},
        "commit": None,
        "code": {},
        "started": "now",
        "duration_s": 1.0,
    }


@pytest.mark.parametrize(("check", "expected"), [(False, 0), (True, 1)])
def test_missed_targets_fail_only_with_check(tmp_path, monkeypatch, capsys, check, expected):
    import secfwt.bench.suite as suite

    monkeypatch.setattr(
        suite, "run_suite", lambda names, plan, on_case=None: _canned_report(50.0)
    )  # misses the ratio targets
    argv = ["bench", "vanilla", "--quick", "--out", str(tmp_path)] + (["--check"] if check else [])
    assert main(argv) == expected
    captured = capsys.readouterr()
    assert "MISSED" in captured.out
    assert ("targets missed" in captured.err) is check
    assert json.loads((tmp_path / "bench.json").read_text())["vs_vanilla_crypten_ratio"] == 50.0


def _tiny_job(tmp_path, monkeypatch, model_dir):
    """time-to-target's twins on the tiny job (job seed 0, 16 ZO steps at lr 0.05, where each
    twin reaches +1 held-out row) instead of the default job."""
    from secfwt.bench.cases import time_to_target as tta
    from tests.conftest import write_tiny_job

    job = write_tiny_job(tmp_path, model_dir, "")
    text = job.read_text().replace("seed = 3", "seed = 0")
    job.write_text(text.replace("steps = 3", "steps = 16\nlr = 0.05\neps = 0.05"))
    monkeypatch.setattr(tta, "DEFAULT_JOB", job)


@pytest.mark.multiprocess  # 48 s on 2 cores at load average 3; 170-243 s at 15-28 (2026-12-05)
@pytest.mark.slow  # 24 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
def test_tiny_time_to_target(tmp_path, monkeypatch, tiny_tok_dir):
    """time-to-target end to end: the twins on the tiny job, every MPC section (head-only ZO
    step, both backprop steps, both prefix sections) against float64 plaintext, the keys in
    bench.json, and the totals their parts add up to."""
    from secfwt.bench.cases.fot_vs_backprop import LOSS_TOLERANCE

    _tiny_job(tmp_path, monkeypatch, tiny_tok_dir)
    monkeypatch.setattr(BenchPlan, "quick_plan", classmethod(lambda cls: _tiny_plan()))
    out = tmp_path / "res"
    argv = ["bench", "time-to-target", "--quick", "--out", str(out)]
    assert main([*argv, "--report", str(tmp_path / "r.json")]) == 0
    report, md = _check_outputs(out, tmp_path / "r.json", ["time-to-target"])
    r = report["benchmarks"]["time-to-target"]
    assert len(r["cases"]) == 5 and r["wrong_results"] == []
    for case in r["cases"]:
        assert case["max_abs_err"] is not None and case["max_abs_err"] < LOSS_TOLERANCE, case
    zo = r["cases"][0]
    assert zo["trainable_numel"] == 2 * 64 + 2  # the classifier alone, as the default job
    for key in TIME_TO_TARGET_KEYS:
        assert report[key] == r[key] and report[key] > 0, key
    # the twins: each step count is the first from which its own curve holds the target for
    # that step and the next (tta_confirm=1)
    for run in [*r["twins"]["zo"]["runs"], r["twins"]["backprop_top"], r["twins"]["backprop_full"]]:
        ok = [a - run["accuracy_before"] >= 0.1 - 1e-9 for a in run["curve"]]
        held = [i + 1 for i in range(len(ok)) if all(ok[i : i + 2])]
        assert run["steps"] == held[0], run
    for key, m in r["methods"].items():
        once, per, total = m["one_time"], m["per_step"], m["total"]
        assert total["time_s"] == pytest.approx(once["time_s"] + m["steps"] * per["time_s"]), key
        assert total["WAN_s"] > total["LAN_s"] > total["time_s"] > 0
    assert r["methods"]["backprop_full"]["one_time"]["bytes_sent_total"] == 0
    assert (
        r["methods"]["zo"]["one_time"]["bytes_sent_total"]
        > r["methods"]["backprop_top"]["one_time"]["bytes_sent_total"]
        > 0
    )
    assert report["time_to_target_ratio"] == pytest.approx(
        r["methods"]["backprop_full"]["total"]["time_s"] / r["methods"]["zo"]["total"]["time_s"]
    )
    assert "## Time and bytes to accuracy (`time-to-target`)" in md


def _party_processes() -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name.startswith("secfwt-")]


@pytest.mark.multiprocess
def test_failed_cases_are_reported_and_the_run_goes_on(tmp_path, tiny, capsys):
    """Every case times out (0.05 s is less than a party takes to start): each selected
    sub-benchmark stops at its first case, the report is still written and says so, the exit
    code is ProtocolError's, and no party process is left behind."""
    from secfwt.errors import ProtocolError

    out = tmp_path / "res"
    argv = ["bench", "fot-vs-backprop", "vanilla", "--quick", "--set", "timeout_s=0.05"]
    assert main([*argv, "--out", str(out)]) == ProtocolError.exit_code
    assert _party_processes() == []
    report = json.loads((out / "bench.json").read_text())
    stopped = report["failed_benchmarks"]
    assert [f["benchmark"] for f in stopped] == ["fot-vs-backprop", "vanilla"]
    # each stopped at its first case; the run's failed cases are those two
    assert [f["case"] for f in stopped] == [f["label"] for f in report["failed_cases"]]
    for f in stopped:
        assert f["error"] == "ProtocolError" and "did not finish within 0.05 s" in f["message"]
        assert "raise the bench plan's timeout_s (--set timeout_s=SECONDS)" in f["message"]
        assert report["benchmarks"][f["benchmark"]]["completed_cases"] == []
    assert (
        report["vs_vanilla_crypten_ratio"] is None and report["fot_vs_backprop_time_ratio"] is None
    )
    md = (out / "bench.md").read_text()
    assert "## Failed" in md and "**This run is incomplete**" in md
    assert "`vanilla` stopped at case" in md
    err = capsys.readouterr().err
    assert err.count("secfwt: bench: case failed: ") == 2 and "the run is incomplete" in err


@pytest.mark.multiprocess
@pytest.mark.slow  # 43 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
def test_killed_cases_leave_the_rows_other_iterations(tiny):
    """The model owners of fot-vs-full-ft's baseline and of its CMA-ES iteration are killed
    with SIGKILL, as the kernel's out-of-memory killer does: both are reported failed with no
    ratios, and the row's other forward-only iterations are still measured and checked against
    float64."""
    import os
    import signal
    import threading

    from secfwt.bench.cases.fot_vs_backprop import LOSS_TOLERANCE
    from secfwt.bench.plan import BenchName
    from secfwt.bench.report import markdown
    from secfwt.bench.suite import run_suite

    killed: list[int] = []

    def kill_model_owner() -> None:
        for _ in range(600):  # up to 60 s for the case's model owner to start
            owners = [p for p in _party_processes() if p.name == "secfwt-model_owner"]
            if owners and owners[0].pid:
                os.kill(owners[0].pid, signal.SIGKILL)
                killed.append(owners[0].pid)
                return
            threading.Event().wait(0.1)

    threads: list[threading.Thread] = []

    def on_case(label: str) -> None:
        if label.startswith(("full fine-tuning step", "forward-only CMA-ES iteration")):
            threads.append(threading.Thread(target=kill_model_owner, daemon=True))
            threads[-1].start()

    report = run_suite([BenchName.FOT_VS_FULL_FT], _tiny_plan(), on_case=on_case)
    assert len(killed) == 2 and _party_processes() == []
    failed, failed_cma = report["failed_cases"]
    assert failed["label"].startswith("full fine-tuning step, every weight secret")
    assert failed_cma["label"].startswith("forward-only CMA-ES iteration")
    for f in (failed, failed_cma):
        assert f["message"] == "party 'model_owner' failed: process exited with code -9"
    assert report["failed_benchmarks"] == []
    full = report["benchmarks"]["fot-vs-full-ft"]
    (row,) = full["pairings"]
    assert not row["baseline_correct"] and "code -9" in row["baseline_failed"]
    for key in ("fot_vs_full_ft", "fot_lora_ffn_vs_full_ft", "fot_cma_vs_full_ft"):
        assert row[f"{key}_time_ratio"] is None and row[f"{key}_bytes_ratio"] is None
    base, *rest, cma = row["cases"]
    for case, f in ((base, failed), (cma, failed_cma)):
        assert case == {"label": f["label"], "failed": f"PartyFailedError: {f['message']}"}
    assert len(rest) == 5  # every other forward-only iteration, each within tolerance of float64
    for case in rest:
        assert case["time_s"] > 0 and case["max_abs_err"] < LOSS_TOLERANCE, case["label"]
    assert report["fot_vs_full_ft_time_ratio"] is None
    md = markdown(report)
    assert "## Failed" in md and f"| {failed['label']} | **failed**: PartyFailedError" in md
    assert f"| {failed_cma['label']} | **failed**: PartyFailedError" in md
    assert "| **failed** |" in md  # the pairing's baseline column
