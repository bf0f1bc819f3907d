"""The ``attention`` sub-benchmark: the softmax vs the RFA attention core across sequence lengths.

Each core runs in MPC at every length of the plan in the same party processes; the rows carry
time, bytes and error against the float64 plaintext core, and the least-squares growth exponents
of time and bytes in the sequence length summarise how each scales.
"""

from __future__ import annotations

from typing import Any

import torch

from secfwt.bench import metrics
from secfwt.bench.plan import BenchPlan
from secfwt.bench.runner import Runner, max_err, outputs, pick
from secfwt.models.spec import Attention
from secfwt.roles import Role


def attention(plan: BenchPlan, runner: Runner) -> dict[str, Any]:
    from secfwt.models.attention import (
        RFASettings,
        rfa_attention,
        rfa_projection,
        softmax_attention,
    )
    from secfwt.models.ops import PlainOps

    heads, dh, b = plan.attention_heads, plan.attention_head_dim, 1
    g = torch.Generator().manual_seed(plan.seed + 2)
    qkv = {
        t: [torch.randn(b, heads, t, dh, generator=g) for _ in range(3)]
        for t in plan.attention_seq_lens
    }
    out: dict[str, Any] = {
        "heads": heads,
        "head_dim": dh,
        "batch": b,
        "seq_lens": list(plan.attention_seq_lens),
        "rows": [],
        "exponents": {},
    }
    settings = RFASettings()
    w = rfa_projection(layer=0, head_dim=dh, settings=settings)
    for att in (Attention.SOFTMAX, Attention.RFA):
        common = {
            "case": "attention",
            "attention": att,
            "heads": heads,
            "head_dim": dh,
            "batch": b,
            "seq_lens": list(plan.attention_seq_lens),
            "reps": plan.reps,
        }
        res = runner.run(
            f"attention/{att.value}",
            f"attention core {att.value}, T={','.join(map(str, plan.attention_seq_lens))}",
            model_owner={},
            data_owner={"qkv": qkv},
            common=common,
        )
        rows_mo = res["values"][Role.MODEL_OWNER]["rows"]
        rows_do = res["values"][Role.DATA_OWNER]["rows"]
        for rm, rd in zip(rows_mo, rows_do, strict=True):
            t = rm["seq_len"]
            s = pick({Role.MODEL_OWNER: rm["costs"], Role.DATA_OWNER: rd["costs"]})
            q, k, v = (x.double() for x in qkv[t])
            mask = torch.ones(b, t, dtype=torch.float64)
            ref = (
                rfa_attention(PlainOps(), q, k, v, mask, w=w, settings=settings)
                if att is Attention.RFA
                else softmax_attention(PlainOps(), q, k, v, mask)
            )
            out["rows"].append(
                {
                    "attention": att.value,
                    "seq_len": t,
                    **s,
                    "max_abs_err": max_err(outputs(rd), ref),  # every repetition
                }
            )
        mine = [r for r in out["rows"] if r["attention"] == att.value]
        ts = [r["seq_len"] for r in mine]
        out["exponents"][att.value] = {
            "time": metrics.growth_exponent(ts, [r["time_s"] for r in mine]),
            "bytes": metrics.growth_exponent(ts, [r["bytes_sent_total"] for r in mine]),
        }
    return out


__all__ = ["attention"]
