"""The engine is installed by one explicit, idempotent call: importing secfwt patches nothing.

Each check runs in a fresh interpreter (this test process may have installed the engine):
it snapshots every CrypTen name the engine replaces, imports all of ``secfwt.mpc``, installs
twice, and reports what changed at each point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, pkgutil, sys
import torch
import secfwt.crypten_compat
from crypten.common import rng
from crypten.communicator import distributed_communicator
from crypten.cryptensor import CrypTensor
from crypten.encoder import FixedPointEncoder
from crypten.mpc.primitives import arithmetic, beaver
from crypten.mpc.provider import tfp_provider, ttp_provider
import crypten.communicator as crypten_comm

def snapshot():
    comm = distributed_communicator.DistributedCommunicator
    names = {
        "beaver.mul": beaver.mul, "beaver.matmul": beaver.matmul, "beaver.AND": beaver.AND,
        "beaver.torch": beaver.torch, "ttp.torch": ttp_provider.torch,
        "ttp.dist": ttp_provider.dist,
        "comm.all_reduce": comm.__dict__["all_reduce"],
        "comm.broadcast": comm.__dict__["broadcast"],
        "comm.class": crypten_comm.DistributedCommunicator,
        "getattribute": CrypTensor.__dict__["__getattribute__"],
        "decode": FixedPointEncoder.__dict__["decode"],
    }
    for m in (rng, arithmetic, ttp_provider, tfp_provider):
        names["draw." + m.__name__] = m.generate_random_ring_element
    for k, v in vars(ttp_provider.TTPServer).items():
        if k.startswith("secfwt_"):
            names["ttp." + k] = v
    return {k: id(v) for k, v in names.items()}

def changed(a, b):
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))

shipped = snapshot()
pristine = (
    beaver.torch is torch and ttp_provider.dist is torch.distributed
    and not any(k.startswith("ttp.secfwt_") for k in shipped)
    and hasattr(CrypTensor.__dict__["__getattribute__"], "__wrapped__")
)
import secfwt.mpc
for info in pkgutil.walk_packages(secfwt.mpc.__path__, "secfwt.mpc."):
    importlib.import_module(info.name)
after_imports = snapshot()
from secfwt.mpc import engine
before_install = engine.installed()
engine.install()
first = snapshot()
engine.install()
second = snapshot()
print(json.dumps({
    "pristine": pristine, "by_imports": changed(shipped, after_imports),
    "installed_before": before_install, "installed_after": engine.installed(),
    "by_install": changed(after_imports, first), "by_second_install": changed(first, second),
    "decode_exact": secfwt.crypten_compat.exact_decode_installed(),
}))
"""

_ALWAYS = {
    "beaver.AND",
    "beaver.matmul",
    "beaver.mul",
    "beaver.torch",
    "decode",
    "ttp.dist",
    "ttp.torch",
    "ttp.secfwt_bit_triple",
    "ttp.secfwt_fixed_one_sided_matmul",
    "ttp.secfwt_insecure_reseed",
    "ttp.secfwt_mask_products",
    "ttp.secfwt_mask_select",
    "ttp.secfwt_one_sided_matmul",
    "ttp.secfwt_owned_drain",
}
_FAST = {
    "comm.all_reduce",
    "comm.broadcast",
    "getattribute",
    "draw.crypten.common.rng",
    "draw.crypten.mpc.primitives.arithmetic",
    "draw.crypten.mpc.provider.tfp_provider",
    "draw.crypten.mpc.provider.ttp_provider",
}


def _run(ring_matmul: str) -> dict:
    env = {**os.environ, "SECFWT_RING_MATMUL": ring_matmul}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ring_matmul", ["1", "0"])
def test_nothing_is_patched_before_install_and_install_is_idempotent(ring_matmul: str) -> None:
    res = _run(ring_matmul)
    assert res["pristine"]
    assert res["by_imports"] == []
    assert not res["installed_before"] and res["installed_after"]
    expected = _ALWAYS | (_FAST if ring_matmul == "1" else set())
    assert set(res["by_install"]) == expected
    assert res["by_second_install"] == []
    assert res["decode_exact"]
