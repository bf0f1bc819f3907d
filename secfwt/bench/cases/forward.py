"""The ``forward`` sub-benchmark: plaintext torch vs secfwt's secure forward.

A BERT-base-shaped layer (softmax and RFA attention, against ``transformers``' BertLayer) and the
packaged all-MiniLM-L6-v2 (all 6 layers, softmax, against ``transformers``' BertModel); the
headline is the secure softmax layer's time over the plaintext layer's.
"""

from __future__ import annotations

from typing import Any

import torch

from secfwt.bench import metrics
from secfwt.bench.cases.layer import Layer
from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner, case_summary, max_err, outputs
from secfwt.bench.shapes import time_plaintext
from secfwt.models.spec import Attention, Head
from secfwt.roles import Role


def forward(plan: BenchPlan, runner: Runner, layers: dict[str, Layer]) -> dict[str, Any]:
    layer = layers.setdefault("main", Layer(plan, plan.layer, plan.layer_seq_len))
    plain = layer.plaintext(plan.plaintext_reps)
    cases = [
        layer.run(runner, engine="secfwt", attention=a) for a in (Attention.SOFTMAX, Attention.RFA)
    ]
    cases.append(_minilm(plan, runner))
    soft = cases[0]
    return {
        "plaintext_layer": {
            **plain,
            "what": (
                "transformers BertLayer float32, torch.no_grad, "
                f"fastest of 1 thread and all cores ({plain['threads']})"
            ),
            "shape": layer.shape.describe(),
            "seq_len": layer.seq_len,
        },
        "cases": cases,
        "vs_plaintext_ratio": metrics.ratio(soft["time_s"], plain["best_s"]),
        "vs_plaintext_ratio_rfa": metrics.ratio(cases[1]["time_s"], plain["best_s"]),
        "vs_plaintext_seq_len": layer.seq_len,
    }


def _minilm(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    """The packaged all-MiniLM-L6-v2: embeddings LayerNorm + 6 layers from shared word
    embeddings."""
    from secfwt.models.checkpoint import load_checkpoint, resolve_model_path
    from secfwt.runtime.verify import sample_inputs

    model_dir = resolve_model_path("packaged:all-minilm-l6-v2")
    spec, state = load_checkpoint(model_dir, head=Head.BASE, num_labels=2, seed=plan.seed)
    t = plan.minilm_seq_len
    ids, _ = sample_inputs(model_dir, seq_len=t, vocab_size=spec.vocab_size, seed=plan.seed)
    word = state[spec.word_embeddings][
        ids
    ]  # (1, T, H): the data owner embeds locally (SecFwT's setting)
    names = [
        n for n, _ in spec.param_shapes if n != spec.word_embeddings and not n.startswith("pooler.")
    ]
    common = {
        "case": "secure_forward",
        "what": "encoder",
        "attention": Attention.SOFTMAX,
        "input_shape": tuple(word.shape),
        "param_names": names,
        "reps": plan.reps,
    }
    label = f"MiniLM-L6 (packaged, 6 layers) T={t}: secfwt softmax"
    res = runner.run(
        f"minilm/{t}",
        label,
        model_owner={"spec": spec, "state": state},
        data_owner={"input": word},
        common=common,
    )
    s = case_summary(res)
    import transformers as tf

    hf = tf.BertModel.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager"
    ).eval()
    mask = torch.ones(ids.shape, dtype=torch.long)
    plain = time_plaintext(
        lambda: hf(inputs_embeds=word, attention_mask=mask), reps=plan.plaintext_reps
    )
    with torch.no_grad():
        ref = hf(inputs_embeds=word, attention_mask=mask).last_hidden_state
    s.update(
        engine="secfwt",
        attention="softmax",
        shape="all-MiniLM-L6-v2 (packaged checkpoint, 6 layers, hidden 384)",
        seq_len=t,
        batch=1,
    )
    s["max_abs_err"] = max_err(outputs(res["values"][Role.DATA_OWNER]), ref)  # every repetition
    s["plaintext"] = plain
    s["vs_plaintext_ratio"] = metrics.ratio(s["time_s"], plain["best_s"])
    return s


__all__ = ["forward"]
