"""The causal-LM job's response loss in plaintext, against transformers and the data's own
convention; its windowing and its trainable-set rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secfwt.config import load_job
from secfwt.data.chat_tokenize import masked_next_token_loss
from secfwt.errors import ConfigError, DataError
from secfwt.models.checkpoint import load_checkpoint, load_config, max_input_tokens
from secfwt.models.spec import Head
from secfwt.runtime.data_owner import prepare_instruction_batches, prepare_instruction_inputs
from secfwt.tuning.reference import _plain_causal_forward
from secfwt.tuning.trainable import initial_values, trainable_set
from tests.conftest import save_tiny_chat_decoder, write_chat_job

#: transformers in float64 against secfwt's float64 decoder: both use transformers' float32
#: rotary tables, at positions cumsum(mask) - 1 (transformers) and 0 .. T-1 (secfwt), so the
#: angles of a pair of tokens differ in float32 rounding only [measured 3e-7 .. 6e-7].
ATOL = 1e-5


@pytest.fixture
def chat_model(tiny_chat_dir) -> Path:
    return tiny_chat_dir


def _cfg(tmp_path: Path, model: Path, *overrides: str):
    return load_job(write_chat_job(tmp_path, model), overrides=list(overrides))


@pytest.mark.parametrize(
    ("trainable", "cut"),
    [
        ("model.norm.weight", 2),  # the window of the final residual stream is cached
        ("model.layers.1.post_attention_layernorm.weight", 1),
        ("model.layers.0.mlp.down_proj.weight", 0),  # every layer runs per step
    ],
)
def test_response_loss_equals_transformers(tmp_path, chat_model, smollm2_tokenizer, trainable, cut):
    """Each row's loss is transformers' mean cross-entropy over its reply tokens (the data
    module's convention, on the full left-padded row), whatever part of the model is cached."""
    from transformers import LlamaForCausalLM

    cfg = _cfg(tmp_path, chat_model, f'zo.trainable=["{trainable}"]', "zo.lora_modules=[]")
    spec, state = load_checkpoint(chat_model, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    data = prepare_instruction_inputs(cfg, tokenizer_dir=chat_model)
    train, held = prepare_instruction_batches(
        cfg,
        tokenizer=smollm2_tokenizer,
        model_max_positions=max_input_tokens(load_config(chat_model)),
    )
    hf = LlamaForCausalLM.from_pretrained(chat_model).double().eval()
    ids = torch.cat([train.input_ids, held.input_ids])
    am = torch.cat([train.attention_mask, held.attention_mask])
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0))
    tm = torch.cat([train.target_mask, held.target_mask])
    tid = torch.cat([train.target_ids, held.target_ids])
    want = torch.stack(
        [
            masked_next_token_loss(logits.logits[i : i + 1].double(), tid[i : i + 1], tm[i : i + 1])
            for i in range(len(ids))
        ]
    )
    trn = trainable_set(cfg, spec)
    runner = _plain_causal_forward(
        cfg, spec=spec, state=state, data=data, frozen_out=trn.names, cut=trn.first_layer(spec)
    )
    theta = {n: v.double() for n, v in initial_values(spec, state, trn, seed=0).items()}
    got = runner.example_losses([theta], list(range(len(ids))))[0]
    assert trn.first_layer(spec) == cut
    assert (got - want).abs().max() < ATOL, (got, want)
    # the plain loss of one batch is what the data module computes for it
    assert float(runner.loss_sum(theta, list(range(len(ids))), batch=5)) == pytest.approx(
        float(want.sum()), abs=len(ids) * ATOL
    )


