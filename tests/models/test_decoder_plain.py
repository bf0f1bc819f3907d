"""The decoder written over Ops equals transformers' own forward (plaintext backend, float64).

transformers' Llama-family RMSNorm computes in float32 even in a float64 model
(``LlamaRMSNorm.forward`` casts to float32 and back), so a pure float64 forward differs from it by
float32 rounding (~1e-6 on these tiny models). :class:`TransformersRMSNormOps` reproduces that one
cast, and then the two forwards agree to 1e-10 (measured: exactly 0): every other step (rotary
tables, masks, grouped-query attention, MLP, heads) is checked at float64 precision. The pure
float64 backend -- the MPC reference -- is checked against transformers at the float32 level.
transformers' eager attention turns left-padded rows into NaN in float64 (its mask minimum
overflows in the float32 softmax), so the reference uses ``sdpa``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from secfwt.errors import ModelError
from secfwt.models.checkpoint import (
    build_hf_model,
    check_architecture,
    load_checkpoint,
    load_config,
    spec_from_model,
    state_dict_of,
)
from secfwt.models.decoder import DecoderModel
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Attention, Family, Head, ModelSpec
from secfwt.models.transformer import ForwardSettings, plain_params
from tests.conftest import save_random_decoder

TOL = 1e-10  # float64 vs float64 with transformers' float32 RMSNorm reproduced
#: pure float64 RMSNorm vs transformers' float32 one [measured 1.2e-6 .. 2.5e-6 on these models,
#: logits up to ~8: a few float32 roundings of 6e-8 relative through 5 norms]
FLOAT32_NORM_TOL = 2e-5
N, T = 3, 11


class TransformersRMSNormOps(PlainOps):
    """PlainOps with RMSNorm computed as ``LlamaRMSNorm.forward`` does: in float32."""

    def rms_norm(self, x, *, weight, eps, mean_square_range):
        x32 = x.to(torch.float32)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * y.to(x.dtype)


def _inputs(vocab: int, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (N, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(N, T, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :9] = 0
    else:
        mask[1, 7:] = 0
        mask[2, 2:] = 0
    return ids, mask


def _hf_and_spec(path: Path, head: Head) -> tuple[torch.nn.Module, ModelSpec]:
    hf = build_hf_model(path, head=head, num_labels=0, seed=0, attn="sdpa").double()
    family = Family(hf.config.model_type)
    return hf, spec_from_model(hf, family=family, head=head)


def _reference(hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as transformers' generate()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-mha-biases": (
        "llama",
        {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    ),
    "llama-head-dim": ("llama", {"head_dim": 8, "rope_theta": 500.0}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-sliding": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    ),
    "mistral-window-4": ("mistral", {"sliding_window": 4}),
    "mistral-window-covers": ("mistral", {"sliding_window": 64}),
}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_plain_decoder_matches_transformers(tmp_path, case, padding) -> None:
    family, overrides = CASES[case]
    path = save_random_decoder(tmp_path / case, family=family, **overrides)
    hf, spec = _hf_and_spec(path, Head.CAUSAL_LM)
    params = plain_params(state_dict_of(hf))
    ids, mask = _inputs(spec.vocab_size, padding)
    ref = _reference(hf, ids, mask)
    word = params[spec.word_embeddings][ids]
    key_mask = mask.to(torch.float64)
    real = mask.bool()
    exact = DecoderModel(spec, params, TransformersRMSNormOps(), ForwardSettings())
    assert (exact.forward(word, key_mask) - ref)[real].abs().max() < TOL
    plain = DecoderModel(spec, params, PlainOps(), ForwardSettings())
    assert (plain.forward(word, key_mask) - ref)[real].abs().max() < FLOAT32_NORM_TOL


def test_spec_describes_the_architecture(tmp_path) -> None:
    path = save_random_decoder(tmp_path / "q", family="qwen2", **CASES["qwen2-sliding"][1])
    _, spec = _hf_and_spec(path, Head.CAUSAL_LM)
    assert (spec.num_heads, spec.kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.layer_windows == (0, 3) and not spec.tie_word_embeddings
    assert spec.word_embeddings == "model.embed_tokens.weight"
    assert not spec.is_linear_weight(spec.word_embeddings)
    assert spec.is_linear_weight("lm_head.weight")
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    tied = save_random_decoder(tmp_path / "t", tie_word_embeddings=True)
    _, tied_spec = _hf_and_spec(tied, Head.CAUSAL_LM)
    assert tied_spec.tie_word_embeddings
    assert "lm_head.weight" not in dict(tied_spec.param_shapes)


def test_base_head_returns_final_normed_hidden_states(tmp_path) -> None:
    path = save_random_decoder(tmp_path / "base")
    hf, spec = _hf_and_spec(path, Head.BASE)
    params = plain_params(state_dict_of(hf))
    ids, mask = _inputs(spec.vocab_size, "left")
    model = DecoderModel(spec, params, TransformersRMSNormOps(), ForwardSettings())
    out = model.forward(params[spec.word_embeddings][ids], mask.to(torch.float64))
    assert out.shape == (N, T, spec.hidden_size)
    assert (out - _reference(hf, ids, mask))[mask.bool()].abs().max() < TOL


def test_positions_0_to_t_give_the_same_scores_under_padding(tmp_path) -> None:
    """A secret key mask cannot give positions; 0..T-1 changes no real token's output, for left
    or right padding (RoPE is relative), up to the float32 rounding of the rotary tables at other
    absolute positions [measured 1.2e-6 .. 1.4e-6]."""
    path = save_random_decoder(tmp_path / "llama")
    hf, spec = _hf_and_spec(path, Head.CAUSAL_LM)
    params = plain_params(state_dict_of(hf))
    model = DecoderModel(spec, params, TransformersRMSNormOps(), ForwardSettings())
    for padding in ("left", "right"):
        ids, mask = _inputs(spec.vocab_size, padding)
        word = params[spec.word_embeddings][ids]
        out = model.forward(word, mask.to(torch.float64), positions=torch.arange(T).expand(N, T))
        assert (out - _reference(hf, ids, mask))[mask.bool()].abs().max() < FLOAT32_NORM_TOL


def test_soft_prompt_is_prepended_like_inputs_embeds(tmp_path) -> None:
    path = save_random_decoder(tmp_path / "llama")
    hf, spec = _hf_and_spec(path, Head.CAUSAL_LM)
    params = plain_params(state_dict_of(hf))
    ids, mask = _inputs(spec.vocab_size, "left")
    prompt = torch.randn(2, spec.hidden_size, dtype=torch.float64)
    model = DecoderModel(spec, params, TransformersRMSNormOps(), ForwardSettings())
    word = params[spec.word_embeddings][ids]
    ones = torch.ones(N, 2, dtype=torch.float64)
    h, key_mask = model.insert_prompt(word, mask.to(torch.float64), prompt, ones)
    out = model.forward(h, key_mask)
    full_mask = torch.cat([torch.ones(N, 2, dtype=torch.long), mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(
            inputs_embeds=torch.cat([prompt.expand(N, 2, -1), word], dim=1),
            attention_mask=full_mask,
            position_ids=positions,
        ).logits
    assert (out - ref)[full_mask.bool()].abs().max() < TOL


PARTIAL = {"partial_rotary_factor": 0.5}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 1e4,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_unsupported_architectures_are_model_errors_naming_the_field(tmp_path) -> None:
    import json

    def with_config(name: str, **fields) -> Path:
        path = save_random_decoder(tmp_path / name)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(fields)
        (path / "config.json").write_text(json.dumps(cfg))
        return path

    cases = [
        (
            with_config("llama3", rope_parameters=LLAMA3_ROPE),
            r"rope_parameters.rope_type \(rope_scaling\) 'llama3' is not supported; "
            r"supported: 'default'",
        ),
        (
            with_config("legacy", rope_scaling={"type": "linear", "factor": 2.0}),
            r"rope_type \(rope_scaling\) 'linear' is not supported",
        ),
        (with_config("act", hidden_act="gelu"), r"hidden_act 'gelu' in a llama decoder"),
        (
            with_config("partial", rope_parameters={"rope_theta": 1e4, **PARTIAL}),
            r"partial_rotary_factor 0.5 is not supported",
        ),
    ]
    for path, message in cases:
        with pytest.raises(ModelError, match=message):
            check_architecture(load_config(path))
        with pytest.raises(ModelError, match=message):  # the model owner's loader refuses too
            load_checkpoint(path, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    import transformers as tf

    tf.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match=r"model_type 'gpt2' is not supported yet; .*'llama'"):
        check_architecture(load_config(tmp_path / "gpt2"))
    plain = save_random_decoder(tmp_path / "ok")
    with pytest.raises(ModelError, match=r"model.head: 'masked_lm' is not available for a llama"):
        load_checkpoint(plain, head=Head.MASKED_LM, num_labels=0, seed=0)
    window = save_random_decoder(tmp_path / "window", family="mistral", sliding_window=4)
    spec, state = load_checkpoint(window, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    rfa = DecoderModel(spec, plain_params(state), PlainOps(), ForwardSettings(Attention.RFA))
    ids, mask = _inputs(spec.vocab_size, "right")
    with pytest.raises(ModelError, match="layer 0 has a sliding window of 4 tokens"):
        rfa.forward(plain_params(state)[spec.word_embeddings][ids], mask.double())


def test_lora_on_decoder_modules_equals_the_merged_weights(tmp_path) -> None:
    """LoRA (shared with the encoder) adds scale * B A to W for q_proj and down_proj."""
    path = save_random_decoder(tmp_path / "llama")
    hf, spec = _hf_and_spec(path, Head.CAUSAL_LM)
    params = plain_params(state_dict_of(hf))
    g = torch.Generator().manual_seed(4)
    merged, lora = dict(params), dict(params)
    settings = ForwardSettings(lora_scale=0.5)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        out_dim, in_dim = params[f"{module}.weight"].shape
        a = torch.randn(2, in_dim, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(out_dim, 2, generator=g, dtype=torch.float64) * 0.3
        lora[f"{module}.lora_A"], lora[f"{module}.lora_B"] = a, b
        merged[f"{module}.weight"] = params[f"{module}.weight"] + settings.lora_scale * b @ a
    ids, mask = _inputs(spec.vocab_size, "left")
    word = params[spec.word_embeddings][ids]
    got = DecoderModel(spec, lora, PlainOps(), settings).forward(word, mask.to(torch.float64))
    want = DecoderModel(spec, merged, PlainOps(), settings).forward(word, mask.to(torch.float64))
    base = DecoderModel(spec, params, PlainOps(), settings).forward(word, mask.to(torch.float64))
    real = mask.bool()
    assert (got - want)[real].abs().max() < TOL
    assert (got - base)[real].abs().max() > 0.1  # the adapters change the output


def _as_multi_head(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The same model with every key/value head written out once per query head it serves."""
    rep, dh = spec.num_heads // spec.kv_heads, spec.head_dim
    out = dict(state)
    for name, w in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = w.reshape(spec.kv_heads, dh, -1)
            out[name] = heads.repeat_interleave(rep, dim=0).reshape(spec.num_heads * dh, -1)
    return out


