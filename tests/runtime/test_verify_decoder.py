"""verify-model on a decoder: chat prompts, logits against transformers, per-layer errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from secfwt.errors import ConfigError, ModelError
from secfwt.models.spec import Attention
from secfwt.runtime.verify import VerifyRequest, run_verify
from tests.conftest import save_random_decoder

#: A tiny random Llama's logits (std ~1.7) through two layers [measured: mean abs error 0.03% of
#: the std, argmax agreement 1.0 on 48 random-id positions]: 10x below the real-model target.
MAX_MEAN_ERR_OVER_STD = 1e-3
#: The same with causal RFA (one reciprocal per position, features through exp) [measured:
#: 0.051% of the std twice, max abs error 0.007-0.009, argmax agreement 1.0 on 48 positions].
MAX_RFA_MEAN_ERR_OVER_STD = 2e-3


def _tiny_with_smollm2_tokenizer(tmp_path: Path, smollm_dir: Path) -> Path:
    path = save_random_decoder(tmp_path / "tiny", vocab_size=49152, tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm_dir / name, path / name)
    return path


@pytest.mark.multiprocess
@pytest.mark.slow  # 17 s on an AVX2 EPYC, 2 cores (2026-12-06); `make test-all` runs it
def test_decoder_verify_reports_logit_errors_and_every_layer(tmp_path, smollm_dir) -> None:
    path = _tiny_with_smollm2_tokenizer(tmp_path, smollm_dir)
    req = VerifyRequest(
        model_path=str(path),
        seq_len=40,
        samples=2,
        per_layer=True,
        max_mean_err_over_std=MAX_MEAN_ERR_OVER_STD,
    )
    report = run_verify(req)
    assert report["passed"], report
    assert report["input"].startswith("chat-template prompts")
    # row 0 fills the 40 positions; row 1 (a question with the system prompt) is left-padded
    assert 40 < report["positions"] < 80
    assert report["logits_mean_abs_err_over_std"] < MAX_MEAN_ERR_OVER_STD
    assert report["argmax_agreement"] >= 0.99
    assert report["plaintext_decoder_vs_transformers_max_abs_err"] < 1e-4  # float32 RMSNorm
    assert [row["layer"] for row in report["per_layer"]] == [0, "final_norm"]
    assert all(row["mean_abs_err"] < 1e-2 for row in report["per_layer"])
    assert report["ranges_not_covered"] == []
    assert set(report["activation_ranges"]) == {"0", "1", "2"}  # 2 layers and the final norm


def test_decoder_requests_are_refused_before_any_party_starts(tmp_path) -> None:
    path = save_random_decoder(tmp_path / "tiny")
    with pytest.raises(ConfigError, match="--seq-len 129: must be between 1 and 128"):
        run_verify(VerifyRequest(model_path=str(path), seq_len=129))
    with pytest.raises(ModelError, match="--samples 0: must be at least 1"):
        run_verify(VerifyRequest(model_path=str(path), seq_len=8, samples=0))


@pytest.mark.multiprocess
def test_decoder_verify_with_causal_rfa_against_the_plaintext_rfa_decoder(tmp_path) -> None:
    """RFA is a different function from the checkpoint's softmax model: the reference is secfwt's
    plaintext decoder with the parties' random features."""
    path = save_random_decoder(tmp_path / "tiny")
    req = VerifyRequest(
        model_path=str(path),
        attention=Attention.RFA,
        seq_len=24,
        samples=2,
        max_mean_err_over_std=MAX_RFA_MEAN_ERR_OVER_STD,
    )
    report = run_verify(req)
    assert report["passed"], report
    assert report["reference"].startswith("secfwt's plaintext decoder with the same causal")
    assert report["plaintext_decoder_vs_transformers_max_abs_err"] is None
    assert report["logits_mean_abs_err_over_std"] < MAX_RFA_MEAN_ERR_OVER_STD
    assert report["argmax_agreement"] >= 0.99


def test_an_argmax_flip_fails_unless_the_reference_was_a_near_tie() -> None:
    from secfwt.runtime.verify_decoder import TIE_LEAD_OVER_STD, decoder_report

    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 100, 50, generator=g, dtype=torch.float64)  # (N, T, V)
    std = ref[0].std().item()
    top = ref.argmax(-1)
    mask = torch.ones(1, 100)

    def flipped(position: int, lead_over_std: float) -> dict:
        r = ref.clone()
        runner = r[0, position].clone()
        runner[top[0, position]] = -1e9
        second = int(runner.argmax())
        r[0, position, top[0, position]] = r[0, position, second] + lead_over_std * std
        s = r.clone()  # the secure output swaps the two leading logits there
        a, b = int(top[0, position]), second
        s[0, position, a], s[0, position, b] = r[0, position, b], r[0, position, a]
        return decoder_report(
            {"output": s},
            {"output": r, "plain_vs_transformers": None, "ranges": {}, "uncovered": []},
            mask=mask,
            per_layer=False,
        )

    tie = flipped(7, TIE_LEAD_OVER_STD / 10)
    assert tie["argmax_agreement"] == pytest.approx(0.99)
    assert tie["argmax_agreement_outside_near_ties"] == 1.0
    assert tie["argmax_disagreements"][0]["position"] == 7
    decisive = flipped(7, 5 * TIE_LEAD_OVER_STD)
    assert decisive["argmax_agreement_outside_near_ties"] < 1.0
    assert decisive["argmax_disagreements"][0]["reference_lead_over_std"] == pytest.approx(
        5 * TIE_LEAD_OVER_STD,
        rel=1e-3,  # the std moved a little with the edit
    )
