"""Safety-evaluation fixtures: a tiny random Llama chat model with the real SmolLM2 tokenizer, and
the refusal classifier trained once per session into a shared cache."""

from __future__ import annotations

from pathlib import Path

import pytest


def save_tiny_llama(path: Path, tokenizer, *, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer LlamaForCausalLM with random weights, the vocabulary of ``tokenizer`` (SmolLM2:
    49,152) and its own output layer (untied), saved with the tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: What the scripted model says to every prompt (its first assistant turn).
SCRIPTED_REPLY = "I cannot help you."


def save_scripted_llama(path: Path, tokenizer, *, reply: str = SCRIPTED_REPLY) -> Path:
    """A tiny Llama that answers every chat prompt with ``reply`` and then ``<|im_end|>``.

    Attention and MLP outputs are zeroed, so the last hidden state is the RMS-normalised
    embedding ``h(t)`` of the current token alone; the output row of the token that must follow
    ``t`` is set to ``50 h(t) / |h(t)|^2``, so its logit is 50 while every other logit stays
    far below (random 32-dimensional directions: |cos| well under 0.5). The chain starts at the
    generation prompt's last token (the newline after ``assistant``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    save_tiny_llama(path, tokenizer, seed=5)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt_end = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    last = tokenizer(prompt_end, add_special_tokens=False)["input_ids"][-1]
    chain = [last, *tokenizer(reply, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "the script must not repeat a token"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight  # (V, H)
        head = model.lm_head.weight  # (V, H)
        head.mul_(0.01)
        for cur, nxt in zip(chain, chain[1:], strict=False):
            h = emb[cur] / emb[cur].pow(2).mean().add(model.config.rms_norm_eps).sqrt()
            head[nxt] = 50.0 * h / h.dot(h)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def scripted_chat_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_scripted_llama(tmp_path_factory.mktemp("scripted") / "llama", smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-chat") / "tiny-llama", smollm2_tokenizer)


@pytest.fixture(scope="session")
def safety_cache(tmp_path_factory) -> Path:
    """A cache folder in which the refusal classifier is trained once for the session."""
    return tmp_path_factory.mktemp("secfwt-cache")


@pytest.fixture(scope="session")
def embedder():
    from secfwt.safety.sentence_embedding import SentenceEmbedder

    return SentenceEmbedder()


@pytest.fixture(scope="session")
def classifier_fit(embedder, safety_cache):
    """The refusal classifier on pyrit's real labels (about 30-60 s on 2 busy cores, once)."""
    from secfwt.safety.refusal_classifier import cached_refusal_classifier

    return cached_refusal_classifier(embedder, cache_dir=safety_cache / "safety")
