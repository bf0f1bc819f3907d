"""Job-file checks of causal-LM (instruction-tuning) jobs: each names the field and the fix."""

from __future__ import annotations

import pytest

from secfwt.config import load_job, required_disclosures
from secfwt.errors import ConfigError
from secfwt.models.spec import Head
from secfwt.mpc.disclosure import Revealable
from secfwt.roles import Role

EXAMPLE = "secfwt/jobs/smollm2_instruct_zo.toml"


def test_example_job_is_valid_and_reveals_the_loss_not_accuracy():
    cfg = load_job(EXAMPLE)
    assert cfg.model.head is Head.CAUSAL_LM and cfg.model.response_window < cfg.model.max_length
    needed = required_disclosures(cfg)
    assert (Revealable.EVAL_LOSS, Role.DATA_OWNER) in needed
    assert all(value is not Revealable.EVAL_ACCURACY for value, _ in needed)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["model.response_window=0"], r"response_window = 0: .*1 <= response_window < "),
        (["model.response_window=48"], r"response_window < model.max_length = 48"),
        (["data.padding_side=right"], r"data.padding_side = 'right'.*set data.padding_side"),
        (["model.attention=rfa"], r"model.attention = 'rfa'.*'softmax'"),
        (["zo.soft_prompt_length=36"], r"soft_prompt_length = 36: .*out of model.max_length = 48"),
        (["job.mode=cma"], r"job.mode = 'cma': causal_lm jobs tune with job.mode = 'zo'"),
    ],
)
def test_causal_job_field_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job(EXAMPLE, overrides=overrides)


def test_causal_job_needs_the_eval_loss_term(tmp_path):
    text = open(EXAMPLE, encoding="utf-8").read()
    cut = text.replace('value = "eval_loss"', 'value = "eval_accuracy"')
    path = tmp_path / "job.toml"
    path.write_text(cut)
    with pytest.raises(ConfigError, match=r'reveals eval_loss to data_owner.*value = "eval_loss"'):
        load_job(path)


def test_response_window_is_for_causal_jobs_only():
    with pytest.raises(ConfigError, match="model.response_window applies only to model.head"):
        load_job(None, overrides=["model.response_window=4"])
    with pytest.raises(
        ConfigError, match="learns from data.task = 'instructions', not 'classification'"
    ):
        load_job(None, overrides=["model.head=causal_lm"])
