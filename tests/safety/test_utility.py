"""Held-out reply loss against Hugging Face's own causal-LM loss on the same tokens."""

from __future__ import annotations

import pytest
import torch

from secfwt.data.instructions import InstructionPairs
from secfwt.safety.chat_model import load_chat_model
from secfwt.safety.utility import chatterbot_held_out, held_out_reply_loss

PAIRS = InstructionPairs(
    prompts=("Hello", "What is your name?", "Do you like music?", "Tell me a joke", "Bye"),
    responses=(
        "Hi there!",
        "I am a bot.",
        "Yes, jazz mostly.",
        "Why did the cat sit? To rest.",
        "Bye!",
    ),
    systems=(None,) * 5,
)


def test_reply_loss_equals_hugging_face_loss(tiny_chat_dir):
    chat = load_chat_model(str(tiny_chat_dir), device=torch.device("cpu"))
    got = held_out_reply_loss(chat.model, chat.tokenizer, PAIRS, batch_size=2)
    # Reference: one batch of the five conversations, labels = the reply tokens and the
    # <|im_end|> after each (everything else -100); HF's loss is the token-weighted mean.
    tok = chat.tokenizer
    rows, labels = [], []
    for prompt, reply in zip(PAIRS.prompts, PAIRS.responses, strict=True):
        head = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        h = tok(head, add_special_tokens=False)["input_ids"]
        r = tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(h + r)
        labels.append([-100] * len(h) + r)
    width = max(map(len, rows))
    ids = torch.tensor([x + [2] * (width - len(x)) for x in rows])
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in rows])[:, None]).long()
    with torch.no_grad():
        ref = chat.model(input_ids=ids, attention_mask=mask, labels=lab).loss
    assert got.reply_tokens == int((lab != -100).sum())
    assert got.loss == pytest.approx(float(ref), rel=1e-5)


def test_chatterbot_held_out_is_the_split_of_a_job():
    held = chatterbot_held_out(rows=20, seed=0)
    assert len(held) == 20 and held == chatterbot_held_out(rows=20, seed=0)
    assert held != chatterbot_held_out(rows=20, seed=1)
