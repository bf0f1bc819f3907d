"""The measured choice between torch's int64 matmul and the float64 limbs (secfwt.mpc.ring_tuning).

In one process: both ways give torch's bits and the first product of each shape class records
the choice and both timings; forcing either way gives identical results for every kind of
product (general, a fixed right operand split once, an owner's narrow weights); the chooser
keeps the faster way only with its margin (driven by a scripted clock, not by timing real
products); the on-disk cache is keyed by machine and reused; a bad ``SECFWT_RING_MATMUL`` is
refused before any party starts. The same in real party processes is in
``test_ring_tuning_mpc.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
import torch

from secfwt.errors import ConfigError, ProtocolError
from secfwt.mpc import owned, ring, ring_tuning
from secfwt.mpc.ring import NARROW_BOUND, ring_matmul
from secfwt.mpc.ring_tuning import Kind, Method

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: The ways on the host; Method.DEVICE needs a device (test_device_way_* below).
HOST_WAYS = (Method.TORCH, Method.LIMBS)

#: Products above SMALL_WORK (so they are tuned), in distinct shape classes.
PRODUCTS = [
    ((64, 96), (96, 80)),  # 2-D
    ((3, 20, 96), (96, 80)),  # batched @ matrix
    ((2, 1, 32, 64), (3, 64, 48)),  # broadcast batch dims
]


def full_range(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(INT64_MIN, INT64_MAX, shape, dtype=torch.int64, generator=gen)


@pytest.fixture(autouse=True)
def fresh_choices() -> Iterator[None]:
    """Every test starts with no choice made and no cache, and leaves the process so."""
    ring_tuning.configure(forced=None, cache=None)
    yield
    ring_tuning._TUNER.clock = None
    ring_tuning.set_device(None)
    ring_tuning.configure(forced=None, cache=None)


def test_products_are_tuned() -> None:
    for sa, sb in PRODUCTS:
        assert ring_tuning.work(sa, sb) >= ring_tuning.SMALL_WORK, (sa, sb)


def test_first_product_measures_both_ways_and_records_the_choice() -> None:
    gen = torch.Generator().manual_seed(7)
    for sa, sb in PRODUCTS:
        a, b = full_range(sa, gen), full_range(sb, gen)
        expected = torch.matmul(a, b)
        assert torch.equal(ring_matmul(a, b), expected)  # measured: both ways ran and agreed
        assert torch.equal(ring_matmul(a, b), expected)  # the kept way
    recs = {r["example"]: r for r in ring_tuning.records()}
    assert len(recs) == len(PRODUCTS)  # one class each, named by its first product
    for sa, sb in PRODUCTS:
        rec = recs[ring_tuning._describe(sa, sb)]
        assert rec["kind"] == "general" and rec["source"] == "measured"
        assert rec["method"] in {m.value for m in Method}
        assert rec["torch_ms"] > 0 and rec["limbs_ms"] > 0 and rec["rounds"] >= 1
        assert rec["calls"] == 2
        cls = ring_tuning.ShapeClass.of(Kind.GENERAL, sa, sb)
        assert (rec["batch"], rec["m"], rec["k"], rec["n"]) == (cls.batch, cls.m, cls.k, cls.n)


@pytest.mark.parametrize(("threads", "clock"), [(1, "thread_time"), (2, "perf_counter")])
def test_one_thread_is_timed_on_its_cpu_time(threads: int, clock: str) -> None:
    """Party processes compute on one thread: its CPU time is not inflated by other processes
    taking the core; with torch's worker threads only wall time sees all the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(6)
        a, b = full_range((64, 96), gen), full_range((96, 80), gen)
        assert torch.equal(ring_matmul(a, b), torch.matmul(a, b))
    finally:
        torch.set_num_threads(before)
    (rec,) = ring_tuning.records()
    assert rec["clock"] == clock


