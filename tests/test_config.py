from __future__ import annotations

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
        ("[model]\nattention = 'flash'\n", r"attention: 'flash' is not one of \['softmax', 'rfa'\]"),
        ("[zo]\nlr = -1.0\n", r"zo.lr = -1.0: must be > 0"),
        ("[data]\nsource = 'csv'\n", r"data.path is required"),
        ("[zo]\ntrainable = []\n", r"trains nothing"),
        ("[model]\nmax_length = 1\n", r"max_length = 1"),
        ("[cma]\npopulation = 1\n[job]\nmode = 'cma'\n", r"cma.population = 1"),
        ("[[disclosure]]\nvalue = 'secrets'\nto = ['data_owner']\n", r"value: 'secrets' is not one of"),
        ("[[disclosure]]\nvalue = 'eval_accuracy'\nto = ['dealer']\n", r"dealer never receives"),
        ("not toml ===", r"not valid TOML"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job(write(tmp_path, text))


def test_a_job_needing_an_unlisted_reveal_is_refused(tmp_path):
    # table_to_data_owner embedding without the embedding_table term
    text = "[[disclosure]]\nvalue = 'eval_accuracy'\nto = ['data_owner']\n"
    with pytest.raises(ConfigError, match="reveals embedding_table to data_owner"):
        load_job(write(tmp_path, text))


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
