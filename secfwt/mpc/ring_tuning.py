"""Which way each int64 ring matmul runs on this machine, chosen by timing both ways once.

Why: secfwt's exact float64 limb GEMMs (:mod:`secfwt.mpc.ring`) replaced torch's int64 matmul
on a machine where torch had no fast integer kernel (7x there). On an AMD EPYC with AVX-512 and
torch 2.13.0 it is the other way round: torch's int64 matmul, one thread, took 2.7 ms for
``[128x768] @ [768x768]`` against 31 ms for the limbs, and 0.4 against 4.5 ms for a
``[1,12,128,64] @ [1,12,64,128]`` attention product. A fixed choice is wrong on one machine or
the other, so each product is routed by measurement instead.

How: a product belongs to a :class:`ShapeClass` (its kind, and batch, M, K and N each rounded
up to a power of two). The first product of a class in a process runs both ways on its real
operands, alternating, up to :data:`MAX_ROUNDS` times each (stopping once one way is
:data:`DECISIVE` times faster), timed on the calling thread's CPU time where torch computes on
that thread alone (one intra-op thread, as in every party process), so that other processes
taking the core do not skew the choice; the limbs are chosen only when their best time beats
torch's by :data:`MARGIN`, so a lever never stays in where it is slower than what it replaces.
Both ways give the same bits (two's-complement int64 arithmetic modulo 2^64); the first results
are compared, and a mismatch (a BLAS that breaks float64 exactness) is a
:class:`ProtocolError`.
The choice is kept for the process, and optionally in a JSON file keyed by CPU model, torch
version, thread count and limb layout (``SECFWT_RING_TUNING_CACHE``), so later processes on the
same machine skip the measurement. :func:`records` lists every class's choice and timings (the
launcher returns them with each party's result; ``secfwt bench`` and ``secfwt simulate`` report
them).

With a device (the job's ``run.device``, :func:`set_device`), the ways measured are torch's
int64 matmul on the host and the same limbs on that device (:attr:`Method.DEVICE`: operands
copied there, the exact float64 GEMMs run there, the int64 result copied back), timed on wall
time because the device's work is on no host thread's clock, and at least twice each (a device's
first run of a shape may load its kernels); the device is chosen when it beats the host by
:data:`MARGIN`, and its first result is checked against torch's bit for bit, so a
device BLAS that breaks float64 exactness fails the party before any share depends on it.

``SECFWT_RING_MATMUL`` (read once per process by :func:`secfwt.mpc.engine.install`, checked by
the launcher before any party starts): ``1`` or unset: measure; ``torch`` or ``limbs``: force
that way for every class (results are the same bits either way); ``0``: CrypTen's own int64
matmuls and Beaver products (the vanilla baseline; owner-held weights still come here);
``device``: the limbs on ``run.device`` for every class (the launcher refuses it without one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

RING_MATMUL_ENV = "SECFWT_RING_MATMUL"
CACHE_ENV = "SECFWT_RING_TUNING_CACHE"

#: Below this many multiply-adds torch's int64 matmul is taken without measuring: on the machine
#: the limbs were written for, [32x64]@[64x64] (131k) int64 0.28 ms vs limbs 0.39 ms; on this
#: one torch is faster at every size measured.
SMALL_WORK = 2**18
#: Timing rounds per way at most, and the speed ratio that ends the measurement early.
MAX_ROUNDS = 3
DECISIVE = 1.5
#: The limbs must beat torch's best time by this factor to be chosen (timing noise goes to torch).
MARGIN = 1.1
#: Changes with the limb layout of :mod:`secfwt.mpc.ring` (cached choices of another go stale).
LAYOUT = "3x22-bit limbs v1"


class Method(enum.Enum):
    TORCH = "torch"  # torch.matmul on int64: what the limbs replace
    LIMBS = "limbs"  # exact float64 limb GEMMs (secfwt.mpc.ring)
    DEVICE = "device"  # the same limb GEMMs on the process's device (run.device)


class Kind(enum.Enum):
    GENERAL = "general"  # a @ b, both int64 (ring_matmul)
    PREPARED = "prepared"  # a @ b, b fixed for the session and split once (PreparedRight)
    NARROW = "narrow"  # a @ w, w an owner's narrow fixed-point weight (ring_matmul_narrow)


def _bucket(x: int) -> int:
    """The smallest power of two >= x (1 for 0 and 1)."""
    return 1 << max(0, x - 1).bit_length()


def _batch(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """Matrices in the broadcast batch of ``a @ b`` (1-D operands have none)."""
    da, db = list(a_shape[:-2]), list(b_shape[:-2])
    n = max(len(da), len(db))
    da, db = [1] * (n - len(da)) + da, [1] * (n - len(db)) + db
    return math.prod(x if y == 1 else y for x, y in zip(da, db, strict=True))


def work(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """Multiply-adds of ``a @ b``."""
    if not a_shape or not b_shape:
        return 0
    m = a_shape[-2] if len(a_shape) >= 2 else 1
    n = b_shape[-1] if len(b_shape) >= 2 else 1
    return _batch(a_shape, b_shape) * m * a_shape[-1] * n


@dataclasses.dataclass(frozen=True, order=True)
class ShapeClass:
    """Products that share a choice: same kind, batch/M/K/N below the same powers of two."""

    kind: str
    batch: int
    m: int
    k: int
    n: int

    @classmethod
    def of(cls, kind: Kind, a_shape: Sequence[int], b_shape: Sequence[int]) -> ShapeClass:
        m = a_shape[-2] if len(a_shape) >= 2 else 1
        k = a_shape[-1] if a_shape else 1
        n = b_shape[-1] if len(b_shape) >= 2 else 1
        batch = _batch(a_shape, b_shape)
        return cls(kind.value, _bucket(batch), _bucket(m), _bucket(k), _bucket(n))

    def key(self) -> str:
        return f"{self.kind}:b{self.batch}:m{self.m}:k{self.k}:n{self.n}"


@dataclasses.dataclass
class Choice:
    """The way a shape class runs here and why: ``source`` is ``measured``, ``cache`` (the
    on-disk file) or ``forced``; ``example`` the first product of the class."""

    method: Method
    source: str
    example: str
    torch_ms: float | None = None
    limbs_ms: float | None = None
    device_ms: float | None = None
    device: str | None = None  # the device of Method.DEVICE, when one was set
    rounds: int = 0
    calls: int = 0
    #: time in this class's products (its measured best counts for the first) on ``clock``
    time_s: float = 0.0
    clock: str | None = None  # thread_time (CPU time of the calling thread) or perf_counter

    def to_dict(self, cls: ShapeClass) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method.value
        return {**dataclasses.asdict(cls), **d}


def _describe(a_shape: Sequence[int], b_shape: Sequence[int]) -> str:
    return f"[{'x'.join(map(str, a_shape))}]@[{'x'.join(map(str, b_shape))}]"


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_key() -> str:
    """What a cached choice is valid for: CPU model, torch version, threads, limb layout, and
    the device the limbs may run on."""
    key = (
        f"{cpu_model() or 'unknown CPU'} | torch {torch.__version__} | "
        f"torch threads: {torch.get_num_threads()} | {LAYOUT}"
    )
    dev = _TUNER.device
    return key if dev is None else f"{key} | device: {device_name(dev)}"


def device_name(dev: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)``; the bare device for the host (tests' stand-in)."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


class _Tuner:
    """The per-process choices (thread-safe: the owned products' work ahead runs in a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._choices: dict[ShapeClass, Choice] = {}
        self.forced: Method | None = None
        self.cache: Path | None = None
        self.clock: Callable[[], float] | None = None  # None: _clock(); tests script their own
        self.device: torch.device | None = None  # where Method.DEVICE runs (None: no such way)

    def run(
        self,
        kind: Kind,
        a_shape: Sequence[int],
        b_shape: Sequence[int],
        *,
        torch_fn: Callable[[], torch.Tensor],
        limbs_fn: Callable[[], torch.Tensor],
        device_fn: Callable[[torch.device], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``a @ b`` computed the way chosen for its shape class (measured at the class's first
        product). ``torch_fn``, ``limbs_fn`` and ``device_fn`` (the limbs on the device it is
        given, the result back on the host; None: this product has no device way) compute the
        same product without side effects."""
        if work(a_shape, b_shape) < SMALL_WORK:
            return torch_fn()
        dev = self.device if device_fn is not None else None
        ways: dict[Method, Callable[[], torch.Tensor]] = {Method.TORCH: torch_fn}
        if dev is None:
            ways[Method.LIMBS] = limbs_fn
        else:
            assert device_fn is not None
            ways[Method.DEVICE] = lambda: device_fn(dev)
        cls = ShapeClass.of(kind, a_shape, b_shape)
        with self._lock:
            choice = self._choices.get(cls)
            if choice is None and self.forced is not None:
                forced = self.forced if self.forced in ways else Method.LIMBS  # host limbs
                choice = Choice(forced, "forced", _describe(a_shape, b_shape))
                choice.device = str(dev) if forced is Method.DEVICE else None
                self._choices[cls] = choice
            if choice is None:
                choice = self._from_disk(cls)
        if choice is None:
            clock = self.clock or (_clock() if dev is None else time.perf_counter)
            out, choice = _measure(ways, _describe(a_shape, b_shape), clock)
            choice.device = None if dev is None else str(dev)
            with self._lock:
                choice = self._choices.setdefault(cls, choice)  # a racing thread's stays
            self._to_disk(cls, choice)
            log.debug("ring matmul %s: %s", cls.key(), choice)
            choice.calls += 1
            return out
        on_device = choice.method is Method.DEVICE
        clock = self.clock or (time.perf_counter if on_device else _clock())
        t0 = clock()
        out = ways.get(choice.method, limbs_fn)()
        choice.time_s += clock() - t0
        choice.calls += 1  # a lost increment between threads only miscounts the record
        return out

    # -- the optional on-disk cache --------------------------------------------------------
    def _from_disk(self, cls: ShapeClass) -> Choice | None:
        """Called with the lock held."""
        if self.cache is None:
            return None
        entry = _read_cache(self.cache).get(machine_key(), {}).get(cls.key())
        if not isinstance(entry, dict) or entry.get("method") not in {m.value for m in Method}:
            return None
        choice = Choice(
            Method(entry["method"]),
            "cache",
            str(entry.get("example", "")),
            torch_ms=entry.get("torch_ms"),
            limbs_ms=entry.get("limbs_ms"),
            device_ms=entry.get("device_ms"),
        )
        if choice.method is Method.DEVICE and self.device is None:
            return None  # a device's choice, read without one: measure afresh
        self._choices[cls] = choice
        return choice

    def _to_disk(self, cls: ShapeClass, choice: Choice) -> None:
        if self.cache is None or choice.source != "measured":
            return
        entry = {
            "method": choice.method.value,
            "example": choice.example,
            "torch_ms": choice.torch_ms,
            "limbs_ms": choice.limbs_ms,
            "device_ms": choice.device_ms,
        }
        try:
            _update_cache(self.cache, machine_key(), cls.key(), entry)
        except OSError as exc:  # the cache only saves time: a read-only place costs a warning
            log.warning("ring matmul tuning cache %s not written: %s", self.cache, exc)


def _clock() -> Callable[[], float]:
    """The calling thread's CPU time when torch computes on it alone (one intra-op thread, as
    in every party process): unlike wall time it does not count the time other processes or
    the other party threads take the core, so a busy machine does not skew the choice. Wall
    time otherwise (torch's worker threads would escape the calling thread's CPU time)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _measure(
    ways: Mapping[Method, Callable[[], torch.Tensor]],
    example: str,
    clock: Callable[[], float],
) -> tuple[torch.Tensor, Choice]:
    """Time every way (torch first), alternating; return torch's result and the choice: the
    fastest lever, if it beats torch by :data:`MARGIN`, else torch."""
    best = {method: math.inf for method in ways}
    out: torch.Tensor | None = None
    rounds = 0
    for rounds in range(1, MAX_ROUNDS + 1):
        for method, fn in ways.items():
            t0 = clock()
            got = fn()
            best[method] = min(best[method], clock() - t0)
            if out is None:
                out = got
            elif rounds == 1 and not torch.equal(got, out):
                where = " on the device" if method is Method.DEVICE else ""
                raise ProtocolError(
                    f"ring matmul {example}: the float64 limb GEMMs{where} and torch's int64 "
                    "matmul disagree; this BLAS does not keep float64 sums exact. Set "
                    f'{RING_MATMUL_ENV}=torch (and run.device = "cpu") to use torch\'s int64 '
                    "matmul only"
                )
        fast, slow = min(best.values()), max(best.values())
        # a device's first run of a shape may load its kernels: never judged on that alone
        if slow >= DECISIVE * fast and rounds >= (2 if Method.DEVICE in ways else 1):
            break
    assert out is not None
    lever = min((m for m in best if m is not Method.TORCH), key=best.__getitem__)
    method = lever if best[lever] * MARGIN < best[Method.TORCH] else Method.TORCH
    choice = Choice(
        method,
        "measured",
        example,
        torch_ms=best[Method.TORCH] * 1e3,
        limbs_ms=best[Method.LIMBS] * 1e3 if Method.LIMBS in best else None,
        device_ms=best[Method.DEVICE] * 1e3 if Method.DEVICE in best else None,
        rounds=rounds,
        time_s=best[method],
        clock=getattr(clock, "__name__", type(clock).__name__),
    )
    return out, choice


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    machines = data.get("machines") if isinstance(data, dict) else None
    return machines if isinstance(machines, dict) else {}


def _update_cache(path: Path, machine: str, key: str, entry: dict[str, Any]) -> None:
    """Add one entry; the three party processes of a session may write at once, so the
    read-modify-write holds an exclusive lock on a side file and replaces the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        machines = _read_cache(path)
        machines.setdefault(machine, {})[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"machines": machines}, indent=1, sort_keys=True))
        os.replace(tmp, path)


_TUNER = _Tuner()


#: ``run(kind, a_shape, b_shape, torch_fn=..., limbs_fn=...)``: this process's :meth:`_Tuner.run`.
run = _TUNER.run


def decided(kind: Kind, a_shape: Sequence[int], b_shape: Sequence[int]) -> Method | None:
    """The way this product would run now, or None while its class is still unmeasured."""
    if work(a_shape, b_shape) < SMALL_WORK:
        return Method.TORCH
    choice = _TUNER._choices.get(ShapeClass.of(kind, a_shape, b_shape))
    if choice is not None:
        return choice.method
    return _TUNER.forced


def records() -> list[dict[str, Any]]:
    """Every shape class seen in this process: its way, why, timings and use (JSON-ready)."""
    with _TUNER._lock:
        return [c.to_dict(cls) for cls, c in sorted(_TUNER._choices.items())]


def settings_from_env(env: Mapping[str, str]) -> tuple[bool, Method | None, Path | None]:
    """(secfwt's matmul and Beaver products on, the forced way or None to measure, the cache
    file or None) from ``SECFWT_RING_MATMUL`` and ``SECFWT_RING_TUNING_CACHE``; ConfigError on
    a value it does not know."""
    raw = env.get(RING_MATMUL_ENV, "1").strip().lower()
    if raw not in {"", "0", "1", "auto", *(m.value for m in Method)}:
        raise ConfigError(
            f"{RING_MATMUL_ENV}={env.get(RING_MATMUL_ENV)!r}: expected 1 (measure each product "
            "class, the default), torch, limbs or device (force one way; device needs the "
            "job's run.device) or 0 (vanilla CrypTen)"
        )
    forced = Method(raw) if raw in {m.value for m in Method} else None
    cache = env.get(CACHE_ENV, "").strip()
    return raw != "0", forced, Path(cache).expanduser() if cache else None


def set_device(dev: torch.device | None) -> None:
    """Let this process's products also run as limbs on ``dev`` (None: the host only); choices
    made before are forgotten. The launcher checks the device before any party starts
    (:func:`secfwt.mpc.device.resolve`)."""
    with _TUNER._lock:
        _TUNER.device = dev
        _TUNER._choices.clear()


def current_device() -> torch.device | None:
    """The device set by :func:`set_device`, or None."""
    return _TUNER.device


def configure(*, forced: Method | None, cache: Path | None) -> None:
    """Force one way (None: measure) and set the on-disk cache (None: none) in this process;
    choices made before are forgotten."""
    with _TUNER._lock:
        _TUNER.forced = forced
        _TUNER.cache = cache
        _TUNER._choices.clear()


@contextlib.contextmanager
def forcing(method: Method | None) -> Iterator[None]:
    """Within the block every shape class starts afresh and takes ``method`` (None: measured);
    the choices made before come back after it (tests)."""
    with _TUNER._lock:
        before = _TUNER.forced, dict(_TUNER._choices)
        _TUNER.forced = method
        _TUNER._choices.clear()
    try:
        yield
    finally:
        with _TUNER._lock:
            _TUNER.forced, choices = before
            _TUNER._choices.clear()
            _TUNER._choices.update(choices)


def reset() -> None:
    """Forget every choice of this process (tests, and the bench's machine timings)."""
    with _TUNER._lock:
        _TUNER._choices.clear()


__all__ = [
    "CACHE_ENV",
    "RING_MATMUL_ENV",
    "SMALL_WORK",
    "Choice",
    "Kind",
    "Method",
    "ShapeClass",
    "configure",
    "current_device",
    "device_name",
    "set_device",
    "cpu_model",
    "decided",
    "forcing",
    "machine_key",
    "records",
    "reset",
    "run",
    "settings_from_env",
    "work",
]
