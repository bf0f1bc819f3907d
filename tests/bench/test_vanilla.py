"""The vanilla CrypTen baseline runs without secfwt's speed-ups (SECFWT_RING_MATMUL=0 in every
process)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_engine_switch_keeps_crypten_attribute_access_as_shipped():
    """The engine's unwrapped ``__getattribute__`` follows SECFWT_RING_MATMUL, like the rest."""
    code = (
        "import sys\n"
        "from secfwt.mpc.engine import install, ring_matmul_enabled\n"
        "install()\n"
        "from crypten.cryptensor import CrypTensor\n"
        "wrapped = getattr(CrypTensor.__dict__['__getattribute__'], '__wrapped__', None) "
        "is not None\n"
        "sys.exit(0 if wrapped != ring_matmul_enabled() else 1)\n"
    )
    for value in ("1", "0"):
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            timeout=120,
            env={**os.environ, "SECFWT_RING_MATMUL": value},
        )


def test_vanilla_engine_env_switches_ring_matmul_off_and_back():
    from secfwt.bench.vanilla import vanilla_engine_env

    before = os.environ.get("SECFWT_RING_MATMUL")
    with vanilla_engine_env():
        assert os.environ["SECFWT_RING_MATMUL"] == "0"
        code = "from secfwt.mpc import engine as c; print(c.ring_matmul_enabled())"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
        )
        assert out.stdout.strip() == "False"
    assert os.environ.get("SECFWT_RING_MATMUL") == before
