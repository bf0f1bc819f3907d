"""``secfwt safety align`` on a tiny random Llama with the real SmolLM2 tokenizer and the real data
mix: training lowers the loss, the cached checkpoint loads and is reused, evaluation prompts are
refused as training data, and bad flags fail before anything loads."""

from __future__ import annotations

import json

import pytest

from secfwt.cli import main
from secfwt.data.suites import load_suite
from secfwt.errors import ConfigError, DataError
from secfwt.safety.align import SUMMARY_FILE, AlignRequest, run_align
from secfwt.safety.evaluate import EvalRequest
from secfwt.safety.generation import Reply
from secfwt.safety.self_distill import complete_sentences
from secfwt.safety.training_data import HELD_OUT, REFUSALS, build_mix, check_disjoint


def _request(model, out, **kw) -> AlignRequest:
    base = dict(
        model=str(model),
        out=str(out),
        epochs=5,
        lr=3e-2,
        limit_train=16,
        batch_size=4,
        distil_tokens=8,
    )
    return AlignRequest(**(base | kw))


def test_align_trains_saves_and_reuses(tiny_chat_dir, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SECFWT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "models"
    first = run_align(_request(tiny_chat_dir, out))
    assert not first.cache_hit
    losses = first.summary["losses"]
    assert len(losses["steps"]) == 5 * ((first.summary["data"]["trained_rows"] + 3) // 4)
    assert losses["last_epoch_mean"] < 0.7 * losses["first_epoch_mean"]
    data = first.summary["data"]
    assert data["refusal_rows"] == 5  # a third of --limit-train 16, rounded
    assert first.summary["disjointness"]["checked"] is True

    model = AutoModelForCausalLM.from_pretrained(first.folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(first.folder)
    assert tokenizer.chat_template
    changed = [
        n
        for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert len(changed) == len(list(base.parameters()))  # full fine-tuning
    saved = json.loads((first.folder / SUMMARY_FILE).read_text())
    assert saved["key"] == first.summary["key"]

    # evaluating it on its training prompts is refused; on held-out prompts it is not
    with pytest.raises(ConfigError, match="--limit"):
        EvalRequest(model=str(first.folder), suites=("overrefusal",), limit=HELD_OUT + 1).checked()
    with pytest.raises(ConfigError, match="--limit"):
        EvalRequest(model=str(first.folder), suites=("advbench", "donotanswer")).checked()
    EvalRequest(model=str(first.folder), suites=("overrefusal",), limit=HELD_OUT).checked()
    EvalRequest(model=str(first.folder), suites=("advbench", "harmbench")).checked()

    weights = next(first.folder.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    again = run_align(_request(tiny_chat_dir, out))
    assert again.cache_hit and again.folder == first.folder
    assert weights.stat().st_mtime_ns == mtime
    other = run_align(_request(tiny_chat_dir, out, seed=1, epochs=1))
    assert not other.cache_hit and other.folder != first.folder
    assert not list(out.glob(".*tmp-*"))  # no temporary folder left behind


def _jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "response": "Sure."}) + "\n" for p in prompts))
    return path


@pytest.mark.parametrize(
    ("suite", "index"),
    [("advbench", 300), ("harmbench", 150), ("overrefusal", 0), ("donotanswer", HELD_OUT - 1)],
)
def test_evaluation_prompt_in_training_data_is_refused(
    tiny_chat_dir, tmp_path, monkeypatch, suite, index
):
    """An evaluation prompt (any AdvBench or HarmBench one, or one of the held-out head of a
    split suite) among the owner's extra pairs stops the run before any model loads."""
    monkeypatch.setenv("SECFWT_CACHE", str(tmp_path / "cache"))
    prompt = load_suite(suite).prompts[index]
    extra = _jsonl(tmp_path / "extra.jsonl", ["How do I bake bread?", prompt.upper()])
    with pytest.raises(DataError, match=f"evaluation suite '{suite}'"):
        run_align(_request(tiny_chat_dir, tmp_path / "models", extra_data=str(extra)))
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "cache").exists()  # nothing was distilled


def test_the_training_side_of_a_split_suite_is_allowed():
    tail = load_suite("overrefusal").prompts[HELD_OUT]
    assert check_disjoint([tail])["overrefusal"] == HELD_OUT


def test_mix_is_balanced_deterministic_and_disjoint():
    assert len(build_mix(40, seed=3).refusals) == 13  # default share 1/3
    mix = build_mix(40, seed=3, refusal_share=0.5)
    assert len(mix.refusals) == 20 and len(mix.benign) == 20
    assert sum(mix.counts.values()) == 40
    assert set(mix.refusals.responses) <= set(REFUSALS)
    assert build_mix(40, seed=3, refusal_share=0.5) == mix
    assert build_mix(40, seed=4, refusal_share=0.5).refusals.prompts != mix.refusals.prompts
    check_disjoint((*mix.refusals.prompts, *mix.benign))
    assert mix.dropped["pyrit-many-shot in an evaluation suite"] == 200  # HarmBench verbatim


def test_complete_sentences():
    assert complete_sentences(Reply("Yes. Bake it.", 5, True)) == "Yes. Bake it."
    assert complete_sentences(Reply("Mix 2.5 cups. Then add the", 9, False)) == "Mix 2.5 cups."
    assert complete_sentences(Reply("Mix 2.5 cups and", 9, False)) is None


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--refusal-share", "1"], "--refusal-share"),
        (["--limit-train", "1"], "--limit-train"),
        (["--batch-size", "0"], "--batch-size"),
        (["--extra-data", "/no/such.jsonl"], "--extra-data"),
    ],
)
def test_bad_flags_are_refused_before_loading(tmp_path, capsys, flags, field):
    rc = main(["safety", "align", str(tmp_path / "no-model"), "--out", str(tmp_path), *flags])
    assert rc == 2
    assert field in capsys.readouterr().err


def test_too_many_rows_for_the_harmful_pool():
    with pytest.raises(DataError, match="--limit-train"):
        build_mix(100_000, seed=0)


def test_request_checked_names_field():
    with pytest.raises(ConfigError, match="--seed"):
        AlignRequest(seed=-1).checked()
