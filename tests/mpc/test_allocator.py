"""secfwt.mpc.allocator: in a tuned process, share-sized blocks are reused from the heap instead
of being faulted in afresh from the kernel each time; the switch leaves glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

#: Allocates and frees a 48 MiB tensor (above the 32 MiB glibc lets its mmap threshold rise to),
#: as a party's ops do, and counts the page faults of the last 10 rounds once the heap has
#: settled (its free blocks fragment, so it takes a few rounds to hold one that fits).
_PROBE = """
import resource, torch
from secfwt.mpc import allocator
torch.set_num_threads(1)
tuned = allocator.tune()
assert allocator.tune() is tuned  # idempotent

def churn(rounds):
    for _ in range(rounds):
        t = torch.empty(6 * 2**20, dtype=torch.int64)
        t.fill_(1)
        del t

churn(40)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(10)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(switch: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("SECFWT_MALLOC_TUNING", None)
    if switch is not None:
        env["SECFWT_MALLOC_TUNING"] = switch
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_tuned_process_reuses_large_blocks() -> None:
    tuned, faults = _faults(None)
    untuned, faults_default = _faults("0")
    assert tuned and not untuned
    # 10 rounds of 12,288 pages each with glibc's defaults; none once the heap holds the block
    assert faults_default > 10 * 12_000, faults_default
    assert faults < 1_000, faults