def test_window_holds_the_reply_or_the_row_is_refused(tmp_path, chat_model):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}?", "response": "Yes."} for i in range(6)]
    rows[4]["response"] = "a much longer reply than the window of four tokens allows here"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        "data.source=jsonl",
        f"data.path={data}",
        "data.train_rows=3",
        "data.eval_rows=2",
        "model.max_length=64",
        "model.response_window=4",
    ]
    cfg = _cfg(tmp_path, chat_model, *base, "data.truncate=none")
    with pytest.raises(DataError, match=r"line 5.*model\.response_window = 4.*truncate = 'drop'"):
        prepare_instruction_inputs(cfg, tokenizer_dir=chat_model)
    kept = prepare_instruction_inputs(
        _cfg(tmp_path, chat_model, *base, "data.truncate=drop"), tokenizer_dir=chat_model
    )
    assert kept.input_ids.shape[0] == 5 and kept.target_ids.shape == (5, 4)
    # "Yes." and <|im_end|>: 3 reply targets at the end of every window, nothing else
    assert torch.equal(kept.target_weights, torch.tensor([[0, 1, 1, 1]] * 5))


def test_decoder_layer_names_set_the_cut_and_the_head_stays_frozen(
    tmp_path, chat_model, smollm2_tokenizer
):
    spec, _ = load_checkpoint(chat_model, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    cfg = _cfg(tmp_path, chat_model)  # LoRA on layer 1's q_proj and the final norm
    assert trainable_set(cfg, spec).first_layer(spec) == 1
    for field, value in (
        ("zo.trainable", '["model.embed_tokens.weight"]'),
        ("zo.lora_modules", '["model.embed_tokens"]'),
    ):
        with pytest.raises(ConfigError, match="LoRA on embed_tokens|stay frozen|no linear"):
            trainable_set(_cfg(tmp_path, chat_model, f"{field}={value}"), spec)
    untied = save_tiny_chat_decoder(
        tmp_path / "untied", smollm2_tokenizer, tie_word_embeddings=False
    )
    spec_u, _ = load_checkpoint(untied, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    with pytest.raises(ConfigError, match=r"zo\.lora_modules: lm_head\.lora_A.*stay frozen"):
        trainable_set(_cfg(tmp_path, untied, 'zo.lora_modules=["lm_head"]'), spec_u)


def test_soft_prompt_equals_prepending_it_to_each_unpadded_row(tmp_path, chat_model):
    """A soft prompt on the slots before each row's text computes what transformers computes
    with the prompt prepended to the row's own tokens (PEFT's prompt tuning, no padding)."""
    from transformers import LlamaForCausalLM

    cfg = _cfg(
        tmp_path,
        chat_model,
        "zo.trainable=[]",
        "zo.lora_modules=[]",
        "zo.soft_prompt_length=3",
        "model.max_length=44",
    )
    spec, state = load_checkpoint(chat_model, head=Head.CAUSAL_LM, num_labels=0, seed=0)
    data = prepare_instruction_inputs(cfg, tokenizer_dir=chat_model)
    assert data.prompt_slots is not None and bool((data.prompt_slots.sum(1) == 3).all())
    trn = trainable_set(cfg, spec)
    assert trn.first_layer(spec) == 0
    runner = _plain_causal_forward(cfg, spec=spec, state=state, data=data, frozen_out=(), cut=0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(3, spec.hidden_size, generator=g, dtype=torch.float64)
    got = runner.example_losses([{"soft_prompt": prompt}], list(range(len(data.input_ids))))[0]
    hf = LlamaForCausalLM.from_pretrained(chat_model).double().eval()
    table = hf.model.embed_tokens.weight.detach()
    r = data.window
    for i in range(len(data.input_ids)):
        text = data.input_ids[i][(data.attention_mask[i] - data.prompt_slots[i]).bool()]
        embeds = torch.cat([prompt, table[text]]).unsqueeze(0)  # (1, P + L, H)
        with torch.no_grad():
            logits = hf(inputs_embeds=embeds).logits[0, -1 - r : -1]  # the window's logits
        ce = torch.nn.functional.cross_entropy(logits, data.target_ids[i], reduction="none")
        w = data.target_weights[i].double()
        want = float((ce * w).sum() / w.sum())
        assert abs(float(got[i]) - want) < ATOL, (i, float(got[i]), want)
