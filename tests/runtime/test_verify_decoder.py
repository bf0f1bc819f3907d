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
