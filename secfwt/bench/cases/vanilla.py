"""The ``vanilla`` sub-benchmark: the BERT-base-shaped layer in vanilla CrypTen vs secfwt's engine.

Both run the softmax layer with the same dealer, transport and threads; what "vanilla" undoes is
stated in the report (``definition``) and set up by :mod:`secfwt.bench.vanilla`.
"""

from __future__ import annotations

from typing import Any

from secfwt.bench import metrics
from secfwt.bench.cases.layer import Layer
from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner
from secfwt.models.spec import Attention


def vanilla(plan: BenchPlan, runner: Runner, layers: dict[str, Layer]) -> dict[str, Any]:
    layer = layers.setdefault("main", Layer(plan, plan.layer, plan.layer_seq_len))
    secfwt = layer.run(runner, engine="secfwt", attention=Attention.SOFTMAX)
    vanilla = layer.run(runner, engine="vanilla", attention=Attention.SOFTMAX)
    return {
        "definition": (
            "vanilla = CrypTen 0.4.1's own ops (cryptensor matmul, softmax, "
            "LayerNorm from mean/var/inv_sqrt, "
            "GELU in tanh form with CrypTen's tanh), every weight secret-shared, "
            "and SECFWT_RING_MATMUL=0 in every process, "
            "dealer included: CrypTen's int64 matmul, Beaver protocol, gloo collectives, "
            "torch random draws and validating "
            "__getattribute__; same TTP dealer, gloo, 1 thread per party. "
            "Not undone (no effect on speed): exact fixed-point "
            "decode, onnx stub, transport shim."
        ),
        "cases": [secfwt, vanilla],
        "vs_vanilla_crypten_ratio": metrics.ratio(vanilla["time_s"], secfwt["time_s"]),
        "vs_vanilla_bytes_ratio": metrics.ratio(
            vanilla["bytes_sent_total"], secfwt["bytes_sent_total"]
        ),
        "seq_len": layer.seq_len,
    }


__all__ = ["vanilla"]
