"""Generation plumbing on a tiny random Llama with the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import pytest
import torch

from secfwt.safety.chat_model import load_chat_model
from secfwt.safety.generation import (
    first_turn,
    generate_replies,
    prompt_token_ids,
    stop_token_ids,
)

PROMPTS = [
    "Hi",
    "Write a short poem about the sea and the wind, please.",
    "What is 2 + 2?",
    "Explain in detail how a bicycle gear system works, from the chain to the derailleur.",
    "Tell me a joke.",
]


@pytest.fixture(scope="module")
def chat(tiny_chat_dir):
    return load_chat_model(str(tiny_chat_dir), device=torch.device("cpu"))


def test_stop_tokens_are_smollm2_end_of_turn(smollm2_tokenizer):
    stops = stop_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.convert_ids_to_tokens(list(stops)) == ["<|im_end|>"]


def test_prompt_is_the_chat_template_with_generation_prompt(smollm2_tokenizer):
    ids = prompt_token_ids(smollm2_tokenizer, "Hello there")
    text = smollm2_tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system message


def _greedy_tokens(model, tokenizer, prompt: str, n: int) -> list[int]:
    """Reference: n greedy steps by a plain argmax loop over full forwards (no generate)."""
    ids = torch.tensor([prompt_token_ids(tokenizer, prompt)])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_unbatched_reply_matches_a_plain_greedy_loop(chat):
    ref = _greedy_tokens(chat.model, chat.tokenizer, PROMPTS[1], 12)
    stops = stop_token_ids(chat.tokenizer)
    assert not set(ref) & set(stops)  # the random model does not stop by itself here
    (reply,) = generate_replies(
        chat.model, chat.tokenizer, [PROMPTS[1]], max_new_tokens=12, batch_size=1
    )
    assert reply.n_tokens == 12 and not reply.stopped
    assert reply.text == chat.tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_batched_left_padded_equals_unbatched(chat):
    lengths = {len(prompt_token_ids(chat.tokenizer, p)) for p in PROMPTS}
    assert len(lengths) >= 4  # the batch really needs padding
    one = generate_replies(chat.model, chat.tokenizer, PROMPTS, max_new_tokens=10, batch_size=1)
    many = generate_replies(chat.model, chat.tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    assert [r.text for r in many] == [r.text for r in one]
    assert [r.n_tokens for r in many] == [r.n_tokens for r in one]


def test_generation_stops_at_end_of_turn(tiny_chat_dir, tmp_path, smollm2_tokenizer):
    """Swap the output rows of the k-th greedy token and <|im_end|>: the model then ends its turn
    exactly at step k, and the reply is the k tokens before it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    model.eval()
    prompt = PROMPTS[2]
    ref = _greedy_tokens(model, smollm2_tokenizer, prompt, 12)
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    (eot,) = stop_token_ids(smollm2_tokenizer)
    with torch.no_grad():
        w = model.lm_head.weight  # (V, H), untied in the tiny model
        w[[ref[k], eot]] = w[[eot, ref[k]]]
    (reply,) = generate_replies(model, smollm2_tokenizer, [prompt], max_new_tokens=12)
    assert reply.stopped and reply.n_tokens == k
    assert reply.text == smollm2_tokenizer.decode(ref[:k], skip_special_tokens=True).strip()


def test_only_the_first_assistant_turn_is_kept(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok(
        "Sure, here it is.<|im_end|>\n<|im_start|>user\nI'm sorry, I cannot do that<|im_end|>",
        add_special_tokens=False,
    )["input_ids"]
    reply = first_turn(tok, ids, stop_token_ids(tok))
    assert reply.text == "Sure, here it is." and reply.stopped
