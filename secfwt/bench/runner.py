"""Running one benchmark case in real party processes, and summarising what it cost.

:class:`Runner` starts the parties (gloo on loopback unless a case names another transport, TTP
dealer) and memoises each case within one suite run, so sub-benchmarks that share a case (the
BERT-base layer of ``forward`` and ``vanilla``) run it once. A case whose parties fail (a party
killed for memory, a timeout, an error inside a party) is recorded in :attr:`Runner.failures`
and raised as :class:`CaseFailed`, so that the suite can report it and go on with the next
sub-benchmark instead of losing every result of the run. The summaries turn the parties'
per-repetition costs into the rows of the report: fastest repetition, totals, link projections.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from secfwt.bench import metrics
from secfwt.bench.plan import BenchPlan
from secfwt.errors import ConfigError, ProtocolError, SecfwtError
from secfwt.mpc import device as mpc_device
from secfwt.roles import Role


class CaseFailed(ProtocolError):
    """A benchmark case's parties failed; ``label`` names the case, ``cause`` is the parties'
    error (a :class:`~secfwt.errors.PartyFailedError`, a timeout, a party's own error)."""

    def __init__(self, label: str, cause: SecfwtError) -> None:
        super().__init__(str(cause))
        self.label = label
        self.cause = cause

    @property
    def summary(self) -> dict[str, str]:
        """The failure as the report lists it."""
        return {"label": self.label, "error": type(self.cause).__name__, "message": str(self)}


class Runner:
    """Runs cases in party processes, memoises them within one suite run, reports progress."""

    def __init__(
        self,
        plan: BenchPlan,
        *,
        on_case: Callable[[str], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.plan = plan
        self.on_case = on_case or (lambda label: None)
        self.timeout_s = timeout_s or plan.timeout_s
        self.device = mpc_device.resolve(plan.device, field="device")
        self._memo: dict[str, dict[str, Any]] = {}
        #: every case whose parties failed in this suite run, in order
        self.failures: list[CaseFailed] = []
        self._failed: dict[str, CaseFailed] = {}

    def run(
        self,
        key: str,
        label: str,
        *,
        model_owner: dict[str, Any],
        data_owner: dict[str, Any],
        common: dict[str, Any],
        transport: Any = None,
        vanilla: bool = False,
    ) -> dict[str, Any]:
        """Run one case (or return its result from earlier in this suite run).

        Raises :class:`CaseFailed` when the case's parties fail, after recording it in
        :attr:`failures`; a case that failed earlier in this suite run raises it again without
        running. A :class:`~secfwt.errors.ConfigError` is the plan's fault: it is raised as it
        is and not recorded.
        """
        if key in self._memo:
            return self._memo[key]
        if key in self._failed:
            raise self._failed[key]
        from secfwt.bench.party import bench_party
        from secfwt.bench.vanilla import vanilla_engine_env
        from secfwt.mpc.launcher import run_parties
        from secfwt.mpc.provider import Provider
        from secfwt.mpc.transport import Transport

        self.on_case(label)
        env = vanilla_engine_env() if vanilla else contextlib.nullcontext()
        t0 = time.perf_counter()
        try:
            with env:
                res = run_parties(
                    bench_party,
                    payloads={
                        Role.MODEL_OWNER: {**common, **model_owner, "vanilla": vanilla},
                        Role.DATA_OWNER: {**common, **data_owner, "vanilla": vanilla},
                    },
                    provider=Provider.TTP,
                    timeout_s=self.timeout_s,
                    transport=transport or Transport.GLOO,
                    device=self.device,
                    timeout_setting="the bench plan's timeout_s (--set timeout_s=SECONDS)",
                )
        except ConfigError:
            raise
        except SecfwtError as exc:
            failure = self._failed[key] = CaseFailed(label, exc)
            self.failures.append(failure)
            raise failure from exc
        out = {
            "label": label,
            "process_wall_s": time.perf_counter() - t0,
            "values": {r: res[r].value for r in (Role.MODEL_OWNER, Role.DATA_OWNER)},
            # how each party process (the dealer's too) ran its int64 matmuls
            "ring_matmul": {r.value: p.ring_matmul for r, p in res.items()},
        }
        self._memo[key] = out
        return out

    def results(self) -> dict[str, dict[str, Any]]:
        """Every case run so far in this suite run, by key, in the order they ran."""
        return dict(self._memo)


def summarise(
    costs: dict[Role, dict[str, Any]], rss: dict[Role, float] | None = None
) -> dict[str, Any]:
    """Per-party costs, totals and link projections of one measured section."""
    parties = {r.value: {**c, **({"peak_rss_mb": rss[r]} if rss else {})} for r, c in costs.items()}
    pc = [metrics.PartyCost.from_dict(c) for c in costs.values()]
    parties[Role.DEALER.value] = dealer_cost(costs.values())
    return {
        "parties": parties,
        "time_s": max(p.wall_s for p in pc),
        "bytes_sent_total": sum(p.bytes_sent for p in pc),
        "dealer_bytes": sum(p.dealer_bytes for p in pc),
        "rounds": max(p.rounds for p in pc),
        "projected_s": metrics.projections(pc),
        "machine_busy_s": machine_busy(costs.values()),
    }


def machine_busy(costs: Iterable[Mapping[str, Any]]) -> float | None:
    """CPU seconds the whole machine was busy in a measured section (every process on every
    core), as the slower party measured it (its window holds the other's); None where a party
    could not measure it (off Linux) or a summary predates the count."""
    slower = max(costs, key=lambda c: c["wall_s"])
    busy = slower.get("machine_busy_s")
    return None if busy is None else float(busy)


def dealer_cost(costs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The dealer's traffic in a measured section, counted at the other end of each of its
    messages (the dealer has no sections of its own): what it sent is what the computing
    parties received from it, what it received their requests."""
    costs = list(costs)
    return {
        "bytes_sent": sum(int(c.get("dealer_bytes", 0)) for c in costs),
        "bytes_received": sum(int(c.get("dealer_sent", 0)) for c in costs),
        "requests": sum(int(c.get("dealer_requests", 0)) for c in costs),
    }


def best_rep(costs: dict[Role, list[dict[str, Any]]], among: Sequence[int] | None = None) -> int:
    """Index of the repetition whose slower party was fastest (of those in ``among``)."""
    n = min(len(c) for c in costs.values())
    reps = range(n) if among is None else among
    return min(reps, key=lambda i: max(c[i]["wall_s"] for c in costs.values()))


def pick(
    costs: dict[Role, list[dict[str, Any]]],
    rss: dict[Role, float] | None = None,
    among: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The summary of the fastest repetition (of those in ``among``: e.g. the ones whose result
    was right), with its index, every repetition's time and the first's."""
    i = best_rep(costs, among)
    chosen = {r: {k: v for k, v in c[i].items() if k != "breakdown"} for r, c in costs.items()}
    s = summarise(chosen, rss)
    s["rep"] = i
    s["reps"] = len(next(iter(costs.values())))
    s["time_s_all_reps"] = [max(c[j]["wall_s"] for c in costs.values()) for j in range(s["reps"])]
    # the first repetition also pays one-time costs (e.g. frozen weights' masks, sent once)
    s["first_rep"] = {
        "time_s": s["time_s_all_reps"][0],
        "bytes_sent_total": sum(c[0]["bytes_sent"] for c in costs.values()),
    }
    if "breakdown" in costs[Role.MODEL_OWNER][i]:
        s["breakdown"] = costs[Role.MODEL_OWNER][i][
            "breakdown"
        ]  # the model owner's view (it also waits for the dealer)
    data_owner = costs.get(Role.DATA_OWNER)
    if data_owner and "breakdown" in data_owner[i]:
        s["breakdown_data_owner"] = data_owner[i]["breakdown"]  # for its CPU per class
    return s


def case_summary(result: dict[str, Any], among: Sequence[int] | None = None) -> dict[str, Any]:
    """The summary of one case's result from :meth:`Runner.run`, labelled: its fastest
    repetition (of those in ``among``)."""
    vals = result["values"]
    s = pick(
        {r: v["costs"] for r, v in vals.items()},
        {r: v["peak_rss_mb"] for r, v in vals.items()},
        among,
    )
    s["label"] = result["label"]
    return s


def max_err(
    secure: torch.Tensor | Sequence[torch.Tensor | None] | None, ref: torch.Tensor
) -> float | None:
    """Largest absolute difference from the reference, over every repetition's output when
    given a list (:func:`outputs`); None when an output stayed secret."""
    each = list(secure) if isinstance(secure, Sequence) else [secure]
    if not each or any(y is None for y in each):
        return None
    return max(float((y.double() - ref.double()).abs().max()) for y in each if y is not None)


def outputs(values: Mapping[str, Any]) -> list[Any]:
    """A party's revealed output of each repetition (``output_each_rep``), or its one output."""
    return list(values.get("output_each_rep") or [values.get("output")])


__all__ = [
    "Runner",
    "best_rep",
    "case_summary",
    "dealer_cost",
    "machine_busy",
    "max_err",
    "outputs",
    "pick",
    "summarise",
]
