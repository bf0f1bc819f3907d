"""The encoder written over Ops equals transformers' own forward (plaintext backend).

This is what makes the plaintext backend a valid reference for the MPC backend.
"""

from __future__ import annotations

import pytest
import torch

from secfwt.errors import ModelError
from secfwt.models.checkpoint import (
    build_hf_model,
    load_checkpoint,
    resolve_model_path,
    spec_from_model,
    state_dict_of,
)
from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Family, Head
from tests.conftest import save_random_checkpoint

TOL = 1e-10  # float64 vs float64: only summation-order differences


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("head", ["base", "masked_lm", "sequence_classification"])
def test_plain_encoder_matches_transformers(tmp_path, family, head):
    path = save_random_checkpoint(tmp_path / "ckpt", family=family, head=head)
    hf = build_hf_model(path, head=Head(head), num_labels=2, seed=0).double()
    spec = spec_from_model(hf, family=Family(family), head=Head(head))
    params = plain_params(state_dict_of(hf))
    model = EncoderModel(spec, params, PlainOps(), ForwardSettings())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, spec.vocab_size, (3, 17), generator=g)
    mask = torch.ones(3, 17, dtype=torch.float64)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    word = params[spec.word_embeddings][ids]
    h = model.layers(model.embed(word), mask)
    out = model.output(h)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    valid = mask.bool()
    assert (h - ref.hidden_states[-1])[valid].abs().max() < TOL
    if head != "base":
        assert (
            (out - ref.logits).abs().max() < TOL
            if head == "sequence_classification"
            else (out - ref.logits)[valid].abs().max() < TOL
        )
    if head == "sequence_classification":  # the forward's last layer computes token 0 only
        top = model.top_layers(model.embed(word), mask)
        assert top.shape == (3, 1, spec.hidden_size)
        assert (model.forward(word, mask) - ref.logits).abs().max() < TOL


def test_rfa_estimates_cosine_softmax_attention():
    """With many features, FAVOR+ features on unit vectors estimate softmax(sigma^2 q^.k^)
    attention."""
    from secfwt.models.attention import RFASettings, rfa_attention, rfa_projection

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 10, dtype=torch.float64)
    mask[1, 6:] = 0
    settings = RFASettings(num_features=40_000, sigma=1.2, seed=3)
    w = rfa_projection(layer=0, head_dim=16, settings=settings)
    approx = rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=settings)
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    scores = settings.sigma**2 * qn @ kn.transpose(-1, -2)
    probs = torch.softmax(scores.masked_fill(mask[:, None, None, :] == 0, float("-inf")), dim=-1)
    exact = probs @ v
    assert (approx - exact).abs().max() < 0.05  # Monte-Carlo error of 40k features


def test_missing_or_unsupported_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="unknown packaged model"):
        resolve_model_path("packaged:gpt5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_checkpoint(tmp_path / "empty", head=Head.BASE, num_labels=2, seed=0)
    import transformers as tf

    tf.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported"):
        load_checkpoint(tmp_path / "gpt2", head=Head.BASE, num_labels=2, seed=0)
    save_random_checkpoint(tmp_path / "noweights", family="bert", head="base")
    for f in (tmp_path / "noweights").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="no weights"):
        load_checkpoint(tmp_path / "noweights", head=Head.BASE, num_labels=2, seed=0)
    cls_dir = save_random_checkpoint(
        tmp_path / "cls", family="bert", head="sequence_classification"
    )
    with pytest.raises(ModelError, match="head has 2 labels but the data has 3"):
        load_checkpoint(cls_dir, head=Head.SEQUENCE_CLASSIFICATION, num_labels=3, seed=0)
