"""Shared test helpers: the packaged checkpoint, the SmolLM2 tokenizer, and tiny random checkpoints
saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer with its chat template, from the packaged folder."""
    from transformers import AutoTokenizer

    from secfwt.models.checkpoint import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("packaged:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer with its chat template (once per session)."""
    return load_smollm2_tokenizer()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from secfwt.models.checkpoint import resolve_model_path

    return resolve_model_path("packaged:all-minilm-l6-v2")


def save_random_checkpoint(
    path: Path, *, family: str, head: str, seed: int = 0, **overrides
) -> Path:
    """A tiny BERT/RoBERTa checkpoint with random weights, written with save_pretrained."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    base = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 400,
        "max_position_embeddings": 80,
    }
    base.update(overrides)
    cfg_cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
    config = cfg_cls(**base)
    name = {
        "base": "Model",
        "masked_lm": "ForMaskedLM",
        "sequence_classification": "ForSequenceClassification",
    }[head]
    model_cls = getattr(tf, ("Bert" if family == "bert" else "Roberta") + name)
    model = model_cls(config)
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_bert_cls(tmp_path: Path) -> Path:
    return save_random_checkpoint(
        tmp_path / "tiny-bert", family="bert", head="sequence_classification"
    )


def save_tiny_with_tokenizer(
    path: Path, *, family: str = "bert", head: str = "sequence_classification", **overrides
) -> Path:
    """A tiny random checkpoint that carries the packaged MiniLM tokenizer (vocab 30522)."""
    import shutil

    from secfwt.models.checkpoint import resolve_model_path

    save_random_checkpoint(path, family=family, head=head, vocab_size=30522, **overrides)
    src = resolve_model_path("packaged:all-minilm-l6-v2")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, path / name)
    return path


def data_owner_result(party, payload: dict, *, timeout_s: float = 300):
    """Run ``party`` in real model- and data-owner processes (TTP dealer), both given the same
    test payload (each shares only its own part), and return the data owner's value."""
    from secfwt.mpc.launcher import run_parties
    from secfwt.mpc.provider import Provider
    from secfwt.roles import Role

    both = {Role.MODEL_OWNER: payload, Role.DATA_OWNER: payload}
    results = run_parties(party, payloads=both, provider=Provider.TTP, timeout_s=timeout_s)
    return results[Role.DATA_OWNER].value


TINY_JOB = """
[job]
name = "tiny"
seed = 3
[model]
path = "{path}"
max_length = 16
[data]
shots_per_class = 4
eval_per_class = 5
[zo]
steps = 3
batch_size = 8
directions = 2
[run]
timeout_s = 600
output_dir = "{out}"
[[disclosure]]
value = "embedding_table"
to = ["data_owner"]
[[disclosure]]
value = "eval_accuracy"
to = ["data_owner", "model_owner"]
[[disclosure]]
value = "range_check"
to = ["data_owner", "model_owner"]
[[disclosure]]
value = "train_loss"
to = ["data_owner"]
[[disclosure]]
value = "final_parameters"
to = ["data_owner"]
"""


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory) -> Path:
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-bert-tok")


def write_tiny_job(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    p = tmp_path / "job.toml"
    p.write_text(TINY_JOB.format(path=model_dir, out=tmp_path / "runs") + extra)
    return p


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as a Hugging Face folder (converted once, then cached)."""
    from secfwt.models.checkpoint import resolve_model_path

    return resolve_model_path("packaged:smollm2-135m-instruct")


def save_random_decoder(path: Path, *, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny Llama/Qwen2/Mistral causal LM with random weights, written with save_pretrained.

    Defaults: 2 layers, 4 query heads sharing 2 key/value heads (GQA), untied LM head. Weights are
    scaled up from the init's 0.02 so that attention and the gated MLP are far from linear.
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    base = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "vocab_size": 300,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "initializer_range": 0.2,
    }
    base.update(overrides)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    model = model_cls(config_cls(**base))
    with torch.no_grad():  # RMSNorm weights away from 1, so the test sees them applied
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def save_tiny_chat_decoder(path: Path, tokenizer, *, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer and chat template (its 49,152-token
    vocabulary, so the loss runs over a real vocabulary), tied head unless overridden."""
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 48,
        "tie_word_embeddings": True,
    }
    save_random_decoder(path, seed=seed, **{**settings, **overrides})
    tokenizer.save_pretrained(path)
    return path


CHAT_JOB = """
[job]
name = "tiny-chat"
seed = 1
[model]
path = "{path}"
head = "causal_lm"
max_length = 40
response_window = 8
[data]
task = "instructions"
source = "chatterbot"
train_rows = 8
eval_rows = 4
truncate = "drop"
padding_side = "left"
[zo]
trainable = ["model.norm.weight"]
lora_modules = ["model.layers.1.self_attn.q_proj"]
lora_rank = 2
steps = 2
batch_size = 2
directions = 1
lr = 0.05
eps = 0.01
[run]
timeout_s = 600
eval_batch = 4
output_dir = "{out}"
[[disclosure]]
value = "embedding_table"
to = ["data_owner"]
[[disclosure]]
value = "eval_loss"
to = ["data_owner", "model_owner"]
[[disclosure]]
value = "range_check"
to = ["data_owner", "model_owner"]
[[disclosure]]
value = "train_loss"
to = ["data_owner"]
[[disclosure]]
value = "final_parameters"
to = ["data_owner"]
"""


def write_chat_job(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    p = tmp_path / "chat-job.toml"
    p.write_text(CHAT_JOB.format(path=model_dir, out=tmp_path / "runs") + extra)
    return p


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """:func:`save_tiny_chat_decoder` once per session (2 layers, tied head)."""
    return save_tiny_chat_decoder(tmp_path_factory.mktemp("chat") / "tiny-chat", smollm2_tokenizer)


class DataOwnerKiller:
    """``on_progress`` callback of ``run_simulation``: SIGKILLs the data owner's process once,
    when it reports a checkpoint (of step ``at_step``, or its first one); ``killed`` holds the
    pid."""

    def __init__(self, at_step: int | None = None) -> None:
        self.at_step = at_step
        self.killed: list[int] = []

    def __call__(self, role, msg: dict) -> None:
        import multiprocessing
        import signal

        from secfwt.roles import Role

        if role is not Role.DATA_OWNER or msg.get("kind") != "checkpoint" or self.killed:
            return
        if self.at_step is not None and msg["step"] != self.at_step:
            return
        for p in multiprocessing.active_children():
            if p.name == f"secfwt-{Role.DATA_OWNER.value}":
                os.kill(p.pid, signal.SIGKILL)
                self.killed.append(p.pid)