def test_a_limb_result_that_differs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement compares both ways: a broken limb GEMM cannot slip into the choice."""
    real = ring.ring_matmul_limbs
    monkeypatch.setattr(ring, "ring_matmul_limbs", lambda a, b: real(a, b).add_(1))
    gen = torch.Generator().manual_seed(8)
    a, b = full_range(PRODUCTS[0][0], gen), full_range(PRODUCTS[0][1], gen)
    with pytest.raises(ProtocolError, match="disagree"):
        ring_matmul(a, b)


def _every_kind(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(result, torch's int64 product) for a general product, a fixed right operand (as the
    data owner and the dealer multiply a weight mask) and an owner's narrow weights."""
    a, b = full_range((64, 96), gen), full_range((96, 80), gen)
    w = torch.randint(-NARROW_BOUND + 1, NARROW_BOUND, (96, 80), generator=gen)
    fixed = owned._FixedRight(b)
    return [
        (ring_matmul(a, b), torch.matmul(a, b)),
        (fixed(a), torch.matmul(a, b)),
        (fixed(a), torch.matmul(a, b)),  # the kept way
        (owned._owner_product(a, w, narrow=True), torch.matmul(a, w)),
        (owned._owner_product(a, w, narrow=False), torch.matmul(a, w)),
    ]


@pytest.mark.parametrize("method", HOST_WAYS)
def test_forcing_either_way_gives_torchs_bits_for_every_kind(method: Method) -> None:
    with ring_tuning.forcing(method):
        results = _every_kind(torch.Generator().manual_seed(9))
        recs = ring_tuning.records()
    for got, expected in results:
        assert torch.equal(got, expected)
    assert {r["kind"] for r in recs} == {k.value for k in Kind}
    assert all(r["method"] == method.value and r["source"] == "forced" for r in recs)
    calls = {r["kind"]: r["calls"] for r in recs}
    assert calls == {"general": 2, "prepared": 2, "narrow": 1}  # the wide owner product: general
    assert ring_tuning.records() == []  # the choices before the block (none) are back


def test_forced_ways_agree_bit_for_bit() -> None:
    outs = {}
    for method in HOST_WAYS:
        with ring_tuning.forcing(method):
            outs[method] = [got for got, _ in _every_kind(torch.Generator().manual_seed(10))]
    for t, limbs in zip(outs[Method.TORCH], outs[Method.LIMBS], strict=True):
        assert torch.equal(t, limbs)


