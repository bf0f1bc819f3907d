"""``run.device``: its values, and the ring products' plumbing onto a CUDA device.

This machine has no GPU, so the CUDA placement is checked with torch's fake tensors, which
carry a device and a dtype through every op without computing: every product of the shares
(general, a fixed mask split once, an owner's narrow weights) must reach the device as float64
GEMMs, none as an int64 GEMM (CUDA has none), and come back to the host as int64. The bits of
the same code are checked on the host standing in for the device (``test_ring_tuning.py``,
``test_ring_tuning_mpc.py``), and the exactness bound of the limbs holds for any IEEE float64
GEMM, whatever its summation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from secfwt.config import load_job
from secfwt.errors import ConfigError
from secfwt.mpc import device, owned, ring_tuning
from secfwt.mpc.ring import NARROW_BOUND, ring_matmul
from secfwt.mpc.ring_tuning import Method

CUDA = torch.device("cuda", 0)
GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


class GemmRecorder(TorchDispatchMode):
    """Records (device type, dtype) of the operands of every matrix product dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[tuple[tuple[str, torch.dtype], ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in GEMMS:
            self.gemms.append(
                tuple((a.device.type, a.dtype) for a in args if isinstance(a, torch.Tensor))
            )
        return func(*args, **(kwargs or {}))


@pytest.fixture
def on_fake_cuda() -> Iterator[None]:
    ring_tuning.configure(forced=None, cache=None)
    ring_tuning.set_device(CUDA)
    try:
        with ring_tuning.forcing(Method.DEVICE):
            yield
    finally:
        ring_tuning.set_device(None)
        ring_tuning.configure(forced=None, cache=None)


def _operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-(2**63), 2**63 - 1, (64, 1100), generator=gen)  # K > 2^10: two chunks
    b = torch.randint(-(2**63), 2**63 - 1, (1100, 48), generator=gen)
    w = torch.randint(-NARROW_BOUND + 1, NARROW_BOUND, (1100, 48), generator=gen)
    return a, b, w


def test_every_kind_of_product_runs_as_float64_gemms_on_the_cuda_device(on_fake_cuda) -> None:
    a, b, w = _operands()
    fixed = owned._FixedRight(b)
    with FakeTensorMode(allow_non_fake_inputs=True), GemmRecorder() as rec:
        outs = {
            "general": ring_matmul(a, b),
            "prepared": fixed(a),
            "prepared again": fixed(a),
            "narrow": owned._owner_product(a, w, narrow=True),
        }
    for name, out in outs.items():
        assert (out.device.type, out.dtype, tuple(out.shape)) == ("cpu", torch.int64, (64, 48)), (
            name
        )
    assert rec.gemms, "no product was dispatched"
    assert all(ops == (("cuda", torch.float64),) * 2 for ops in rec.gemms), rec.gemms
    # 2 K chunks x 3 shifts for each general and prepared product; the narrow one in one GEMM
    # (its chunks are up to 2^11 long)
    assert len(rec.gemms) == 3 * 2 * 3 + 1
    assert fixed.on_device is not None and fixed.prepared is None  # split on the device only
    assert {r["kind"]: r["method"] for r in ring_tuning.records()} == {
        "general": "device",
        "prepared": "device",
        "narrow": "device",
    }


def test_without_a_device_no_product_leaves_the_host() -> None:
    a, b, w = _operands()
    with ring_tuning.forcing(Method.LIMBS), GemmRecorder() as rec:
        owned._owner_product(a, w, narrow=True)
        ring_matmul(a, b)
    assert rec.gemms and all(dev == "cpu" for ops in rec.gemms for dev, _ in ops)


@pytest.mark.parametrize("value", ["cpu", "CPU", "cuda", "cuda:0", "cuda:3", " cuda:1 "])
def test_accepted_values(value: str) -> None:
    device.check(value)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cpu:0", "mps", "", "cuda:-1"])
def test_a_bad_value_names_the_field_and_the_choices(value: str) -> None:
    with pytest.raises(ConfigError, match=r'run.device = .*expected "cpu" .*"cuda" or "cuda:N"'):
        device.check(value)


def test_cpu_means_the_host_only() -> None:
    assert device.resolve("cpu") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_a_cuda_device_on_a_machine_without_one_is_refused(value: str) -> None:
    with pytest.raises(
        ConfigError, match='run.device = .*sees no CUDA device; set run.device = "cpu"'
    ):
        device.resolve(value)


def test_a_job_file_with_a_bad_device_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"run\.device = 'gpu'"):
        load_job(None, overrides=["run.device=gpu"])
    assert load_job(None).run.device == "cpu"
    assert load_job(None, overrides=["run.device=cuda:1"]).run.device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_simulate_refuses_a_missing_device_before_any_party_starts(monkeypatch) -> None:
    from secfwt.mpc import launcher
    from secfwt.runtime.simulate import run_simulation

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a party process was built")

    monkeypatch.setattr(launcher, "_party_process", no_process)
    cfg = load_job(None, overrides=["run.device=cuda"])
    with pytest.raises(ConfigError, match="run.device = 'cuda'"):
        run_simulation(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_on_a_real_cuda_device_every_kind_gives_torchs_bits() -> None:
    """Where a GPU is present: the device's float64 GEMMs keep the limb sums exact, so every
    kind of product equals torch's int64 matmul on the host, forced and measured."""
    a, b, w = _operands()
    dev = device.resolve("cuda")
    assert dev is not None
    device.warm_up(dev)
    ring_tuning.configure(forced=None, cache=None)
    ring_tuning.set_device(dev)
    try:
        for method in (Method.DEVICE, None):
            with ring_tuning.forcing(method):
                fixed = owned._FixedRight(b)
                assert torch.equal(ring_matmul(a, b), torch.matmul(a, b))
                assert torch.equal(fixed(a), torch.matmul(a, b))
                assert torch.equal(fixed(a), torch.matmul(a, b))
                assert torch.equal(owned._owner_product(a, w, narrow=True), torch.matmul(a, w))
                recs = ring_tuning.records()
            assert {r["kind"] for r in recs} == {"general", "prepared", "narrow"}
            assert all(r["device"] == str(dev) for r in recs)
    finally:
        ring_tuning.set_device(None)
        ring_tuning.configure(forced=None, cache=None)