def test_causal_rfa_decoder_groups_heads_as_multi_head_attention_and_is_causal(tmp_path) -> None:
    """Grouped-query RFA equals the multi-head model with k/v heads written out per query head;
    changing later tokens leaves earlier logits bit-identical."""
    path = save_random_decoder(tmp_path / "gqa")
    spec, state = load_checkpoint(path, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    params = plain_params(state)
    settings = ForwardSettings(Attention.RFA)
    ids, mask = _inputs(spec.vocab_size, "left")
    table = params[spec.word_embeddings]
    grouped = DecoderModel(spec, params, PlainOps(), settings).forward(table[ids], mask.double())
    mha_spec = dataclasses.replace(
        spec,
        num_kv_heads=spec.num_heads,
        param_shapes=tuple(
            (
                n,
                (spec.num_heads * spec.head_dim, s[1])
                if n.endswith(("k_proj.weight", "v_proj.weight"))
                else s,
            )
            for n, s in spec.param_shapes
        ),
    )
    mha = DecoderModel(mha_spec, _as_multi_head(params, spec), PlainOps(), settings)
    real = mask.bool()
    assert (mha.forward(table[ids], mask.double()) - grouped)[real].abs().max() < 1e-10
    softmax = DecoderModel(spec, params, PlainOps(), ForwardSettings()).forward(
        table[ids], mask.double()
    )
    assert (softmax - grouped)[real].abs().max() > 1e-2  # RFA is a different function
    later = ids.clone()
    later[:, -3:] = (later[:, -3:] + 7) % spec.vocab_size
    changed = DecoderModel(spec, params, PlainOps(), settings).forward(table[later], mask.double())
    assert torch.equal(changed[:, :-3], grouped[:, :-3])
    assert not torch.equal(changed[:, -3:], grouped[:, -3:])
