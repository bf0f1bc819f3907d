"""Where a suite run's numbers came from: the code the parties ran and the machine they ran on.

The report records a fingerprint of the secfwt tree (so a run whose code changed midway says
so), the CPU, memory and load, and how much CPU other work took from the run, since timings on a
shared machine mean little without it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any

import torch


def code_fingerprint() -> dict[str, Any]:
    """Where the secfwt code the parties import lives, and a SHA-256 over its .py files.

    Party processes import secfwt when they start, so if the tree changes during a run (someone
    editing the engine), later cases measure different code: the report says so.
    """
    import hashlib
    from pathlib import Path

    import secfwt

    root = Path(secfwt.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = bool(r.stdout.strip()) if r.returncode == 0 else None
    return {"path": str(root), "sha256": h.hexdigest(), "uncommitted_changes": dirty}


def machine_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot, summed over its cores (``/proc/stat``'s
    first line: user, nice, system, irq, softirq; guest time is in user), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]  # clock ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> tuple[float | None, float]:
    """(:func:`machine_busy_seconds`; CPU seconds of this process and its descendants, i.e. the
    bench and the party processes it started).

    Their difference over a run is the CPU other work took from it. The descendants are the
    children this process has reaped (``os.times``) and, through ``/proc``, its live children
    with the children they reaped: the parties fork from multiprocessing's fork server, which
    reaps them and lives until the bench exits (:func:`secfwt.mpc.launcher.party_context`).
    /proc is read by hand rather than adding psutil for two counters.
    """
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    busy = machine_busy_seconds()
    if busy is None:
        return None, own
    return busy, own + _live_children_ticks(os.getpid()) / os.sysconf("SC_CLK_TCK")


def _live_children_ticks(pid: int) -> int:
    """CPU clock ticks of ``pid``'s live children and of the children they reaped (utime,
    stime, cutime, cstime of each one's ``/proc/PID/stat``, proc(5))."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                # after the command's closing parenthesis: state, ppid, ..., utime at 11
                rest = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(rest[1]) == pid:
            total += sum(int(v) for v in rest[11:15])
    return total


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_info() -> dict[str, Any]:
    import platform

    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo", encoding="utf-8") as fh:
            mem = round(int(fh.readline().split()[1]) / 2**20, 1)
    return {
        "cpu_model": model or platform.processor() or None,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "load_average_at_end": load_average(),
        "torch_threads": torch.get_num_threads(),
    }


__all__ = [
    "code_fingerprint",
    "cpu_info",
    "cpu_seconds",
    "load_average",
    "machine_busy_seconds",
]
