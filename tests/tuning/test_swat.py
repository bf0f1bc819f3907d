"""[safety] (SWAT): the public per-tensor factors, their config errors, and the plaintext steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from secfwt.config import SafetySection, load_job
from secfwt.errors import ConfigError
from secfwt.models.checkpoint import load_checkpoint
from secfwt.runtime.data_owner import prepare_inputs
from secfwt.tuning.loops import dp_zo_loop
from secfwt.tuning.reference import plain_zo_run
from secfwt.tuning.swat import UpdateScales, update_scales
from tests.conftest import write_tiny_job

NAMES = (
    "bert.encoder.layer.1.attention.self.query.lora_A",
    "bert.encoder.layer.1.attention.self.query.lora_B",
    "bert.encoder.layer.1.output.dense.bias",
    "classifier.bias",
    "classifier.weight",
)


def test_warm_up_zeroes_the_non_robust_tensors_then_all_train_at_their_multipliers() -> None:
    scales = update_scales(
        SafetySection(
            warmup_steps=2,
            warmup_modules=("*.query",),  # a module pattern: both LoRA factors of the query
            lr_multipliers=(("classifier.*", 0.1), ("*.layer.1.*", 0.5)),
        ),
        NAMES,
    )
    assert scales is not None
    robust = {"lora_A": 0.5, "lora_B": 0.5}
    for step in (0, 1):
        got = scales.factors(step)
        assert {n.rsplit(".", 1)[1]: m for n, m in got.items() if m} == robust, got
    after = scales.factors(2)
    assert after == {NAMES[0]: 0.5, NAMES[1]: 0.5, NAMES[2]: 0.5, NAMES[3]: 0.1, NAMES[4]: 0.1}


def test_the_first_listed_multiplier_pattern_wins() -> None:
    def factor(table: tuple[tuple[str, float], ...]) -> float:
        scales = update_scales(SafetySection(lr_multipliers=table), NAMES)
        assert scales is not None
        return scales.factors(0)["classifier.weight"]

    assert factor((("classifier.*", 0.1), ("*.weight", 0.3))) == 0.1
    assert factor((("*.weight", 0.3), ("classifier.*", 0.1))) == 0.3
    assert factor((("*.bias", 0.3),)) == 1.0  # no pattern: 1.0


def test_no_safety_section_means_no_factors() -> None:
    assert update_scales(SafetySection(), NAMES) is None


@pytest.mark.parametrize(
    ("table", "field"),
    [({"warmup_modules": ["*.value"]}, "warmup_modules"), ({"q_proj": 0.5}, "lr_multipliers")],
)
def test_a_pattern_matching_no_trainable_tensor_names_its_field(
    table: dict[str, Any], field: str
) -> None:
    safety = (
        SafetySection(warmup_steps=1, warmup_modules=tuple(table["warmup_modules"]))
        if "warmup_modules" in table
        else SafetySection(lr_multipliers=tuple(table.items()))
    )
    with pytest.raises(ConfigError, match=rf"safety\.{field}: pattern .* matches no trainable"):
        update_scales(safety, NAMES)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[safety]\nwarmup = 2\n", r"\[safety\]: unknown key 'warmup'"),
        ("[safety]\nwarmup_steps = -1\n", r"safety\.warmup_steps = -1: must be >= 0"),
        ("[safety]\nwarmup_steps = 2\n", r"safety\.warmup_modules: .* needs the patterns"),
        ("[safety]\nwarmup_modules = ['classifier.*']\n", r"safety\.warmup_steps: .* 0 steps"),
        (
            "[safety]\nwarmup_steps = 3\nwarmup_modules = ['classifier.*']\n",
            r"safety\.warmup_steps = 3: the warm-up must end before zo\.steps = 3",
        ),
        (
            "[safety]\nlr_multipliers = {'classifier.*' = 0}\n",
            r"lr_multipliers\.classifier\.\* = 0",
        ),
        ("[safety]\nlr_multipliers = {'classifier.*' = -1.5}\n", r"must be > 0"),
        (
            "[safety]\nlr_multipliers = {'classifier.*' = nan}\n",
            r"lr_multipliers\.classifier.*finite",
        ),
        (
            "[safety]\nlr_multipliers = {'classifier.*' = 'x'}\n",
            r"lr_multipliers\.classifier.*number",
        ),
        ("[safety]\nlr_multipliers = [0.5]\n", r"lr_multipliers: expected a table"),
        (
            "[safety]\nlr_multipliers = {'classifier.*' = 0.5}\njob_mode_cma = 1\n",
            r"safety\.lr_multipliers: \[safety\] shapes zeroth-order updates; job\.mode = 'cma'",
        ),
        (
            "[dp]\nenabled = true\nnoise_multiplier = 1.0\n"
            "[safety]\nlr_multipliers = {'classifier.*' = 1.5}\n",
            r"safety\.lr_multipliers\.classifier\.\* = 1\.5: with dp\.enabled .* <= 1",
        ),
    ],
)
def test_bad_safety_settings_name_the_field(tmp_path: Path, text: str, error: str) -> None:
    extra, overrides = _job_text(text)
    with pytest.raises(ConfigError, match=error):
        load_job(write_tiny_job(tmp_path, tmp_path / "model", extra), overrides=overrides)


def _job_text(text: str) -> tuple[str, list[str]]:
    """The [safety] text to append to the tiny job and the overrides it stands for (TINY_JOB
    already has a [job] table, so a CMA case sets job.mode through --set)."""
    if "job_mode_cma = 1\n" in text:
        return text.replace("job_mode_cma = 1\n", ""), ["job.mode=cma"]
    return text, []


def test_multipliers_can_be_set_from_the_command_line(tmp_path: Path) -> None:
    job = write_tiny_job(tmp_path, tmp_path / "model")
    cfg = load_job(job, overrides=["safety.lr_multipliers={'classifier.*' = 0.25, '*' = 0.5}"])
    assert cfg.safety.lr_multipliers == (("classifier.*", 0.25), ("*", 0.5))


# -- the plaintext reference ------------------------------------------------------------------

TRAINABLE = [
    'zo.trainable=["classifier.*", "*.layer.1.output.dense.bias"]',
    "zo.steps=4",
]
BIAS = "bert.encoder.layer.1.output.dense.bias"


def _replay(tmp_path: Path, model_dir: Path, *sets: str) -> tuple[dict[str, Any], list[Any]]:
    """The plaintext replay of the tiny job with ``sets``; its start and per-step parameters."""
    tmp_path.mkdir(exist_ok=True)
    cfg = load_job(write_tiny_job(tmp_path, model_dir), overrides=[*TRAINABLE, *sets])
    spec, state = load_checkpoint(model_dir, head=cfg.model.head, num_labels=2, seed=cfg.job.seed)
    data = prepare_inputs(cfg, tokenizer_dir=model_dir)
    seen: list[dict[str, torch.Tensor]] = []
    plain_zo_run(
        cfg,
        spec=spec,
        state=state,
        data=data,
        seed=7,
        after_step=lambda step, theta: seen.append({n: t.clone() for n, t in theta.items()}),
    )
    start = {n: state[n].to(torch.float64) for n in seen[0]}
    return start, seen


def test_warm_up_holds_non_robust_tensors_bit_identical_then_moves_them(
    tmp_path: Path, tiny_tok_dir: Path
) -> None:
    start, seen = _replay(
        tmp_path,
        tiny_tok_dir,
        "safety.warmup_steps=2",
        'safety.warmup_modules=["classifier.*"]',
    )
    for theta in seen[:2]:  # warm-up: only the classifier moves
        assert torch.equal(theta[BIAS], start[BIAS])
        assert not torch.equal(theta["classifier.weight"], start["classifier.weight"])
    assert not torch.equal(seen[2][BIAS], seen[1][BIAS])  # afterwards the bias trains too
    assert not torch.equal(seen[3][BIAS], seen[2][BIAS])


def test_a_multiplier_of_one_half_halves_that_tensors_step(
    tmp_path: Path, tiny_tok_dir: Path
) -> None:
    start, full = _replay(tmp_path / "a", tiny_tok_dir)
    _, half = _replay(tmp_path / "b", tiny_tok_dir, "safety.lr_multipliers={'*.dense' = 0.5}")
    # step 1 starts from the same parameters with the same seed: the same g and directions
    step_full, step_half = full[0][BIAS] - start[BIAS], half[0][BIAS] - start[BIAS]
    assert float(step_full.abs().max()) > 1e-6
    torch.testing.assert_close(step_half, 0.5 * step_full, rtol=1e-12, atol=0.0)
    assert torch.equal(half[0]["classifier.weight"], full[0]["classifier.weight"])


def test_dp_zo_steps_apply_the_factors_too() -> None:
    """DP-ZO's update takes the same factors: a non-robust tensor holds during the warm-up."""
    from tests.tuning.test_loops import PLAN, SCHEDULE, _Backend, _Linear, _theta

    scales = UpdateScales(
        warmup_steps=2, robust=frozenset({"w"}), multipliers=(("b", 1.0), ("w", 1.0))
    )
    seen: list[dict[str, torch.Tensor]] = []
    dp_zo_loop(
        _Backend(_Linear(), torch.Generator().manual_seed(3)),
        _theta(),
        schedule=dataclasses.replace(SCHEDULE, scales=scales),
        plan=PLAN,
        on_step=lambda k, th, loss, g: seen.append({n: t.clone() for n, t in th.items()}),
    )
    zero = torch.zeros(3, dtype=torch.float64)
    assert all(torch.equal(th["b"], zero) for th in seen[:2])
    assert not torch.equal(seen[0]["w"], _theta()["w"])
    assert not torch.equal(seen[2]["b"], zero)
