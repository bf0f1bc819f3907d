"""Throughput and latency of the MPC transports, measured with real party processes.

``python -m secfwt.bench.transport [--mb 100] [--round-trips 200]`` runs, for gloo and TLS:

* ``all_reduce`` (SUM, int64) of an ``--mb`` MB tensor between the two computing parties,
  after one warm-up, best and median of ``--reps``; MB/s counts the tensor size once;
* a small-message round trip (8 bytes: model owner -> data owner -> model owner), median.

It prints one JSON line per transport with its full configuration and the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch

from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.transport import Transport
from secfwt.roles import Role

log = logging.getLogger(__name__)


def _party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any]:
    from secfwt.crypten_compat import crypten

    comm = crypten.communicator.get()
    n = int(payload["mb"] * 1e6) // 8
    x = torch.full((n,), ctx.role.rank + 1, dtype=torch.int64)
    comm.all_reduce(x)  # warm-up: connections, allocator
    times = []
    for _ in range(payload["reps"]):
        comm.barrier()
        t0 = time.perf_counter()
        out = comm.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if int(out[0]) != 3 or int(out[-1]) != 3:
        raise RuntimeError("all_reduce gave a wrong sum")
    small = torch.zeros(1, dtype=torch.int64)
    rtts = []
    comm.barrier()
    for i in range(payload["round_trips"]):
        t0 = time.perf_counter()
        if ctx.role is Role.MODEL_OWNER:
            comm.send(small + i, 1)
            small = comm.recv(small, 1)
        else:
            small = comm.recv(small, 0)
            comm.send(small, 0)
        rtts.append(time.perf_counter() - t0)
    return {"all_reduce_s": times, "rtt_s": rtts}


def measure(
    transport: Transport, *, mb: float = 100.0, reps: int = 3, round_trips: int = 200
) -> dict[str, Any]:
    """One benchmark run with ``transport``; returns its figures (model owner's view)."""
    from secfwt.mpc.provider import Provider
    from secfwt.runtime.simulate import machine_info  # lazily: party processes import this module

    payload = {"mb": mb, "reps": reps, "round_trips": round_trips}
    res = run_parties(
        _party,
        payloads={r: payload for r in (Role.MODEL_OWNER, Role.DATA_OWNER)},
        provider=Provider.TTP,
        timeout_s=900,
        transport=transport,
        comm_stats=False,
    )
    v = res[Role.MODEL_OWNER].value
    best = min(v["all_reduce_s"])
    return {
        "transport": transport.value,
        "config": payload,
        "all_reduce_best_s": best,
        "all_reduce_median_s": statistics.median(v["all_reduce_s"]),
        "all_reduce_MB_per_s": mb / best,
        "round_trip_median_us": 1e6 * statistics.median(v["rtt_s"]),
        "round_trip_p90_us": 1e6 * sorted(v["rtt_s"])[int(0.9 * len(v["rtt_s"]))],
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m secfwt.bench.transport", description=__doc__.splitlines()[0]
    )
    p.add_argument("--mb", type=float, default=100.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--round-trips", type=int, default=200)
    p.add_argument("--transport", choices=[t.value for t in Transport], action="append")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in args.transport or [t.value for t in Transport]:
        out = measure(Transport(name), mb=args.mb, reps=args.reps, round_trips=args.round_trips)
        print(json.dumps(out))  # the report is this command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
