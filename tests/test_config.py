from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from secfwt.config import Mode, load_job
from secfwt.errors import ConfigError
from secfwt.mpc.disclosure import Revealable
from secfwt.roles import Role
from secfwt.runtime.simulate import provider_for


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_default_job_is_valid_and_lists_its_reveals():
    cfg = load_job(None)
    assert cfg.job.mode is Mode.ZO
    assert cfg.terms.allows(Revealable.EMBEDDING_TABLE, Role.DATA_OWNER)
    assert not cfg.terms.allows(Revealable.EMBEDDING_TABLE, Role.MODEL_OWNER)
    assert cfg.terms.allows(Revealable.EVAL_ACCURACY, Role.MODEL_OWNER)


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[modle\]"):
        load_job(write(tmp_path, "[modle]\npath = 'x'\n"))


def test_unknown_key_names_the_field_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"\[zo\]: unknown key 'stpes'.*steps"):
        load_job(write(tmp_path, "[zo]\nstpes = 3\n"))


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("[zo]\nsteps = 'ten'\n", r"\[zo\] steps: expected an integer"),
        (
            "[model]\nattention = 'flash'\n",
            r"attention: 'flash' is not one of \['softmax', 'rfa'\]",
        ),
        ("[zo]\nlr = -1.0\n", r"zo.lr = -1.0: must be > 0"),
        ("[zo]\nlr = nan\n", r"\[zo\] lr: expected a finite number, got nan"),
        ("[dp]\ndelta = inf\n", r"\[dp\] delta: expected a finite number, got inf"),
        ("[data]\nsource = 'csv'\n", r"data.path is required"),
        ("[zo]\ntrainable = []\n", r"trains nothing"),
        ("[model]\nmax_length = 1\n", r"max_length = 1"),
        ("[cma]\npopulation = 1\n[job]\nmode = 'cma'\n", r"cma.population = 1"),
        (
            "[[disclosure]]\nvalue = 'secrets'\nto = ['data_owner']\n",
            r"value: 'secrets' is not one of",
        ),
        ("[[disclosure]]\nvalue = 'eval_accuracy'\nto = ['dealer']\n", r"dealer never receives"),
        ("not toml ===", r"not valid TOML"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job(write(tmp_path, text))


def _terms(*pairs: tuple[str, str]) -> str:
    return "".join(f"[[disclosure]]\nvalue = '{v}'\nto = [{to}]\n" for v, to in pairs)


EVAL = ("eval_accuracy", "'data_owner'")
BOTH = "'data_owner', 'model_owner'"


@pytest.mark.parametrize(
    "text, message",
    [
        # table_to_data_owner embedding without the embedding_table term
        (
            _terms(EVAL, ("range_check", BOTH)),
            'reveals embedding_table to data_owner .* value = "embedding_table" to = '
            r'\["data_owner"\]',
        ),
        # every job range-checks its secure rows, one bit to both parties
        (
            _terms(EVAL, ("embedding_table", "'data_owner'")),
            "reveals range_check to data_owner and model_owner .*truncation failure.* "
            r'value = "range_check" to = \["data_owner", "model_owner"\]',
        ),
        (
            _terms(EVAL, ("embedding_table", "'data_owner'"), ("range_check", "'data_owner'")),
            r'reveals range_check to model_owner .* to = \["model_owner"\] if both owners agree',
        ),
    ],
)
def test_a_job_needing_an_unlisted_reveal_is_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_job(write(tmp_path, text))
    # with the term the job loads
    full = _terms(EVAL, ("embedding_table", "'data_owner'"), ("range_check", BOTH))
    assert load_job(write(tmp_path, full)).terms.allows(Revealable.RANGE_CHECK, Role.MODEL_OWNER)


def test_overrides_apply_and_are_validated():
    cfg = load_job(None, overrides=["zo.steps=3", "model.attention=rfa"])
    assert cfg.zo.steps == 3 and cfg.model.attention.value == "rfa"
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_job(None, overrides=["steps=3"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_job(None, overrides=["zo.nope=1"])


def test_insecure_provider_needs_the_explicit_flag():
    cfg = load_job(None, overrides=["job.provider=tfp"])
    with pytest.raises(ConfigError, match="--insecure-dev"):
        provider_for(cfg, insecure_dev=False)
    assert provider_for(cfg, insecure_dev=True).value == "TFP"
    assert provider_for(load_job(None), insecure_dev=False).value == "TTP"


# -- the --set binder shared by jobs and the bench plan (secfwt.overrides) ---------------------


def test_one_binder_serves_jobs_and_the_bench_plan():
    from secfwt.bench.plan import BenchPlan

    cfg = load_job(None, overrides=["zo.trainable=classifier.*,pooler.*", "dp.target_epsilon=3"])
    assert cfg.zo.trainable == ("classifier.*", "pooler.*")  # a list as comma-separated text
    assert cfg.dp.target_epsilon == 3.0 and isinstance(cfg.dp.target_epsilon, float)
    assert load_job(None, overrides=['zo.trainable=["a.*", "b.*"]']).zo.trainable == ("a.*", "b.*")
    assert load_job(None, overrides=["zo.steps=3", "zo.steps=4"]).zo.steps == 4  # last wins
    plan = BenchPlan.quick_plan().with_overrides(["attention_seq_lens=64", "timeout_s=60"])
    assert plan.attention_seq_lens == (64,) and plan.timeout_s == 60.0


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("zo.steps=ten", r"^--set zo.steps=ten: \[zo\] steps: expected int, e.g. zo.steps=100$"),
        ("zo.steps=2.5", r"expected int"),
        (
            "data.truncate=1",
            r"\[data\] truncate: 1 is not one of \['none', 'end', 'prompt_left', 'drop'\]",
        ),
        (
            "nope.x=1",
            r"unknown section \[nope\]; choose from: cma, data, dp, job, model, run, safety, "
            "safety_gate, zo",
        ),
        ("disclosure.value=x", r"unknown section \[disclosure\]"),  # terms only from the file
        ("zo.steps.x=1", r"expected SECTION.KEY=VALUE, e.g. --set zo.steps=10"),
        ("zo.steps=", r"expected SECTION.KEY=VALUE"),
        ("=3", r"expected SECTION.KEY=VALUE"),
        ("model.attention=flash", r"'flash' is not one of \['softmax', 'rfa'\]"),
    ],
)
def test_bad_job_overrides_name_the_field_and_the_choices(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job(None, overrides=[item])


def test_the_plan_takes_flat_keys_only():
    from secfwt.bench.plan import BenchPlan

    for item, pattern in (
        ("plan.fot_seq_len=64", r"bench --set 'plan.fot_seq_len=64': expected KEY=VALUE"),
        ("quick=true", r"not a field of the plan"),
        ("seed=-1", r"bench --set seed=-1: must be >= 0"),
        ("timeout_s=soon", r"bench --set timeout_s=soon: expected float"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            BenchPlan.full().with_overrides([item])


def test_overrides_of_a_file_are_range_checked_after_binding(tmp_path):
    from secfwt.config import default_job_text

    job = write(tmp_path, default_job_text())
    assert load_job(job, overrides=["zo.steps=7"]).zo.steps == 7
    with pytest.raises(ConfigError, match=r"zo.steps = 0: must be > 0"):
        load_job(job, overrides=["zo.steps=0"])


def test_a_bad_set_exits_2_naming_the_field_before_any_work(capsys):
    from secfwt.cli import main

    assert main(["simulate", "--set", "zo.stpes=3"]) == 2
    assert "--set zo.stpes: unknown key 'stpes' in [zo]; valid keys: " in capsys.readouterr().err
    assert main(["dp-baseline", "secfwt/jobs/default.toml", "--set", "dp.delta=often"]) == 2
    assert "--set dp.delta=often: [dp] delta: expected float" in capsys.readouterr().err
    assert main(["bench", "--set", "plan.reps=2"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


SAFE_DELTA_GATE = """
[safety_gate]
prompts = "packaged:advbench-gate"
count = 2
max_drop = 1.0
safe_delta = true
[[disclosure]]
value = "safety_score"
to = ["data_owner", "model_owner"]
"""


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["safety_gate.safe_delta_budget=0"], r"safety_gate.safe_delta_budget = 0.0: must be"),
        (["safety_gate.safe_delta_budget=-0.1"], r"safety_gate.safe_delta_budget = -0.1"),
        (["safety_gate.safe_delta_calibration=0"], r"safety_gate.safe_delta_calibration = 0"),
        (["job.provider=tfp"], r"safety_gate.safe_delta = true: .*job.provider = 'ttp'"),
        (["zo.lora_modules=[]"], r"safety_gate.safe_delta = true: the job tunes no LoRA"),
        (["zo.soft_prompt_length=2"], r"safety_gate.safe_delta = true: a soft prompt"),
    ],
)
def test_safe_delta_settings_are_checked_naming_the_field(tmp_path, overrides, pattern):
    from tests.conftest import write_chat_job

    job = write_chat_job(tmp_path, tmp_path / "model", SAFE_DELTA_GATE)
    with pytest.raises(ConfigError, match=pattern):
        load_job(job, overrides=overrides)


def test_safe_delta_defaults_and_the_terms_digest(tmp_path):
    from secfwt.runtime.contract import public_job_digest
    from secfwt.tuning.safe_delta import DEFAULT_BUDGET
    from tests.conftest import write_chat_job

    job = write_chat_job(tmp_path, tmp_path / "model", SAFE_DELTA_GATE)
    cfg = load_job(job)
    g = cfg.safety_gate
    assert g.safe_delta and g.safe_delta_budget == DEFAULT_BUDGET and g.safe_delta_calibration > 0
    other = load_job(job, overrides=["safety_gate.safe_delta_budget=0.2"])
    assert other.terms.digest() != cfg.terms.digest()
    assert public_job_digest(other) != public_job_digest(cfg)
    off = load_job(job, overrides=["safety_gate.safe_delta=false"])
    assert off.terms.digest() != cfg.terms.digest()
    # a gate without Safe Delta keeps the digest it had before the Safe Delta settings existed
    old = dataclasses.asdict(off.safety_gate)
    del old["safe_delta_budget"], old["safe_delta_calibration"]
    blob = {"safety_gate": old, "safety": dataclasses.asdict(off.safety)}
    want = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()
    assert off.terms.policy == want
    with pytest.raises(ConfigError, match=r"safe_delta_budget / safe_delta_calibration are set"):
        load_job(job, overrides=["safety_gate.safe_delta=false", "safety_gate.safe_delta_budget=1"])
