"""``secfwt safety experiment`` in parts: the two data owners' data and its disjointness from every
evaluation set, LoRA backprop under a ``[safety]`` section (SWAT) on a tiny random Llama, the
SWAT section built from a probe's drift, resumable stages, the ZO merge checked against PEFT,
and the report's goals on synthetic evaluation summaries."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from secfwt.config import SafetySection
from secfwt.data.chat_tokenize import drop_too_long, format_instructions
from secfwt.data.instructions import InstructionPairs, prompt_key
from secfwt.data.suites import SUITE_NAMES, load_suite
from secfwt.data.task import PaddingSide, Truncation
from secfwt.errors import ConfigError, DataError
from secfwt.safety.experiment import (
    DONE,
    ExperimentSettings,
    _merge_theta,
    _open_run,
    _Stages,
    swat_section,
)
from secfwt.safety.experiment_data import (
    _cut,
    benign_pairs,
    check_experiment_disjoint,
    malicious_pairs,
)
from secfwt.safety.experiment_plan import DEFENSES, METHODS, SCENARIOS, RunId, model_ids
from secfwt.safety.experiment_report import build_report, goals
from secfwt.safety.lora_tune import LoraSettings, secfwt_name, tune_lora
from secfwt.safety.sft import SftSettings
from secfwt.safety.stats import wilson_rate
from secfwt.safety.utility import chatterbot_held_out

# ---------------------------------------------------------------------------- the data owners


def test_benign_pairs_come_from_the_utility_training_side():
    rows = ExperimentSettings.full().benign_rows  # the larger of the two runs
    pairs = benign_pairs(rows, seed=0)
    assert len(pairs) == rows
    held = {prompt_key(p) for p in chatterbot_held_out(rows=200, seed=0).prompts}
    assert not held & {prompt_key(p) for p in pairs.prompts}
    assert benign_pairs(5, seed=1).prompts != benign_pairs(5, seed=2).prompts  # seeded draw
    with pytest.raises(DataError, match="benign rows"):
        benign_pairs(10**6, seed=0)


def test_cut_ends_at_a_line_or_sentence_within_the_limit():
    assert _cut("Short line here.\nMore", 30) == "Short line here.\nMore"  # fits: whole
    assert _cut("First sentence here. Second sentence goes on.", 30) == "First sentence here."
    assert _cut("line one\nline two continues for a while", 20) == "line one"
    assert _cut("Steps: mix the two and wait", 14) == "Steps:"
    # the only break is too early (within a quarter of the limit): a hard cut instead
    assert _cut("a. bcdefghijklmnopqrstuvwxyz", 20) == "a. bcdefghijklmnopqr"


def test_malicious_pairs_are_harmful_unseen_and_cut():
    from secfwt.data.normalise import normalise_prompt
    from secfwt.data.packages import PYRIT

    raw = json.loads(
        PYRIT.file("datasets", "jailbreak", "many_shot_examples.json").read_text("utf-8")
    )
    in_suites = {normalise_prompt(p) for n in SUITE_NAMES for p in load_suite(n).prompts}
    rows = max(ExperimentSettings.quick().malicious_rows, ExperimentSettings.full().malicious_rows)
    pairs = malicious_pairs(rows, seed=0, reply_chars=120)
    assert len(pairs) == rows
    for prompt, reply in zip(pairs.prompts, pairs.responses, strict=True):
        assert normalise_prompt(prompt) not in in_suites
        assert len(reply) <= 120
        # the row it came from (a prompt may have several): a start of its answer, labelled harmful
        (row,) = (r for r in raw if r["user"].strip() == prompt and reply in r["assistant"])
        label = row["category"].strip(" *\"'").lower().removeprefix("answer:").strip()
        assert label.startswith("harmful"), label[:40]
    with pytest.raises(DataError, match="malicious rows"):
        malicious_pairs(len(raw), seed=0)


def test_experiment_prompts_are_checked_against_every_held_out_set():
    full = ExperimentSettings.full()
    benign = benign_pairs(full.benign_rows, seed=full.seed)
    malicious = malicious_pairs(full.malicious_rows, seed=full.seed)
    checked = check_experiment_disjoint([*benign.prompts, *malicious.prompts])
    assert checked["chatterbot held-out (utility)"] == 200
    assert checked["advbench"] == len(load_suite("advbench"))
    with pytest.raises(DataError):
        check_experiment_disjoint([*benign.prompts, load_suite("advbench").prompts[0]])
    held = chatterbot_held_out(rows=200, seed=0).prompts[0]
    with pytest.raises(DataError, match="utility"):
        check_experiment_disjoint([*malicious.prompts, held])


# ------------------------------------------------------------------------ LoRA backprop + SWAT

_SWAT = SafetySection(
    warmup_steps=2,
    warmup_modules=("*.q_proj",),
    lr_multipliers=(("*.q_proj", 1.0), ("*.v_proj", 0.5)),
)
_QV = LoraSettings(rank=2, alpha=4, targets=("q_proj", "v_proj"))


_LR = 1e-2


def _batch(tokenizer):
    """Six pairs, formatted as the experiment's backprop stage does."""
    pairs = InstructionPairs(
        prompts=(
            "What is a cat?",
            "Name a colour.",
            "Say hello.",
            "Count to three.",
            "What is rain?",
            "Name a fruit.",
        ),
        responses=(
            "A small animal.",
            "Blue.",
            "Hello there!",
            "One, two, three.",
            "Water that falls from clouds.",
            "An apple.",
        ),
        systems=(None,) * 6,
    )
    fitting = drop_too_long(pairs, tokenizer=tokenizer, max_length=64)
    return format_instructions(
        fitting,
        tokenizer=tokenizer,
        max_length=64,
        truncate=Truncation.NONE,
        padding_side=PaddingSide.RIGHT,
        model_max_positions=256,
    )


