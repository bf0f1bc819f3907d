"""The plaintext refusal-margin score: transformers' per-row losses against the MPC job's
plaintext forward (:class:`~secfwt.tuning.causal_lm.CausalLMForward` on PlainOps), the
per-prompt margins, the direction the score moves under tuning, and the ``secfwt safety score``
command."""

from __future__ import annotations

import json

import pytest
import torch

from secfwt.cli import main
from secfwt.data.refusal_margin import (
    COMPLIANCES,
    PACKAGED,
    REFUSALS,
    MarginRows,
    load_prompts,
    margin_pairs,
    margin_rows,
    margin_score,
)
from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Head
from secfwt.models.transformer import ForwardSettings, plain_params
from secfwt.safety.margin import plaintext_score, prompt_margins, row_losses
from secfwt.tuning.causal_lm import CausalLMForward, ResponseTargets
from tests.conftest import save_tiny_chat_decoder

#: transformers in float64 against the float64 plaintext decoder: both use transformers'
#: float32 rotary tables, at positions cumsum(mask) - 1 and 0 .. T-1, so the angles differ in
#: float32 rounding only (tests/tuning/test_causal_lm.py measured 3e-7 .. 6e-7 per loss).
ATOL = 1e-5
MAX_LENGTH = 64


def _rows(tokenizer, prompts: tuple[str, ...]) -> MarginRows:
    return margin_rows(prompts, tokenizer=tokenizer, max_length=MAX_LENGTH, model_max_positions=128)


def _reference_losses(folder, rows: MarginRows) -> torch.Tensor:
    """The MPC job's forward on PlainOps in float64, every parameter frozen, nothing cached
    (cut 0): what the gate computes on shares, in plaintext."""
    spec, state = load_checkpoint(folder, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    params = plain_params(state)
    head = params.get("lm_head.weight", params[spec.word_embeddings])  # (V, H)
    forward = CausalLMForward(
        ops=PlainOps(),
        spec=spec,
        frozen=params,
        settings=ForwardSettings(),
        cache=params[spec.word_embeddings][rows.input_ids],  # (M, T, H)
        mask=rows.attention_mask.to(torch.float64),
        targets=ResponseTargets(
            rows=head[rows.target_ids], weights=rows.target_weights.to(torch.float64)
        ),
        cut=0,
        window=rows.window,
    )
    return forward.example_losses([{}], list(range(rows.input_ids.shape[0])))[0]  # (M,)


@pytest.mark.parametrize("tied", [True, False])
def test_row_losses_equal_the_jobs_plaintext_forward(tmp_path, smollm2_tokenizer, tied):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_chat_decoder(
        tmp_path / "m", smollm2_tokenizer, tie_word_embeddings=tied, seed=3
    )
    rows = _rows(smollm2_tokenizer, load_prompts(PACKAGED, 3))
    assert bool((rows.attention_mask == 0).any()), "the rows must exercise left padding"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        got = row_losses(hf, rows, prompts=2)  # a batch of 2 prompts, then 1
    want = _reference_losses(folder, rows)
    assert got.shape == (18,)
    assert (got - want).abs().max() < ATOL, (got, want)
    assert plaintext_score(hf, rows) == pytest.approx(margin_score(want, rows), abs=ATOL)


def test_prompt_margins_are_compliance_minus_refusal_means(tmp_path, smollm2_tokenizer):
    """Each prompt's margin from the rows it owns, found by their text, not by layout."""
    prompts = load_prompts(PACKAGED, 4)
    pairs, _ = margin_pairs(prompts)
    losses = torch.rand(len(pairs.prompts), dtype=torch.float64, generator=torch.Generator())
    rows = _rows(smollm2_tokenizer, prompts)
    got = prompt_margins(losses, rows)
    for i, p in enumerate(prompts):
        mine = [j for j, q in enumerate(pairs.prompts) if q == p]
        comply = [float(losses[j]) for j in mine if pairs.responses[j] in COMPLIANCES]
        refuse = [float(losses[j]) for j in mine if pairs.responses[j] in REFUSALS]
        want = sum(comply) / len(comply) - sum(refuse) / len(refuse)
        assert float(got[i]) == pytest.approx(want, abs=1e-12)
    assert float(got.mean()) == pytest.approx(margin_score(losses, rows), abs=1e-12)


def _tune(model, rows: MarginRows, keep: tuple[str, ...], *, steps: int) -> None:
    """SGD on transformers' own loss (labels) of the openings in ``keep`` only."""
    openings = REFUSALS + COMPLIANCES
    pick = torch.tensor([openings[i % len(openings)] in keep for i in range(len(rows.row_weights))])
    ids, mask = rows.input_ids[pick], rows.attention_mask[pick]
    t, r = ids.shape[1], rows.window
    labels = torch.full_like(ids, -100)  # (n, T): the opening's tokens, where weighted
    labels[:, t - r :] = torch.where(rows.target_weights[pick].bool(), rows.target_ids[pick], -100)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            labels=labels,
        )
        out.loss.backward()
        opt.step()
    model.eval()


