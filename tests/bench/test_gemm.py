"""The bench's int64 matmul section (secfwt.bench.gemm): the machine's timings of the layer's
products every way, and the parties' choices gathered per shape class."""

from __future__ import annotations

import torch

from secfwt.bench.gemm import choices, machine_timings
from secfwt.bench.plan import BenchPlan
from secfwt.bench.shapes import LayerShape


def _rec(method: str, calls: int, torch_ms: float | None, limbs_ms: float | None, **cls):
    base = {"kind": "general", "batch": 1, "m": 128, "k": 1024, "n": 1024, **cls}
    source = "measured" if torch_ms is not None else "forced"
    return {
        **base,
        "method": method,
        "source": source,
        "example": f"[{base['m']}x{base['k']}]@[{base['k']}x{base['n']}]",
        "torch_ms": torch_ms,
        "limbs_ms": limbs_ms,
        "calls": calls,
    }


def test_choices_are_gathered_per_shape_class_over_cases_and_roles() -> None:
    results = {
        "case a": {
            "ring_matmul": {
                "model_owner": [_rec("torch", 5, 2.0, 30.0), _rec("limbs", 2, 9.0, 3.0, k=512)],
                "dealer": [_rec("torch", 3, 4.0, 20.0)],
            }
        },
        "case b": {"ring_matmul": {"data_owner": [_rec("limbs", 7, None, None)]}},
    }
    rows = choices(results)
    assert [(r["kind"], r["class"]["k"]) for r in rows] == [("general", 512), ("general", 1024)]
    big = rows[1]
    assert big["processes"] == {"torch": 2, "limbs": 1, "device": 0}
    assert big["calls"] == {"torch": 8, "limbs": 7, "device": 0}
    assert big["sources"] == ["forced", "measured"]
    assert big["torch_ms_median"] == 3.0 and big["limbs_ms_median"] == 25.0  # measured ones only
    assert rows[0]["processes"] == {"torch": 0, "limbs": 1, "device": 0}
    assert big["device_ms_median"] is None


def test_machine_timings_cover_the_layer_and_check_every_limb_result() -> None:
    plan = BenchPlan(quick=True, layer=LayerShape("small", 32, 2, 64), layer_seq_len=16, reps=1)
    t = machine_timings(plan)
    assert t["reps"] == 2 and t["threads"] == 1 and t["seq_len"] == 16
    rows = {p["product"]: p for p in t["products"]}
    assert rows["FFN up"]["a"] == [16, 32] and rows["FFN up"]["b"] == [32, 64]
    assert rows["attention scores QK^T"]["b"] == [1, 2, 16, 16]
    for p in t["products"]:
        assert p["bit_identical"] is True
        weight = "limbs_prepared_ms" in p
        assert weight == ("limbs_narrow_ms" in p) == (p["product"].startswith(("Q/K", "FFN")))


def test_with_a_device_the_limbs_there_are_timed_and_checked() -> None:
    """The host stands in for the device (this machine has no GPU): the device columns are
    the products as a party's device way runs them, each result checked against torch's."""
    plan = BenchPlan(quick=True, layer=LayerShape("small", 32, 2, 64), layer_seq_len=16, reps=1)
    t = machine_timings(plan, device=torch.device("cpu"))
    assert t["device"] == "cpu"
    for p in t["products"]:
        assert p["bit_identical"] is True and p["device_ms"] > 0
        weight = p["product"].startswith(("Q/K", "FFN"))
        assert ("device_prepared_ms" in p) == ("device_narrow_ms" in p) == weight
        ways = {"torch": p["torch_ms"], "limbs": p["limbs_ms"], "device": p["device_ms"]}
        assert p["faster"] == min(ways, key=ways.__getitem__)
    assert machine_timings(plan)["device"] is None


def test_a_device_choice_is_counted_with_its_median() -> None:
    rec = {**_rec("device", 4, 3.0, None), "device_ms": 0.5, "device": "cuda:0"}
    (row,) = choices({"case": {"ring_matmul": {"dealer": [rec, {**rec, "device_ms": 1.5}]}}})
    assert row["processes"] == {"torch": 0, "limbs": 0, "device": 2}
    assert row["calls"]["device"] == 8 and row["device_ms_median"] == 1.0


def test_the_report_shows_the_device_columns_only_with_a_device() -> None:
    from secfwt.bench.report import _section_ring_matmul

    plan = BenchPlan(quick=True, layer=LayerShape("small", 32, 2, 64), layer_seq_len=16, reps=1)
    rec = {**_rec("device", 4, 3.0, None), "device_ms": 0.5, "device": "cpu"}
    picked = choices({"case": {"ring_matmul": {"dealer": [rec]}}})
    for device, columns in ((torch.device("cpu"), 12), (None, 9)):
        lines = _section_ring_matmul(
            {"machine": machine_timings(plan, device=device), "choices": picked}
        )
        at = lines.index(next(line for line in lines if line.startswith("| product |")))
        header, rule, *rows = lines[at : at + 7]  # the layer's 5 products
        for line in (header, rule, *rows):
            assert line.count("|") - 1 == columns, line
        assert ("the limbs on cpu (run.device)" in lines[2]) == (device is not None)
    assert "| 0 / 0 / 1 | 0 / 0 / 4 | 3 / - / 0.5 |" in lines[-2]
