"""The benchmark suite's pure arithmetic: link projections, growth exponents, targets."""

from __future__ import annotations

import math

import pytest

from secfwt.bench import metrics
from secfwt.bench.metrics import LAN, WAN, Link, PartyCost, growth_exponent, project


def test_projection_formula():
    a = PartyCost(
        wall_s=2.0,
        bytes_sent=3_000_000_000 // 8,
        bytes_received=0,
        rounds=100,
        dealer_bytes=0,
        dealer_requests=10,
    )
    b = PartyCost(wall_s=2.5, bytes_sent=1000, bytes_received=0, rounds=120)
    link = Link("test", bandwidth_bps=3e9, rtt_s=0.01)
    # 2.5 s compute (slower party) + 1 s of bytes (busier direction) + (120 + 10) rounds x 10 ms
    assert project([a, b], link) == pytest.approx(2.5 + 1.0 + 1.3)


def test_dealer_bytes_add_to_the_link():
    p = PartyCost(
        wall_s=0.0,
        bytes_sent=0,
        bytes_received=0,
        rounds=0,
        dealer_bytes=12_500_000,
        dealer_requests=1,
    )
    assert project([p], WAN) == pytest.approx(1.0 + 0.08)  # 100 Mbit at 100 Mbps, one RTT


def test_links_are_the_issue_settings():
    assert (LAN.bandwidth_bps, LAN.rtt_s) == (3e9, 0.8e-3)
    assert (WAN.bandwidth_bps, WAN.rtt_s) == (100e6, 80e-3)
    assert metrics.projections([PartyCost(1.0, 0, 0, 0)]) == {"LAN": 1.0, "WAN": 1.0}


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0])
def test_growth_exponent_recovers_power_law(k):
    xs = [64, 128, 256, 512]
    assert growth_exponent(xs, [3.0 * x**k for x in xs]) == pytest.approx(k)


def test_growth_exponent_is_least_squares_on_noisy_data():
    xs = [64, 128, 256, 512]
    noise = [1.1, 0.9, 1.05, 0.95]
    ys = [0.01 * x * n for x, n in zip(xs, noise, strict=True)]
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / 4, sum(ly) / 4
    expected = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )
    assert growth_exponent(xs, ys) == pytest.approx(expected)
    assert 0.8 < expected < 1.2


def test_growth_exponent_needs_two_points():
    with pytest.raises(ValueError):
        growth_exponent([128], [1.0])
    with pytest.raises(ValueError):
        growth_exponent([128, 128], [1.0, 2.0])


def test_ratio_and_targets():
    assert metrics.ratio(10.0, 2.0) == 5.0
    assert metrics.ratio(None, 2.0) is None and metrics.ratio(1.0, 0) is None
    targets = {t.key: t for t in metrics.TARGETS}
    assert targets["fot_vs_full_ft_time_ratio"].passed(25.0) is True
    assert targets["fot_vs_full_ft_time_ratio"].passed(2.0) is False
    assert targets["fot_vs_full_ft_bytes_ratio"].passed(24.0) is False
    assert "fot_vs_backprop_time_ratio" not in targets  # issue 4's pairing: reported, no target
    # issue 19's engine targets: within 40x of plaintext, >= 8x faster than vanilla CrypTen
    assert targets["vs_plaintext_ratio"].passed(39.0) is True
    assert targets["vs_plaintext_ratio"].passed(54.0) is False  # today's machine type: missed
    assert targets["vs_vanilla_crypten_ratio"].passed(8.5) is True
    assert targets["vs_vanilla_crypten_ratio"].passed(3.0) is False
    assert targets["vs_plaintext_ratio"].passed(None) is None


@pytest.mark.parametrize(
    ("other_cpu_s", "expected"),
    [
        (1.0, "(1% of one core): the machine was otherwise idle"),
        (30.0, "(30% of one core): **other work shared the cores"),
        (None, "not measured"),
    ],
)
def test_the_report_judges_other_work_by_the_cpu_it_took(other_cpu_s, expected):
    from secfwt.bench.report import _load_note

    # the bench's own parties make the load average about 2 on any machine: only the CPU time
    # of other processes during the run says whether something else was running
    m = {
        "load_average_at_start": (0.1, 0.3, 0.4),
        "load_average_at_end": (2.3, 2.0, 1.5),
        "other_cpu_s": other_cpu_s,
    }
    assert expected in _load_note(m, duration_s=100.0)


def test_cpu_seconds_count_a_reaped_child_as_the_bench_s_own():
    import subprocess
    import sys

    from secfwt.bench.provenance import cpu_seconds

    busy0, own0 = cpu_seconds()
    # a reaped child's CPU is the bench's own (as the parties' are), not other work
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass",
        ],
        check=True,
    )
    busy1, own1 = cpu_seconds()
    assert own1 - own0 >= 1.0
    if busy0 is not None:
        assert busy1 - busy0 >= 1.0  # the machine-wide counter saw the same work


def _burn_a_second(ctx, payload):
    import time

    t = time.process_time()
    while time.process_time() - t < 1.0:
        pass


