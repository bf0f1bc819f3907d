"""Model shapes the benchmarks run on, with random weights (BERT initialisation) and inputs.

Synthetic weights are built as a real ``transformers`` BERT model with a tiny vocabulary (the
embedding table is never used: inputs are hidden states), so the plaintext reference is the
Hugging Face layer itself and the parameter names are the state-dict names secfwt uses.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

import torch

from secfwt.models.spec import Family, Head, ModelSpec


@dataclasses.dataclass(frozen=True)
class LayerShape:
    name: str
    hidden: int
    heads: int
    intermediate: int

    def describe(self) -> str:
        return (
            f"{self.name} (hidden {self.hidden}, {self.heads} heads, intermediate "
            f"{self.intermediate})"
        )


BERT_BASE = LayerShape("BERT-base", 768, 12, 3072)
MINILM = LayerShape("MiniLM-L6", 384, 12, 1536)
TINY = LayerShape("tiny", 64, 4, 128)

#: Whole models of ``fot-vs-full-ft`` by plan name: (layer shape, number of layers). MiniLM is
#: the packaged all-MiniLM-L6-v2's shape; tiny is for tests.
FULL_MODELS: dict[str, tuple[LayerShape, int]] = {
    "minilm": (MINILM, 6),
    "bert-base": (BERT_BASE, 12),
    "tiny": (TINY, 2),
}


def synthetic_model(
    shape: LayerShape,
    *,
    layers: int,
    head: Head,
    seed: int,
    max_positions: int = 512,
    num_labels: int = 2,
) -> tuple[ModelSpec, dict[str, torch.Tensor], torch.nn.Module]:
    """(spec, float32 state dict, the Hugging Face model in eval mode) with random weights."""
    import transformers as tf

    from secfwt.models.checkpoint import spec_from_model, state_dict_of

    # num_labels and attn_implementation are PretrainedConfig kwargs transformers does not type
    config: Any = tf.BertConfig(  # type: ignore[call-arg]
        hidden_size=shape.hidden,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        vocab_size=64,
        max_position_embeddings=max_positions,
        hidden_act="gelu",
        num_labels=num_labels,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = (
        tf.BertForSequenceClassification(config)
        if head is Head.SEQUENCE_CLASSIFICATION
        else tf.BertModel(config)
    )
    model.eval()
    return spec_from_model(model, family=Family.BERT, head=head), state_dict_of(model), model


def layer_names(spec: ModelSpec, layer: int) -> list[str]:
    pre = f"{spec.prefix}encoder.layer.{layer}."
    return [n for n, _ in spec.param_shapes if n.startswith(pre)]


def hidden_states(*, batch: int, seq_len: int, hidden: int, seed: int) -> torch.Tensor:
    """Stand-in hidden states (N, T, H): unit-variance rows, like a LayerNorm output."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq_len, hidden, generator=g)


def time_plaintext(fn: Any, *, reps: int, warmup: int = 2) -> dict[str, Any]:
    """Wall time of ``fn()`` under ``torch.no_grad`` with 1 thread and with every core.

    ``best_s`` is the fastest run over both settings (the most favourable plaintext figure, so
    ratios against it are conservative; the minimum is also the robust estimate on a machine
    shared with other work); ``by_threads`` keeps best and median per setting.
    """
    saved = torch.get_num_threads()
    by_threads: dict[int, dict[str, float]] = {}
    try:
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            with torch.no_grad():
                for _ in range(warmup):
                    fn()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            by_threads[threads] = {"best_s": min(times), "median_s": statistics.median(times)}
    finally:
        torch.set_num_threads(saved)
    best_threads = min(by_threads, key=lambda k: by_threads[k]["best_s"])
    return {
        "best_s": by_threads[best_threads]["best_s"],
        "threads": best_threads,
        "reps": reps,
        "by_threads": {str(k): v for k, v in by_threads.items()},
    }


def hf_layer_fn(model: Any, x: torch.Tensor) -> Any:
    """The plaintext float32 BERT layer 0 of a BertModel on x (N, T, H)."""
    layer = model.encoder.layer[0]
    return lambda: layer(x)
