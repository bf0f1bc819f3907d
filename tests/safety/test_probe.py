"""``secfwt safety probe`` on a tiny random Llama with the real SmolLM2 tokenizer and the real
public data: the probe runs end to end, its snippet is a valid ``[safety]`` section of a job,
the ranking is reproducible, and bad flags fail before anything loads."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from secfwt.cli import main
from secfwt.config import default_job_text, load_job
from secfwt.errors import ConfigError
from secfwt.safety.probe import (
    MODULE_TYPES,
    ProbeRequest,
    fit_probe,
    multipliers,
    pattern,
    rank,
    run_probe,
    safety_snippet,
)
from secfwt.tuning.swat import update_scales


def _run(model, tmp_path, name):
    req = ProbeRequest(
        model=str(model),
        out=str(tmp_path / f"{name}.toml"),
        report=str(tmp_path / f"{name}.json"),
        steps=2,
        prompts=24,
        lr=1e-2,
        batch_size=2,
    )
    return run_probe(req), (tmp_path / f"{name}.toml").read_text()


def test_probe_end_to_end_snippet_loads_into_a_job(tiny_chat_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    report, snippet = _run(tiny_chat_dir, tmp_path, "a")
    assert json.loads((tmp_path / "a.json").read_text()) == report
    assert sorted(report["drift"]) == sorted(MODULE_TYPES)  # a Llama has every type
    assert all(d > 0 for d in report["drift"].values())  # every type moved the features
    assert report["probe"]["harmful_prompts"] == report["probe"]["harmless_prompts"] == 24
    assert report["probe"]["held_out_rows"] == 12  # a quarter of the 48 probe prompts
    assert 0 <= report["probe"]["held_out_accuracy"] <= 1

    job = tmp_path / "job.toml"
    job.write_text(default_job_text() + "\n" + snippet)
    cfg = load_job(job)
    order = report["ranking"]
    assert cfg.safety.warmup_modules == tuple(pattern(t) for t in order[:4])  # lower half
    assert cfg.safety.warmup_steps == 4
    assert dict(cfg.safety.lr_multipliers)[pattern(order[0])] == 1.0
    assert all(0 < m <= 1 for _, m in cfg.safety.lr_multipliers)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    names = tuple(n for n, _ in model.named_parameters())
    scales = update_scales(cfg.safety, names)  # every pattern matches a tensor of the model
    assert scales is not None

    def of_type(name, t):
        module = name.rsplit(".", 1)[0]
        return module.endswith("norm") if t == "norms" else module.endswith("." + t)

    assert scales.robust == {n for n in names if any(of_type(n, t) for t in order[:4])}
    assert min(m for _, m in scales.multipliers) > 0

    again, snippet_again = _run(tiny_chat_dir, tmp_path, "b")
    assert again["ranking"] == order and again["drift"] == report["drift"]
    assert snippet_again == snippet


def test_ranking_and_multipliers_on_known_drift():
    drift = {"q_proj": 0.1, "down_proj": 0.4, "k_proj": 0.2, "norms": 0.2}
    assert rank(drift) == ["q_proj", "k_proj", "norms", "down_proj"]
    assert multipliers(drift) == {"q_proj": 1.0, "k_proj": 0.5, "norms": 0.5, "down_proj": 0.25}
    text = safety_snippet(drift, warmup_steps=3)
    safety = tomllib.loads(text)["safety"]
    assert safety["warmup_modules"] == ["*.q_proj", "*.k_proj"]
    assert safety["warmup_steps"] == 3
    assert list(safety["lr_multipliers"]) == ["*.q_proj", "*.k_proj", "*norm", "*.down_proj"]
    zero = multipliers({"q_proj": 0.0, "v_proj": 0.5})
    assert zero["q_proj"] == 1.0 and 0 < zero["v_proj"] < 1e-4


def test_probe_separates_separable_features():
    """Two Gaussian clusters 6 standard deviations apart along one direction: every held-out row
    is classified right, harmful (label 1) on the positive side; noise is not, on held-out rows."""
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(16)
    direction /= np.linalg.norm(direction)
    y = np.r_[np.ones(40), np.zeros(40)]
    x = rng.standard_normal((80, 16)) + 3.0 * np.outer(2 * y - 1, direction)
    probe, accuracy = fit_probe(x, y, seed=0)
    assert accuracy == 1.0
    assert (probe.logit(x[y == 1]) > 0).all() and (probe.logit(x[y == 0]) < 0).all()
    # 64 noise features: 60 training rows are separable, the 20 held-out rows are at chance
    _, chance = fit_probe(rng.standard_normal((80, 64)), y, seed=0)
    assert chance < 0.9


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--steps", "0"], "--steps"),
        (["--out", "EXISTS"], "--out"),
        (["--report", "EXISTS"], "--report"),
    ],
)
def test_bad_flags_are_refused_before_loading(tiny_chat_dir, tmp_path, capsys, flags, field):
    (tmp_path / "exists").write_text("")
    flags = [str(tmp_path / "exists") if f == "EXISTS" else f for f in flags]
    out = ["--out", str(tmp_path / "new.toml")] if field != "--out" else []
    rc = main(["safety", "probe", str(tiny_chat_dir), *out, *flags])
    assert rc == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "new.toml").exists()


@pytest.mark.parametrize("model", ["packaged:no-such-model", "/no/such/folder"])
def test_unknown_model_is_refused(tmp_path, model):
    with pytest.raises(ConfigError, match="MODEL"):
        ProbeRequest(model=model, out=str(tmp_path / "x.toml")).checked()
