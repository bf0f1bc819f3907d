"""``secfwt bench``: the benchmark suite, run in one process tree on one machine.

Every sub-benchmark starts real party processes (model owner, data owner, dealer; TTP provider;
gloo on loopback unless it compares transports) through :func:`secfwt.mpc.launcher.run_parties`
and collects per party: wall time of the measured section, bytes sent and received, rounds,
dealer traffic, peak RSS (:mod:`secfwt.bench.probe`). Link times are projected with
:func:`secfwt.bench.metrics.project` (modelled, not measured under an emulated link).

Sub-benchmarks (:class:`BenchName`) and what they compare:

* ``forward``: plaintext torch vs secfwt's secure forward of a BERT-base-shaped layer
  (softmax and RFA attention) and of the packaged MiniLM (all 6 layers, softmax);
* ``attention``: the softmax vs the RFA attention core in MPC across sequence lengths, with the
  least-squares growth exponents of time and bytes;
* ``fot-vs-backprop``: one secfwt SPSA step vs one CrypTen autograd + SGD step, same layers,
  batch, sequence length and trainable parameters (see
  :mod:`secfwt.bench.cases.fot_vs_backprop`);
* ``fot-vs-full-ft``: SecFwT's pairing, one forward-only tuning iteration (ZO step and CMA-ES
  iteration) vs one iteration of MPC full fine-tuning (every weight secret, CrypTen autograd +
  SGD) of the same whole model (see :mod:`secfwt.bench.cases.fot_vs_full_ft`);
* ``vanilla``: the BERT-base-shaped layer in vanilla CrypTen 0.4.1 vs secfwt's engine;
* ``transport``: the same secure layer over gloo and over the TLS mesh;
* ``decoder``: the packaged SmolLM2-135M-Instruct's secure forward vs plaintext, and one ZO step
  of the example instruction-tuning job (:mod:`secfwt.bench.cases.decoder`);
* ``time-to-target``: time and bytes to the same held-out accuracy gain (+10 points), secfwt's
  default job against MPC backprop of the top layer + head and of the full model: steps from
  plaintext twins, costs per step and one-time costs measured in MPC
  (:mod:`secfwt.bench.cases.time_to_target`);
* ``safe-delta``: Safe Delta on secret shares for the example job's adapter (576 x 576), checked
  against the float64 layer algorithm (:mod:`secfwt.bench.cases.safe_delta`).

Every run also times the layer's int64 products on this machine, torch's kernel against secfwt's
float64 limbs, and reports how each party process chose between them (:mod:`secfwt.bench.gemm`).

This module only dispatches and assembles the report: the plan is :mod:`secfwt.bench.plan`, the
party runs :mod:`secfwt.bench.runner`, each sub-benchmark a module of :mod:`secfwt.bench.cases`,
and the machine and code details :mod:`secfwt.bench.provenance`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from secfwt.bench import gemm, metrics
from secfwt.bench.cases.attention import attention
from secfwt.bench.cases.decoder import decoder
from secfwt.bench.cases.forward import forward
from secfwt.bench.cases.fot_vs_backprop import fot_vs_backprop
from secfwt.bench.cases.fot_vs_full_ft import fot_vs_full_ft
from secfwt.bench.cases.layer import Layer
from secfwt.bench.cases.safe_delta import safe_delta
from secfwt.bench.cases.time_to_target import time_to_target
from secfwt.bench.cases.transport import transport
from secfwt.bench.cases.vanilla import vanilla
from secfwt.bench.plan import BenchName, BenchPlan
from secfwt.bench.provenance import code_fingerprint, cpu_info, cpu_seconds, load_average
from secfwt.bench.report import completed
from secfwt.bench.runner import CaseFailed, Runner, case_summary

log = logging.getLogger(__name__)

#: time-to-target's keys: MPC backprop (full model; ``top_layer_``: top layer + head) / secfwt's
#: default job, time and bytes to the same accuracy gain, measured and modelled on LAN and WAN
TIME_TO_TARGET_KEYS = tuple(
    f"{p}{what}_to_target_ratio"
    for p in ("", "top_layer_")
    for what in ("time", "bytes", "lan_time", "wan_time")
)
#: The report's top-level keys: every target's, issue 4's pairing (no target), time-to-target's
HEADLINE_KEYS = (
    *(t.key for t in metrics.TARGETS),
    "fot_vs_backprop_time_ratio",
    "fot_vs_backprop_bytes_ratio",
    *TIME_TO_TARGET_KEYS,
)


def run_suite(
    names: Sequence[BenchName], plan: BenchPlan, *, on_case: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the chosen sub-benchmarks; return the report (headline ratios at the top level)."""
    from secfwt.runtime.simulate import machine_info

    runner = Runner(plan, on_case=on_case)
    layers: dict[str, Layer] = {}
    code_before = code_fingerprint()
    load_before = load_average()
    cpu_before = cpu_seconds()
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # before the cases, as the machine was at start
    ring_machine = gemm.machine_timings(plan, device=runner.device)
    results: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    for name in names:
        t_bench = time.perf_counter()
        ran_before = set(runner.results())
        try:
            r = _run_benchmark(name, plan, runner, layers)
        except CaseFailed as exc:
            # a case's parties failed (killed for memory, timed out, raised): keep what this
            # sub-benchmark measured before it and go on with the next one
            log.info("bench: %s failed: %s", name.value, exc)
            r = _failed(exc, runner, ran_before)
            failed.append({"benchmark": name.value, **r["failure"]})
        r["duration_s"] = time.perf_counter() - t_bench
        results[name.value] = r
    headline = _headline(completed(results))
    (busy0, own0), (busy1, own1) = cpu_before, cpu_seconds()
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0))
    machine = {
        **machine_info(),
        **cpu_info(),
        "load_average_at_start": load_before,
        "other_cpu_s": other,
    }
    report: dict[str, Any] = {
        **headline,
        "targets": [
            {
                "key": t.key,
                "text": t.text,
                "threshold": t.threshold,
                "at_least": t.at_least,
                "value": headline[t.key],
                "passed": t.passed(headline[t.key]),
            }
            for t in metrics.TARGETS
        ],
        "benchmarks": results,
        # sub-benchmarks that stopped at a failed case, and cases that failed within one that
        # went on (fot-vs-full-ft's baseline): the run is incomplete when either is non-empty
        "failed_benchmarks": failed,
        "failed_cases": [f.summary for f in runner.failures],
        "ring_matmul": {"machine": ring_machine, "choices": gemm.choices(runner.results())},
        "selected": [n.value for n in names],
        "quick": plan.quick,
        "plan": plan.to_dict(),
        "links": {
            link.name: {"bandwidth_bps": link.bandwidth_bps, "rtt_s": link.rtt_s}
            for link in metrics.LINKS
        },
        "projection": (
            "modelled: max_p wall_p + (max_p sent_p + max_p dealer_p) * 8 / bandwidth "
            "+ (max_p rounds_p + max_p dealer_requests_p) * RTT"
        ),
        "provider": "TTP (dealer process)",
        "machine": machine,
        "commit": machine.get("commit"),
        "code": {
            **code_before,
            "changed_during_run": code_fingerprint()["sha256"] != code_before["sha256"],
        },
        "started": started,
        "duration_s": time.perf_counter() - t0,
    }
    return report


