"""The ``transport`` sub-benchmark: the same secure layer over gloo and over the TLS mesh.

A MiniLM-shaped layer with softmax attention, once per transport; the ratio is what TLS costs
over gloo end to end. :mod:`secfwt.bench.transport` measures the transports alone.
"""

from __future__ import annotations

from typing import Any

from secfwt.bench import metrics
from secfwt.bench.cases.layer import Layer
from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner
from secfwt.models.spec import Attention


def transport(plan: BenchPlan, runner: Runner, layers: dict[str, Layer]) -> dict[str, Any]:
    from secfwt.mpc.transport import Transport

    layer = layers.setdefault(
        "transport", Layer(plan, plan.transport_shape, plan.transport_seq_len)
    )
    cases = [
        layer.run(runner, engine="secfwt", attention=Attention.SOFTMAX, transport=tr)
        for tr in (Transport.GLOO, Transport.TLS)
    ]
    for c, tr in zip(cases, (Transport.GLOO, Transport.TLS), strict=True):
        c["transport"] = tr.value
    return {
        "cases": cases,
        "tls_vs_gloo_time_ratio": metrics.ratio(cases[1]["time_s"], cases[0]["time_s"]),
    }


__all__ = ["transport"]