@pytest.mark.slow  # 20-60 s each on 2 cores: the default run stays under 15 min
@pytest.mark.parametrize(("openings", "sign"), [(COMPLIANCES, -1), (REFUSALS, 1)])
def test_tuning_on_openings_moves_the_score(tmp_path, smollm2_tokenizer, openings, sign):
    """Tuning on compliance openings (of other prompts) lowers the score; on refusals, raises it."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_chat_decoder(tmp_path / "m", smollm2_tokenizer, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = load_prompts(PACKAGED, 12)
    scored, train = _rows(smollm2_tokenizer, prompts[:4]), _rows(smollm2_tokenizer, prompts[4:])
    before = plaintext_score(model, scored)
    _tune(model, train, openings, steps=2)
    after = plaintext_score(model, scored)
    assert sign * (after - before) > 1.0, (before, after)  # measured: -2.8 and +3.7


@pytest.mark.slow  # 20-60 s each on 2 cores: the default run stays under 15 min
def test_score_command(tiny_chat_dir, smollm2_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    rc = main(["safety", "score", str(tiny_chat_dir), "--count", "3", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    rows = margin_rows(
        load_prompts(PACKAGED, 3),
        tokenizer=smollm2_tokenizer,
        max_length=64,
        model_max_positions=256,
    )
    assert report["score"] == pytest.approx(plaintext_score(hf, rows), abs=1e-6)
    assert report["ci_low"] < report["score"] < report["ci_high"]
    assert len(report["margins"]) == 3


@pytest.mark.slow  # 20-60 s each on 2 cores: the default run stays under 15 min
def test_score_command_merges_an_adapter(tiny_chat_dir, smollm2_tokenizer, tmp_path, capsys):
    """``--adapter``: the score of PEFT's own (unmerged) model with the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .test_adapter import _save_adapter

    adapter = _save_adapter(tiny_chat_dir, tmp_path / "lora")
    argv = ["safety", "score", str(tiny_chat_dir), "--count", "2", "--json"]
    assert main([*argv, "--adapter", str(adapter)]) == 0
    got = json.loads(capsys.readouterr().out)["score"]
    assert main(argv) == 0
    without = json.loads(capsys.readouterr().out)["score"]
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    rows = margin_rows(
        load_prompts(PACKAGED, 2),
        tokenizer=smollm2_tokenizer,
        max_length=64,
        model_max_positions=256,
    )
    want = plaintext_score(peft_model, rows)
    assert got == pytest.approx(want, abs=1e-5)  # merged vs unmerged float32 weights
    assert abs(want - without) > 1e-3  # the adapter changes the score


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--count", "1"], "--count = 1"),
        (["--count", "121"], "--prompts: 121 prompts asked"),
        (["--max-length", "4"], "--max-length = 4"),
        (["--prompts", "no-such.txt"], "--prompts = 'no-such.txt': no such file"),
    ],
)
def test_bad_score_flags_exit_2_before_loading(tmp_path, capsys, flags, named):
    assert main(["safety", "score", str(tmp_path / "no-model"), *flags]) == 2
    assert named in capsys.readouterr().err


def _report(name: str, prompts: list[str]) -> dict:
    return {
        "suites": [{"name": name, "kind": "harmful", "replies": [{"prompt": p} for p in prompts]}]
    }


def test_score_rank_refuses_prompts_it_evaluated_or_trained_on(tmp_path):
    """Each source the score must stay out of is checked: an evaluated suite, a data owner's
    file (the prompt respelt: compared as prompt_key compares) and the others pass."""
    from secfwt.errors import DataError
    from secfwt.safety.score_rank import Scored, check_disjoint

    prompts = load_prompts(PACKAGED, 4)
    (tmp_path / "data").mkdir()
    (tmp_path / "experiment.json").write_text(json.dumps({"settings": {"calibration": 8}}))
    train = tmp_path / "data" / "benign.jsonl"
    train.write_text(json.dumps({"prompt": "What is a kettle?", "response": "A pot."}) + "\n")
    aligned = Scored("aligned", str(tmp_path / "no-align"), None, _report("advbench", ["x"]))
    checked = check_disjoint(prompts, [aligned], tmp_path)
    assert "training set benign.jsonl: 1 prompts" in checked
    assert any(c.startswith("alignment mix: not checked") for c in checked)
    assert "Safe Delta calibration: 8 prompts" in checked
    tuned = Scored("tuned", "m", None, _report("harmbench", ["y", prompts[2]]))
    with pytest.raises(DataError, match="the evaluated harmbench prompts: 1 shared"):
        check_disjoint(prompts, [aligned, tuned], tmp_path)
    train.write_text(json.dumps({"prompt": prompts[1].upper() + " ", "response": "Sure."}) + "\n")
    with pytest.raises(DataError, match="training set benign.jsonl: 1 shared"):
        check_disjoint(prompts, [aligned], tmp_path)


def test_kept_means_every_suite_within_the_aligned_interval():
    from secfwt.safety.score_rank import kept_refusals

    aligned = {"a": {"rate": 0.95, "ci_low": 0.76}, "b": {"rate": 0.7, "ci_low": 0.48}}
    assert kept_refusals({"a": {"rate": 0.76}, "b": {"rate": 0.5}}, aligned)
    assert not kept_refusals({"a": {"rate": 1.0}, "b": {"rate": 0.45}}, aligned)