def _run_benchmark(
    name: BenchName, plan: BenchPlan, runner: Runner, layers: dict[str, Layer]
) -> dict[str, Any]:
    # the sub-benchmarks that share the secure layer's cases take ``layers``
    with_layers = {
        BenchName.FORWARD: forward,
        BenchName.VANILLA: vanilla,
        BenchName.TRANSPORT: transport,
    }
    if name in with_layers:
        return with_layers[name](plan, runner, layers)
    alone = {
        BenchName.ATTENTION: attention,
        BenchName.FOT_VS_BACKPROP: fot_vs_backprop,
        BenchName.FOT_VS_FULL_FT: fot_vs_full_ft,
        BenchName.DECODER: decoder,
        BenchName.SAFE_DELTA: safe_delta,
        BenchName.TIME_TO_TARGET: time_to_target,
    }
    return alone[name](plan, runner)


def _failed(exc: CaseFailed, runner: Runner, ran_before: set[str]) -> dict[str, Any]:
    """A failed sub-benchmark's entry: the failed case and its error, and the summaries of the
    cases it had completed."""
    done = [v for k, v in runner.results().items() if k not in ran_before]
    summary = exc.summary
    return {
        "failure": {"case": summary.pop("label"), **summary},
        "completed_cases": [case_summary(v) for v in done if _has_costs(v)],
    }


def _has_costs(result: dict[str, Any]) -> bool:
    return all("costs" in v for v in result["values"].values())


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    fot = results.get(BenchName.FOT_VS_BACKPROP.value, {})
    full = results.get(BenchName.FOT_VS_FULL_FT.value, {})
    att = results.get(BenchName.ATTENTION.value, {}).get("exponents", {}).get("rfa", {})
    tta = results.get(BenchName.TIME_TO_TARGET.value, {})
    return {
        **{k: tta.get(k) for k in TIME_TO_TARGET_KEYS},
        "fot_vs_backprop_time_ratio": fot.get("fot_vs_backprop_time_ratio"),
        "fot_vs_backprop_bytes_ratio": fot.get("fot_vs_backprop_bytes_ratio"),
        "fot_vs_full_ft_time_ratio": full.get("fot_vs_full_ft_time_ratio"),
        "fot_vs_full_ft_bytes_ratio": full.get("fot_vs_full_ft_bytes_ratio"),
        "vs_vanilla_crypten_ratio": results.get(BenchName.VANILLA.value, {}).get(
            "vs_vanilla_crypten_ratio"
        ),
        "vs_plaintext_ratio": results.get(BenchName.FORWARD.value, {}).get("vs_plaintext_ratio"),
        "rfa_time_growth_exponent": att.get("time"),
        "rfa_bytes_growth_exponent": att.get("bytes"),
    }


__all__ = ["HEADLINE_KEYS", "run_suite"]