class ScriptedClock:
    """A clock that the products advance by the time scripted for each way."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = {m: 0 for m in HOST_WAYS}

    def __call__(self) -> float:
        return self.now

    def way(self, method: Method, seconds: float, out: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            self.now += seconds
            self.calls[method] = self.calls.get(method, 0) + 1
            return out.clone()

        return run


def _choose(
    torch_s: float, limbs_s: float, device_s: float | list[float] | None = None
) -> tuple[dict[str, object], ScriptedClock]:
    """One product of a new class, each way taking the scripted time; with ``device_s`` (one
    time, or one per run) a device is set and the product has a device way."""
    clock = ScriptedClock()
    ring_tuning._TUNER.clock = clock
    out = torch.arange(6).reshape(2, 3)
    devices: list[torch.device] = []
    times = iter(device_s if isinstance(device_s, list) else [])

    def on_device(dev: torch.device) -> torch.Tensor:
        devices.append(dev)
        seconds = next(times) if isinstance(device_s, list) else device_s or 0.0
        return clock.way(Method.DEVICE, seconds, out)()

    if device_s is not None:
        ring_tuning.set_device(torch.device("cpu"))
    ring_tuning.run(
        Kind.GENERAL,
        (512, 512),
        (512, 512),
        torch_fn=clock.way(Method.TORCH, torch_s, out),
        limbs_fn=clock.way(Method.LIMBS, limbs_s, out),
        device_fn=on_device,
    )
    assert all(d == torch.device("cpu") for d in devices)
    (rec,) = ring_tuning.records()
    return rec, clock


@pytest.mark.parametrize(
    ("torch_s", "limbs_s", "chosen", "rounds"),
    [
        (0.010, 0.100, Method.TORCH, 1),  # decisive at once
        (0.100, 0.010, Method.LIMBS, 1),
        (0.010, 0.0095, Method.TORCH, 3),  # limbs faster, but within the margin: torch stays
        (0.010, 0.0080, Method.LIMBS, 3),  # past the margin
    ],
)
def test_the_faster_way_is_kept_only_past_the_margin(
    torch_s: float, limbs_s: float, chosen: Method, rounds: int
) -> None:
    rec, clock = _choose(torch_s, limbs_s)
    assert rec["method"] == chosen.value and rec["rounds"] == rounds
    assert rec["torch_ms"] == pytest.approx(torch_s * 1e3)
    assert rec["limbs_ms"] == pytest.approx(limbs_s * 1e3)
    assert clock.calls == {Method.TORCH: rounds, Method.LIMBS: rounds}


def test_small_products_go_to_torch_unmeasured() -> None:
    clock = ScriptedClock()
    out = torch.zeros(2, 2, dtype=torch.int64)
    ring_tuning.run(
        Kind.GENERAL,
        (8, 8),
        (8, 8),
        torch_fn=clock.way(Method.TORCH, 1.0, out),
        limbs_fn=clock.way(Method.LIMBS, 1.0, out),
    )
    assert clock.calls == {Method.TORCH: 1, Method.LIMBS: 0} and ring_tuning.records() == []


def test_the_disk_cache_is_reused_on_the_same_machine_only(tmp_path) -> None:
    cache = tmp_path / "tuning.json"
    ring_tuning.configure(forced=None, cache=cache)
    rec, _ = _choose(0.100, 0.010)
    assert rec["method"] == "limbs" and rec["source"] == "measured"
    stored = json.loads(cache.read_text())["machines"]
    assert list(stored) == [ring_tuning.machine_key()]
    # a new process on this machine: the choice comes from the file, nothing is measured
    ring_tuning.configure(forced=None, cache=cache)
    rec, clock = _choose(0.010, 0.100)
    assert rec["method"] == "limbs" and rec["source"] == "cache"
    assert clock.calls == {Method.TORCH: 0, Method.LIMBS: 1}
    # another machine's entry (here: another thread count) is not used
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        ring_tuning.configure(forced=None, cache=cache)
        rec, clock = _choose(0.010, 0.100)
        assert rec["method"] == "torch" and rec["source"] == "measured"
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads(cache.read_text())["machines"]) == 2


def test_the_fixed_right_operand_is_split_only_while_the_limbs_win(monkeypatch) -> None:
    """Prepared limbs cost 24 bytes per element of the mask: kept when the limbs run (forced
    here), dropped again when the measurement picks torch (the clock charges the limbs 1 s)."""
    gen = torch.Generator().manual_seed(11)
    a, b = full_range((64, 96), gen), full_range((96, 80), gen)
    need = 3 * b.numel() * 8
    budget = owned._prepared_bytes
    with ring_tuning.forcing(Method.LIMBS):
        fixed = owned._FixedRight(b)
        assert torch.equal(fixed(a), torch.matmul(a, b))
        assert fixed.prepared is not None and owned._prepared_bytes == budget + need
        fixed._release()
    assert owned._prepared_bytes == budget
    clock = ScriptedClock()
    ring_tuning._TUNER.clock = clock
    real = owned.ring_matmul_prepared

    def slow_limbs(x: torch.Tensor, p: ring.PreparedRight) -> torch.Tensor:
        assert owned._prepared_bytes == budget + need  # split before the timing
        clock.now += 1.0
        return real(x, p)

    monkeypatch.setattr(owned, "ring_matmul_prepared", slow_limbs)
    fixed = owned._FixedRight(b)
    assert torch.equal(fixed(a), torch.matmul(a, b))
    assert ring_tuning.records()[0]["method"] == "torch"
    assert fixed.prepared is None and owned._prepared_bytes == budget


@pytest.mark.parametrize(
    ("value", "enabled", "forced"),
    [("1", True, None), ("", True, None), ("0", False, None), ("torch", True, Method.TORCH)]
    + [("LIMBS", True, Method.LIMBS), ("auto", True, None)],
)
def test_environment_settings(value: str, enabled: bool, forced: Method | None, tmp_path) -> None:
    env = {"SECFWT_RING_MATMUL": value, "SECFWT_RING_TUNING_CACHE": str(tmp_path / "c.json")}
    assert ring_tuning.settings_from_env(env) == (enabled, forced, tmp_path / "c.json")


def test_a_bad_setting_is_refused_before_any_party_starts(monkeypatch) -> None:
    from secfwt.mpc import launcher
    from secfwt.mpc.provider import Provider

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a party process was built")

    monkeypatch.setattr(launcher, "_party_process", no_process)
    monkeypatch.setenv("SECFWT_RING_MATMUL", "fast")
    with pytest.raises(ConfigError, match="SECFWT_RING_MATMUL='fast'"):
        launcher.run_parties(print, payloads={}, provider=Provider.TTP, timeout_s=5)


@pytest.mark.parametrize(
    ("torch_s", "device_s", "chosen", "rounds"),
    [
        (0.010, 0.001, Method.DEVICE, 2),  # decisive, but a device is timed twice at least
        (0.010, 0.0095, Method.TORCH, 3),  # within the margin: the host's torch stays
        (0.001, 0.010, Method.TORCH, 2),  # a device slower than the host is not used
    ],
)
def test_with_a_device_torch_is_timed_against_the_device_not_the_host_limbs(
    torch_s: float, device_s: float, chosen: Method, rounds: int
) -> None:
    rec, clock = _choose(torch_s, 0.0001, device_s)
    assert rec["method"] == chosen.value and rec["rounds"] == rounds
    assert rec["torch_ms"] == pytest.approx(torch_s * 1e3)
    assert rec["device_ms"] == pytest.approx(device_s * 1e3)
    assert rec["limbs_ms"] is None and rec["device"] == "cpu"
    assert clock.calls == {Method.TORCH: rounds, Method.LIMBS: 0, Method.DEVICE: rounds}


def test_a_device_result_that_differs_is_refused() -> None:
    ring_tuning.set_device(torch.device("cpu"))
    gen = torch.Generator().manual_seed(12)
    a, b = full_range(PRODUCTS[0][0], gen), full_range(PRODUCTS[0][1], gen)
    with pytest.raises(ProtocolError, match="on the device and torch's int64 matmul disagree"):
        ring_tuning.run(
            Kind.GENERAL,
            a.shape,
            b.shape,
            torch_fn=lambda: torch.matmul(a, b),
            limbs_fn=lambda: torch.matmul(a, b),
            device_fn=lambda dev: torch.matmul(a, b).add_(1),
        )


def test_forcing_the_device_way_gives_torchs_bits_for_every_kind() -> None:
    """The device way with the host standing in for the device: operands copied, limbs split
    there (a fixed mask once, an owner's narrow weights once), results copied back."""
    ring_tuning.set_device(torch.device("cpu"))
    with ring_tuning.forcing(Method.DEVICE):
        results = _every_kind(torch.Generator().manual_seed(9))
        recs = ring_tuning.records()
    for got, expected in results:
        assert torch.equal(got, expected)
    assert {r["kind"] for r in recs} == {k.value for k in Kind}
    assert all(r["method"] == "device" and r["source"] == "forced" for r in recs)
    assert all(r["device"] == "cpu" for r in recs)


def test_forcing_the_device_way_without_a_device_keeps_the_host_limbs() -> None:
    with ring_tuning.forcing(Method.DEVICE):
        results = _every_kind(torch.Generator().manual_seed(9))
        recs = ring_tuning.records()
    for got, expected in results:
        assert torch.equal(got, expected)
    assert all(r["method"] == "limbs" for r in recs)


def test_a_device_choice_in_the_cache_is_not_taken_without_the_device(tmp_path) -> None:
    cache = tmp_path / "tuning.json"
    ring_tuning.configure(forced=None, cache=cache)
    rec, _ = _choose(0.010, 0.100, 0.001)
    assert rec["method"] == "device"
    assert list(json.loads(cache.read_text())["machines"]) == [ring_tuning.machine_key()]
    assert ring_tuning.machine_key().endswith("| device: cpu")
    ring_tuning.set_device(None)  # another process with no device: its own key, measured
    ring_tuning.configure(forced=None, cache=cache)
    rec, _ = _choose(0.010, 0.100)
    assert rec["method"] == "torch" and rec["source"] == "measured"


def test_a_device_slow_only_at_its_first_product_is_still_chosen() -> None:
    """A device loads a shape's kernels at its first product: that run alone does not decide."""
    rec, _ = _choose(0.010, 1.0, [0.100, 0.001, 0.001])
    assert rec["method"] == "device" and rec["rounds"] == 2
    assert rec["device_ms"] == pytest.approx(1.0)
