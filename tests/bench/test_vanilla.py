"""The vanilla CrypTen baseline undoes secfwt's speed-ups (in the process that asks for it)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_restore_validation_getattr_rewraps_crypten_attribute_access():
    code = (
        "from secfwt.crypten_compat import crypten\n"
        "from crypten.cryptensor import CrypTensor\n"
        "assert getattr(CrypTensor.__dict__['__getattribute__'], '__wrapped__', None) is None\n"
        "from secfwt.bench.vanilla import restore_validation_getattr\n"
        "restore_validation_getattr(); restore_validation_getattr()\n"
        "f = CrypTensor.__dict__['__getattribute__']\n"
        "assert f.__wrapped__ is not None and getattr(f.__wrapped__, '__wrapped__', None) is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_vanilla_engine_env_switches_ring_matmul_off_and_back():
    from secfwt.bench.vanilla import vanilla_engine_env

    before = os.environ.get("SECFWT_RING_MATMUL")
    with vanilla_engine_env():
        assert os.environ["SECFWT_RING_MATMUL"] == "0"
        out = subprocess.run([sys.executable, "-c", "from secfwt import crypten_compat as c; print(c.ring_matmul_enabled())"], capture_output=True, text=True, check=True, timeout=120)
        assert out.stdout.strip() == "False"
    assert os.environ.get("SECFWT_RING_MATMUL") == before