@pytest.mark.multiprocess
def test_cpu_seconds_count_the_parties_forked_from_the_fork_server_as_the_bench_s_own():
    """The parties' CPU is the bench's own although the fork server, not the bench, reaps them
    (and outlives the run)."""
    from secfwt.bench.provenance import cpu_seconds
    from secfwt.mpc.launcher import run_parties
    from secfwt.mpc.provider import Provider

    run_parties(_burn_a_second, payloads={}, provider=Provider.TFP, timeout_s=120)  # server up
    _, own0 = cpu_seconds()
    run_parties(_burn_a_second, payloads={}, provider=Provider.TFP, timeout_s=120)
    _, own1 = cpu_seconds()
    assert own1 - own0 >= 2.0  # two computing parties, a CPU second each


def _rep_cost(wall_s: float) -> dict:
    return {
        "wall_s": wall_s,
        "bytes_sent": 1000,
        "bytes_received": 1000,
        "rounds": 10,
        "dealer_bytes": 0,
        "dealer_sent": 0,
        "dealer_requests": 0,
    }


def _step_result(walls: list[float], losses: list[float]) -> dict:
    import torch

    from secfwt.roles import Role

    party = {"costs": [_rep_cost(w) for w in walls], "peak_rss_mb": 1.0, "trainable_numel": 5}
    return {
        "label": "baseline",
        "values": {
            Role.MODEL_OWNER: party,
            Role.DATA_OWNER: {
                **party,
                "output": torch.tensor(losses[-1]),
                "output_each_rep": [torch.tensor(v) for v in losses],
            },
        },
    }


def test_the_fastest_right_repetition_counts():
    """A backprop baseline's repetitions are independent trials: the fastest one whose loss is
    right counts, the wrong one is counted and the case is not called wrong; with no right
    repetition the case is wrong."""
    from secfwt.bench.cases.fot_vs_backprop import loss_row

    wrong: list[str] = []
    # repetition 1 (index 0) is the fastest but computed 3e8 (a truncation failure)
    s = loss_row(_step_result([1.0, 2.0, 1.5], [3e8, 0.95, 0.96]), 0.951, wrong)
    assert (s["rep"], s["time_s"], s["loss"], s["wrong_reps"]) == (2, 1.5, pytest.approx(0.96), 1)
    assert s["loss_each_rep"] == pytest.approx([3e8, 0.95, 0.96]) and wrong == []
    s = loss_row(_step_result([1.0, 2.0], [3e8, 5e7]), 0.951, wrong)
    assert (s["rep"], s["time_s"], s["wrong_reps"]) == (0, 1.0, 2) and wrong == ["baseline"]


def test_a_case_row_shows_how_many_cores_were_busy_and_the_forward_where_the_cpu_went():
    """The slower party's window counts (it holds the other's); the table shows busy CPU over
    the section's time; the forward section splits it into the owners' and the rest."""
    from secfwt.bench.report import _case_row, _cpu_split
    from secfwt.bench.runner import summarise
    from secfwt.roles import Role

    costs = {
        Role.MODEL_OWNER: {**_rep_cost(2.0), "cpu_s": 1.5, "machine_busy_s": 3.6},
        Role.DATA_OWNER: {**_rep_cost(1.9), "cpu_s": 1.25, "machine_busy_s": 3.3},
    }
    s = {**summarise(costs), "label": "layer"}
    assert s["machine_busy_s"] == 3.6
    assert "| 1.8 |" in _case_row(s)  # 3.6 CPU-s in 2.0 s
    assert _cpu_split(s) == [
        "CPU in the measured section of layer (2 s): model owner 1.5 s, data owner 1.25 s, "
        "the rest of the machine (the dealer, and any other work) 0.85 s; 3.6 CPU-s in all.",
        "",
    ]
    off_linux = {r: {**c, "machine_busy_s": None} for r, c in costs.items()}
    s = {**summarise(off_linux), "label": "layer"}
    assert s["machine_busy_s"] is None and _cpu_split(s) == []
    assert _case_row(s).count("| - |") == 2  # cores busy and max abs err


def test_the_fastest_cma_iteration_with_every_loss_right_counts():
    """CMA-ES repetitions are successive iterations, each with new candidates checked against
    their own float64 losses: a fast iteration with a wrong candidate loss does not count, and
    the report lists each iteration's reference."""
    import torch

    from secfwt.bench.cases.fot_vs_full_ft import _cma_row
    from secfwt.bench.report import _wrong_lines
    from secfwt.roles import Role

    cands = [torch.full((3, 1, 1), float(i)) for i in range(3)]  # (pop, P, H) per iteration
    losses = [torch.tensor([0.5, 0.6, 0.7]) + i for i in range(3)]  # candidate loss = 0.5.. + i
    losses[0][1] = 3e8  # the fastest iteration's second candidate: a truncation failure
    res = _step_result([1.0, 2.0, 1.5], [0.0, 0.0, 0.0])
    res["values"][Role.DATA_OWNER].update(output_each_rep=losses, candidates_each_rep=cands)

    def reference(c: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64) + float(c[0, 0, 0])

    wrong: list[str] = []
    s = _cma_row(res, reference, wrong)
    assert (s["rep"], s["time_s"], s["wrong_reps"], wrong) == (2, 1.5, 1, [])
    assert s["loss_reference"] == pytest.approx(2.6) and s["max_abs_err"] < 1e-6
    assert s["loss_reference_each_rep"] == pytest.approx([0.6, 1.6, 2.6])
    (line, _) = _wrong_lines({"cases": [s]})
    assert "1 of 3 repetitions computed a wrong loss" in line
    assert "float64 0.6, 1.6, 2.6); repetition 3, right, counts" in line
