"""glibc's allocator kept from handing large blocks back to the kernel in party processes.

A secure forward allocates and frees share tensors of megabytes at every step (a BERT-base
GELU on 4 x 128 x 3072 values makes dozens of 12.6 MB tensors). glibc serves blocks above its
mmap threshold (128 KiB, rising with use to at most 32 MiB) with fresh ``mmap`` calls and trims
the heap's free top back to the kernel, so each new tensor's pages fault in again, zeroed by
the kernel: on this project's VMs that was about 40% of a party's CPU time in GELU (sys time)
and a third of its wall time (0.83-1.00 -> 0.57-0.59 s for that GELU, three runs or more each way).
:func:`tune` sets, for the calling process, ``M_MMAP_THRESHOLD`` to 1 GiB (blocks below it come
from the heap and are reused) and ``M_TRIM_THRESHOLD`` to 1 GiB (free memory at the heap's top
is kept up to that), with glibc's ``mallopt``. PyTorch's CPU tuning guide gets the same effect
by preloading jemalloc or tcmalloc, which needs a system package; ``mallopt`` is glibc's own
interface and needs nothing installed. The cost is memory: a heap keeps holes a fresh mmap
would have returned, so a party's peak resident memory can grow by up to half
(``secfwt bench fot-vs-full-ft``, MiniLM: CMA-ES 2.5 -> 3.2-3.8 GB per party, full fine-tuning
1.62 -> 1.69 GB, the ZO steps unchanged). A 256 MiB trim threshold gave GELU 0.59-0.76 s.

``SECFWT_MALLOC_TUNING=0`` in the environment leaves glibc's defaults (A/B measurements); other
C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: Environment switch: ``0`` keeps glibc's defaults.
ENV = "SECFWT_MALLOC_TUNING"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this come from the heap, not from a fresh mmap.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the heap's top kept, not trimmed, up to this.
TRIM_THRESHOLD = 1 << 30

_tuned = False


def tune() -> bool:
    """Set this process's glibc allocator as above; idempotent. False where it is switched off
    or the C library is not glibc."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and others have no such call)
    except (OSError, AttributeError):
        log.debug("not glibc: allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("glibc mallopt refused the allocator settings; left as they are")
        return False
    _tuned = True
    return True