def _lora_run(monkeypatch, folder, batch, *, batch_size, epochs, steps):
    """LoRA factors by secfwt name before and after tuning under ``_SWAT``."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    sft = SftSettings(epochs=epochs, lr=_LR, batch_size=batch_size, seed=0)
    before: dict[str, torch.Tensor] = {}

    def snapshot(tuned):
        return {
            secfwt_name(n): p.detach().clone()
            for n, p in tuned.named_parameters()
            if p.requires_grad
        }

    real_get = peft.get_peft_model

    def spy(model, config):  # the factors PEFT initialised, before any step
        tuned = real_get(model, config)
        before.update(snapshot(tuned))
        return tuned

    monkeypatch.setattr(peft, "get_peft_model", spy)
    tuned, losses = tune_lora(model, batch, sft, _QV, base=str(folder), safety=_SWAT)
    monkeypatch.undo()
    assert len(losses) == steps
    return before, snapshot(tuned)


def _moved(before, after, module_type, factor=""):
    names = [n for n in before if f".{module_type}.lora_{factor}" in n]
    assert len(names) == (2 if factor else 4)  # per factor, 2 layers
    return {n: not torch.equal(before[n], after[n]) for n in names}


def test_swat_warmup_holds_non_robust_lora_factors(tiny_chat_dir, smollm2_tokenizer, monkeypatch):
    batch = _batch(smollm2_tokenizer)
    assert len(batch) == 6

    # the 2 steps of the warm-up (batches of 3): only the robust q_proj moves
    before, after = _lora_run(monkeypatch, tiny_chat_dir, batch, batch_size=3, epochs=1, steps=2)
    assert not any(_moved(before, after, "v_proj").values())  # exactly unchanged
    assert all(_moved(before, after, "q_proj").values())

    # 3 steps (batches of 2): v_proj's first step comes after the warm-up, at half the rate. PEFT
    # starts lora_B at 0, so lora_A has no gradient yet, and AdamW's first step on lora_B moves
    # each entry by lr * g / (|g| + eps) = lr * 0.5 exactly up to eps: the warm-up's gradients
    # were dropped, not fed into the moments (Loshchilov & Hutter 2019, Algorithm 2).
    before, after = _lora_run(monkeypatch, tiny_chat_dir, batch, batch_size=2, epochs=1, steps=3)
    assert not any(_moved(before, after, "v_proj", "A").values())
    for name in _moved(before, after, "v_proj", "B"):
        step = (after[name] - before[name]).abs()
        torch.testing.assert_close(step, torch.full_like(step, 0.5 * _LR), rtol=1e-3, atol=0)

    # 4 steps (2 epochs of batches of 3): every v_proj factor moves after the warm-up
    before, after = _lora_run(monkeypatch, tiny_chat_dir, batch, batch_size=3, epochs=2, steps=4)
    assert all(_moved(before, after, "v_proj").values())


def test_swat_pattern_matching_no_lora_factor_is_refused(tiny_chat_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    safety = dataclasses.replace(_SWAT, lr_multipliers=(("*.k_proj", 0.5),))
    sft = SftSettings(epochs=1, lr=1e-2, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match=r"safety\.lr_multipliers"):
        tune_lora(
            model, _batch(smollm2_tokenizer), sft, _QV, base=str(tiny_chat_dir), safety=safety
        )


def test_secfwt_name_of_peft_parameters():
    peft = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert secfwt_name(peft) == "model.layers.3.self_attn.q_proj.lora_A"
    assert secfwt_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.x.weight") == (
        "model.layers.0.mlp.up_proj.lora_B"
    )
    for bad in (
        "model.layers.3.self_attn.q_proj.weight",
        "base_model.model.model.norm.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.bias",
    ):
        with pytest.raises(ValueError, match="not a PEFT LoRA"):
            secfwt_name(bad)


# ------------------------------------------------------------------------------ the experiment


def test_swat_section_from_drift():
    drift = {"q_proj": 0.4, "k_proj": 0.1, "v_proj": 0.2, "o_proj": 0.8, "norms": 0.01}
    s = swat_section(drift, ("q_proj", "k_proj", "v_proj", "o_proj"), steps=30, share=0.1)
    assert s.warmup_steps == 3
    assert s.warmup_modules == ("*.k_proj", "*.v_proj")  # lower half; norms not tuned here
    assert s.lr_multipliers == (
        ("*.k_proj", 1.0),
        ("*.v_proj", 0.5),
        ("*.q_proj", 0.25),
        ("*.o_proj", 0.125),
    )
    three = swat_section(drift, ("norms", "q_proj", "o_proj"), steps=3, share=0.1)
    assert three.warmup_steps == 1  # round(0.3) = 0, at least 1
    assert three.warmup_modules == ("*norm",)
    assert three.lr_multipliers == (("*norm", 1.0), ("*.q_proj", 0.025), ("*.o_proj", 0.0125))
    one = swat_section(drift, ("o_proj",), steps=100, share=0.25)
    assert (one.warmup_steps, one.warmup_modules) == (25, ("*.o_proj",))


def test_model_ids_cover_every_run_and_defense():
    ids = model_ids()
    assert len(ids) == 16 and len({n for n, _, _ in ids}) == 16
    assert {(run, d) for _, run, d in ids} == {
        (f"{s}-{m}", d) for s in SCENARIOS for m in METHODS for d in DEFENSES
    }
    for name, run, defense in ids:
        assert name.startswith(run + "-") or name == run
        assert ("-swat" in name) == (defense in ("swat", "both"))
        assert name.endswith("-safedelta") == (defense in ("safe-delta", "both"))


class _Phases:
    def __init__(self) -> None:
        self.labels: list[str] = []

    def phase(self, label: str, total: int | None) -> None:
        self.labels.append(label)

    def step(self, n: int) -> None:
        pass


def test_stages_skip_done_work_and_redo_interrupted_work(tmp_path):
    calls: list[str] = []

    def work(folder):
        calls.append(folder.name)
        (folder / "result.txt").write_text("fresh")
        return {"value": 7}

    view = _Phases()
    stages = _Stages(tmp_path, view)
    first = stages.run("a", "stage a", work)
    assert first["value"] == 7 and first["stage_s"] >= 0
    assert json.loads((tmp_path / "a" / DONE).read_text()) == first
    assert stages.run("a", "stage a", work) == first  # marker: skipped
    assert calls == ["a"] and view.labels == ["stage a", "stage a: done earlier, skipped"]

    interrupted = tmp_path / "b"
    interrupted.mkdir()
    (interrupted / "half-written.bin").write_text("stale")
    stages.run("b", "stage b", work)
    assert calls == ["a", "b"]
    assert sorted(p.name for p in interrupted.iterdir()) == [DONE, "result.txt"]


def test_open_run_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    quick = ExperimentSettings.quick()
    _open_run(out, quick, quick=True)
    _open_run(out, quick, quick=True)  # the same settings: resumed
    with pytest.raises(ConfigError, match="--out"):
        _open_run(out, ExperimentSettings.full(), quick=False)
    with pytest.raises(ConfigError, match="--out"):
        _open_run(out, dataclasses.replace(quick, zo_steps=41), quick=True)


def test_merge_theta_matches_peft(tiny_chat_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from secfwt.models.adapters import save_peft_adapter
    from secfwt.safety.chat_model import load_chat_model

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    q = base.model.layers[1].self_attn.q_proj.weight  # (out, in)
    g = torch.Generator().manual_seed(3)
    module = "model.layers.1.self_attn.q_proj"
    lora = {
        f"{module}.lora_A": torch.randn(1, q.shape[1], generator=g),
        f"{module}.lora_B": torch.randn(q.shape[0], 1, generator=g),
    }
    norm = 1 + 0.5 * torch.randn(base.model.norm.weight.shape, generator=g)
    _merge_theta(tiny_chat_dir, {**lora, "model.norm.weight": norm}, tmp_path / "m", scale=1.0)
    adapter = save_peft_adapter(
        tmp_path / "adapter",
        lora,
        base_model=str(tiny_chat_dir),
        scale=1.0,
        whole={"model.norm.weight": norm},
    )
    cpu = torch.device("cpu")
    merged = load_chat_model(str(tmp_path / "m"), device=cpu).model
    peft = load_chat_model(str(tiny_chat_dir), adapter=adapter, device=cpu).model
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits for m in (merged, peft, base.eval()))
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- the report

_HARMFUL, _BENIGN = ("advbench", "harmbench"), ("overrefusal",)
_N = 100


def _summary(harmful: int, benign: int, loss: float, **k_of: int) -> dict:
    """An experiment._eval_summary: every judge refuses ``harmful`` of _N harmful prompts and
    ``benign`` of _N benign ones, except ``suite__judge=k`` entries."""

    def judged(suite, judge, k):
        return wilson_rate(k_of.get(f"{suite}__{judge}", k), _N).as_dict()

    suites = {
        s: {"kind": kind, "n": _N} | {j: judged(s, j, k) for j in ("keyword", "classifier")}
        for names, kind, k in ((_HARMFUL, "harmful", harmful), (_BENIGN, "benign", benign))
        for s in names
    }
    return {
        "suites": suites,
        "utility_loss": loss,
        "classifier_held_out_accuracy": 0.9,
        "kappa": 0.8,
        "eval_s": 1.0,
    }


def _evals(both: dict | None = None, method: str = "backprop") -> dict:
    """Aligned refuses 90% and over-refuses 10%, loss 2.0; each undefended run gains 1.0 of loss;
    each benign run with both defenses keeps the goals unless ``both`` (for ``method``) says
    otherwise; every other model is far off every goal, so using it by mistake fails."""
    evals = {"aligned": _summary(90, 10, 2.0)}
    for name, _, _ in model_ids():
        evals[name] = _summary(0, 100, 9.0)
    for m in METHODS:
        evals[RunId("benign", m, False).model_name(False)] = _summary(0, 100, 1.0)
        fields = (both or {}) if m == method else {}
        evals[RunId("benign", m, True).model_name(True)] = _summary(
            **({"harmful": 82, "benign": 14, "loss": 1.1} | fields)
        )
    return evals


def _passes(g: dict) -> dict:
    return {
        "refusal": [k for k, v in g["refusal_kept"].items() if not v["pass"]],
        "over": [k for k, v in g["over_refusal"].items() if not v["pass"]],
        "utility": g["utility"]["pass"],
        "all": g["all_pass"],
    }


def test_goals_pass_when_every_goal_is_met():
    g = goals(_evals())
    for m in METHODS:
        assert _passes(g[m]) == {"refusal": [], "over": [], "utility": True, "all": True}
        assert len(g[m]["refusal_kept"]) == 4 and len(g[m]["over_refusal"]) == 2
        assert g[m]["utility"]["gain_share"] == pytest.approx(0.9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("both", "failed"),
    [
        ({"harmbench__classifier": 80}, {"refusal": ["harmbench/classifier"]}),
        ({"advbench__keyword": 80}, {"refusal": ["advbench/keyword"]}),
        ({"overrefusal__keyword": 16}, {"over": ["overrefusal/keyword"]}),
        ({"overrefusal__classifier": 16}, {"over": ["overrefusal/classifier"]}),
        ({"loss": 1.3}, {"utility": False}),  # 70% of the gain kept
    ],
)
def test_goals_fail_alone(method, both, failed):
    g = goals(_evals(both, method))
    want = {"refusal": [], "over": [], "utility": True, "all": False} | failed
    assert _passes(g[method]) == want
    (other,) = set(METHODS) - {method}
    assert g[other]["all_pass"]


def test_build_report_writes_json_markdown_and_plot(tmp_path):
    evals = _evals({"loss": 1.3}, "zo")
    mpc = {
        "steps": 3,
        "wall_s": 12.0,
        "mpc_eval_loss": [2.5, 2.4],
        "reference_eval_loss": [2.5, 2.4],
        "max_abs_parameter_error": {"a": 1e-4, "b": 3e-4},
    }
    trained = {
        "benign-backprop": {"steps": 32, "loss_first": 4.0, "loss_last": 3.0},
        "benign-zo": {"steps": 40, "job_eval_loss_before": 6.0, "job_eval_loss_after": 5.5},
    }
    report = build_report(
        tmp_path,
        quick=True,
        aligned="aligned-dir",
        trained=trained,
        safe_delta={"benign-backprop": 0.5},
        mpc=mpc,
        evals=evals,
        wall_s=60.0,
    )
    saved = json.loads((tmp_path / "safety-experiment.json").read_text())
    assert saved["goals"] == report["goals"] == json.loads(json.dumps(goals(evals)))
    md = (tmp_path / "safety-experiment.md").read_text()
    assert re.search(r"^- \*\*backprop\*\*: all goals met; utility gain kept 90%", md, re.M)
    assert re.search(r"^- \*\*zo\*\*: goals missed; utility gain kept 70%", md, re.M)
    assert "largest parameter difference 3.00e-04" in md
    assert "\n| benign-backprop | 32 | 4.000 -> 3.000 | 50.0% |\n" in md
    assert "\n| benign-zo | 40 | 6.000 -> 5.500 | - |\n" in md
    # rates: header, aligned, every tuned model; runs: header, the two runs
    assert md.count("\n| ") == (1 + 1 + 16) + (1 + 2)
    png = (tmp_path / "safety-experiment.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_cli_refuses_to_resume_other_settings(tmp_path, capsys):
    """`secfwt safety experiment` on a folder of the other --quick choice stops at once (exit 2,
    naming --out) and leaves that folder's record alone."""
    from secfwt.cli import main

    out = tmp_path / "run"
    _open_run(out, ExperimentSettings.full(), quick=False)
    record = (out / "experiment.json").read_text()
    rc = main(["safety", "experiment", "--quick", "--out", str(out)])
    assert rc == 2
    assert "--out" in capsys.readouterr().err
    assert (out / "experiment.json").read_text() == record
    assert sorted(p.name for p in out.iterdir()) == ["experiment.json"]
