"""The baseline's torch module is the MPC job's function, and Opacus's per-sample gradients of it
are the per-example gradients (every parameter trainable, position embeddings included)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from secfwt.dp.classifier import DPClassifier, load_classifier, mark_trainable
from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Head, Pooling
from secfwt.tuning.forward import mean_pool_weights
from tests.conftest import save_random_checkpoint

#: float32 per-sample vs per-example gradients differ by summation order only (measured <= 2e-7).
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6


def _batch(spec, *, n: int = 4, t: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tokens with right padding of different lengths, as the tokenizer produces."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, spec.vocab_size, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = spec.pad_token_id
    labels = torch.tensor([0, 1, 1, 0])[:n]
    return ids, mask, labels


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dp-classifier")
    return {
        f: save_random_checkpoint(root / f, family=f, head="sequence_classification")
        for f in ("bert", "roberta")
    }


def _model(checkpoints: dict[str, Path], family: str, pooling: Pooling) -> DPClassifier:
    path = checkpoints[family]
    spec, state = load_checkpoint(path, head=Head.SEQUENCE_CLASSIFICATION, num_labels=2, seed=0)
    return load_classifier(path, spec=spec, values=state, pooling=pooling)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.CLS])
def test_logits_equal_the_mpc_jobs_plaintext_forward(checkpoints, family, pooling):
    """Same positions, pooling and head as EncoderModel (the plaintext reference of MPC jobs)."""
    model = _model(checkpoints, family, pooling).double()
    spec = model.spec
    params = plain_params(dict(model.named_parameters()))
    ids, mask, _ = _batch(spec)
    ref_model = EncoderModel(spec, params, PlainOps(), ForwardSettings(pooling=pooling))
    maskf = mask.double()
    h = ref_model.layers(ref_model.embed(params[spec.word_embeddings][ids]), maskf)
    ref = ref_model.output(h, mean_pool_weights(mask) if pooling is Pooling.MEAN else None)
    with torch.no_grad():
        out = model(ids, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.CLS])
def test_opacus_per_sample_gradients_match_per_example_backward(checkpoints, family, pooling):
    from opacus import GradSampleModule

    model = _model(checkpoints, family, pooling)
    trained, unused = mark_trainable(model, [n for n, _ in model.named_parameters()])
    expected_unused = (
        [n for n, _ in model.named_parameters() if n.startswith("bert.pooler.")]
        if (family, pooling) == ("bert", Pooling.MEAN)
        else []
    )
    assert unused == expected_unused
    assert any("position_embeddings" in n for n in trained) and any(
        "word_embeddings" in n for n in trained
    )
    ids, mask, labels = _batch(model.spec)
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.nn.functional.cross_entropy(gsm(ids, mask), labels, reduction="sum").backward()
    per_sample = {
        n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    gsm._close()
    assert set(per_sample) == set(trained)
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(
            model(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1], reduction="sum"
        ).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(
                    per_sample[n][i],
                    p.grad,
                    rtol=GRAD_RTOL,
                    atol=GRAD_ATOL,
                    msg=lambda m, n=n, i=i: f"{n}, example {i}: {m}",
                )


def test_trainable_set_that_only_names_unused_parameters_is_refused(checkpoints):
    from secfwt.errors import ConfigError

    model = _model(checkpoints, "bert", Pooling.MEAN)
    with pytest.raises(ConfigError, match="unused"):
        mark_trainable(model, ["bert.pooler.dense.weight"])
