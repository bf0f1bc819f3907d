"""A prefix that ends inside a layer: when the first trained layer of an encoder trains only in
its feed-forward half (LoRA on its FFN), that layer's attention half is frozen and joins the
cached prefix, and a forward starts at the feed-forward half. Which trainable sets qualify,
and that the cached forward computes the very same function as the whole model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from secfwt.models.spec import Head, Pooling
from tests.conftest import save_random_checkpoint, save_random_decoder


def _trainable(spec: Any, patterns: tuple[str, ...], lora: tuple[str, ...] = (), prompt: int = 0):
    from secfwt.tuning.trainable import select_trainable

    return select_trainable(
        spec,
        patterns=patterns,
        lora_modules=lora,
        lora_rank=2,
        soft_prompt_length=prompt,
        prompt_layer=1,
        max_tokens=spec.max_tokens,
    )


def _bert(tmp_path: Path, layers: int = 3) -> tuple[Any, dict[str, torch.Tensor]]:
    from secfwt.models.checkpoint import load_checkpoint

    path = save_random_checkpoint(
        tmp_path / "bert", family="bert", head="sequence_classification", num_hidden_layers=layers
    )
    return load_checkpoint(path, head=Head.SEQUENCE_CLASSIFICATION, num_labels=2, seed=0)


FFN = ("*.layer.1.intermediate.dense", "*.layer.1.output.dense")


@pytest.mark.parametrize(
    ("patterns", "lora", "prompt", "expected"),
    [
        (("classifier.*",), FFN, 0, True),  # LoRA on layer 1's FFN
        (("classifier.*", "*.layer.1.output.LayerNorm.*"), (), 0, True),  # the FFN's LayerNorm
        (("classifier.*",), (*FFN, "*.layer.2.attention.self.query"), 0, True),  # later: any
        (("classifier.*",), ("*.layer.1.attention.self.query",), 0, False),
        # "output" under attention is the attention half's, not the FFN's
        (("classifier.*", "*.layer.1.attention.output.dense.bias"), FFN, 0, False),
        (("classifier.*",), (), 0, False),  # only the head: the prefix is the pooled features
        (("*.embeddings.LayerNorm.*",), ("*.layer.0.intermediate.dense",), 0, False),
        (("classifier.*",), FFN, 2, False),  # a soft prompt enters at a layer boundary
    ],
)
def test_which_trainable_sets_freeze_the_attention_half(
    tmp_path, patterns, lora, prompt, expected
) -> None:
    spec, _ = _bert(tmp_path)
    assert _trainable(spec, patterns, lora, prompt).attention_frozen(spec) is expected


def test_a_decoder_keeps_its_prefix_at_a_layer_boundary(tmp_path) -> None:
    from secfwt.models.checkpoint import load_checkpoint

    path = save_random_decoder(tmp_path / "llama")
    spec, _ = load_checkpoint(path, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    mlp = ("*.layers.1.mlp.up_proj", "*.layers.1.mlp.down_proj")
    chosen = _trainable(spec, ("model.norm.weight",), mlp)
    assert chosen.first_layer(spec) == 1 and not chosen.attention_frozen(spec)


@pytest.mark.parametrize("cut", [1, 2])
@pytest.mark.parametrize("pooling", [Pooling.CLS, Pooling.MEAN])
def test_the_forward_from_the_attention_half_is_the_whole_models(tmp_path, pooling, cut) -> None:
    """float64: the prefix to layer ``cut``'s attention output, then the cached forward with
    FFN LoRA factors, gives the logits of the whole model run from the embeddings at every
    position (and of the forward cached at the layer boundary) to rounding. With CLS pooling
    the last layer computes token 0 only (EncoderModel.top_layers): at ``cut`` 2 (the last)
    the cache holds that position alone."""
    from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
    from secfwt.models.ops import PlainOps
    from secfwt.tuning.forward import CachedForward, mean_pool_weights, prefix
    from secfwt.tuning.trainable import initial_values

    spec, state = _bert(tmp_path)
    ffn = (f"*.layer.{cut}.intermediate.dense", f"*.layer.{cut}.output.dense")
    chosen = _trainable(spec, ("classifier.*",), ffn)
    g = torch.Generator().manual_seed(3)
    theta = {  # LoRA's own B = 0 would hide a wrong product: every value random
        n: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.5
        for n, v in initial_values(spec, state, chosen, seed=0).items()
    }
    params = plain_params(state)
    frozen = {k: v for k, v in params.items() if k not in theta}
    n, t = 5, 7
    ids = torch.randint(0, spec.vocab_size, (n, t), generator=g)
    attn = torch.ones(n, t)
    attn[1, 5:] = 0  # a padded row
    mask = attn.double()
    pool_w = mean_pool_weights(attn) if pooling is Pooling.MEAN else None
    word = params[spec.word_embeddings][ids]
    ops, settings = PlainOps(), ForwardSettings(pooling=pooling)
    onehot = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double()

    def cached(attention_cached: bool) -> torch.Tensor:
        model = EncoderModel(spec, frozen, ops, settings)
        cache = prefix(model, word, mask, pool_w, cut=cut, attention_cached=attention_cached)
        rows = 1 if attention_cached and cut == 2 and pooling is Pooling.CLS else t
        assert cache.shape == (n, rows, spec.hidden_size)
        forward = CachedForward(
            ops=ops,
            public=lambda z: z.double(),
            spec=spec,
            frozen=frozen,
            settings=settings,
            cache=cache,
            mask=mask,
            pool_w=pool_w,
            onehot=onehot,
            cut=cut,
            prompt_layer=0,
            attention_cached=attention_cached,
        )
        return forward.logits(theta, list(range(n)))

    model = EncoderModel(spec, {**frozen, **theta}, ops, settings)
    whole = model.output(model.layers(model.embed(word), mask), pool_w)  # every position
    assert torch.allclose(model.forward(word, mask, pool_w), whole, atol=1e-12, rtol=0)
    inside, at_layer = cached(True), cached(False)
    assert torch.allclose(inside, whole, atol=1e-12, rtol=0)
    assert torch.allclose(at_layer, whole, atol=1e-12, rtol=0)
    # and the FFN LoRA factors are in the computation: without them the logits differ
    head = {k: v for k, v in theta.items() if "lora" not in k}
    untuned = EncoderModel(spec, {**frozen, **head}, ops, settings).forward(word, mask, pool_w)
    assert (untuned - whole).abs().max() > 1e-2
