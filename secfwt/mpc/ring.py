"""Exact matrix products in the int64 ring Z/2^64 computed with float64 GEMMs.

Why: CrypTen keeps secret shares as int64 and multiplies them with ``torch.matmul``. torch
has no BLAS kernel for integers; where its int64 matmul is a plain loop (the machine this was
written for: 2 cores, torch 2.13 CPU, MKL) ``[7424x384] @ [384x384]`` takes 2.7 s in int64 against
0.09 s for one float64 GEMM of the same shape (the int64 kernel also uses a single thread).
:func:`ring_matmul` computes the int64 product exactly through float64 GEMMs and is
bit-identical to ``torch.matmul`` (two's-complement wraparound modulo 2^64). Measured there
on an otherwise idle machine, best of several runs, with the first layout (four unsigned 16-bit
limbs, ten limb products): ``[7424x384] @ [384x384]`` 2.5 s -> 0.35 s (7x; 0.68 s, 3.9x, with
one thread), ``[128x768] @ [768x768]`` 0.17 s -> 0.024 s (7x). The three-limb layout below
(six limb products) against that one, same run, one thread, best of 5 on a loaded machine:
``[128x768] @ [768x768]`` 59 -> 36 ms, ``[128x768] @ [768x3072]`` 220 -> 155 ms,
``[128x3072] @ [3072x768]`` 218 -> 118 ms, ``[7424x384] @ [384x384]`` 710 -> 496 ms.

How: every int64 value ``x`` is split into three *signed* limbs of 22, 22 and 20 bits,
``x = s_0 + s_1 2^22 + s_2 2^44 (mod 2^64)`` with ``-2^21 <= s_0, s_1 < 2^21`` and
``-2^19 <= s_2 < 2^19``. Then

    a @ b = sum_{i,j} (a_i @ b_j) * 2^(22 (i + j))   (mod 2^64),

and only the six pairs with ``i + j < 3`` survive the reduction modulo 2^64 (``22 * 3 >= 64``).
Pairs with the same shift ``t = i + j`` are fused into one GEMM by concatenating the limbs along
K: ``[a_0 | ... | a_t] @ [b_t; ...; b_0]``. Laid out once as ``A = [a_0 | a_1 | a_2]`` (along
K) and ``B = [b_2; b_1; b_0]``, the operands of shift ``t`` are the views ``A[..., :(t+1)K]``
and ``B[(2-t)K:, :]``, so the six limb products cost three GEMM calls (6K multiply-adds per
output, against 10K for four unsigned 16-bit limbs) and no copies. The three float64 results
are exact integers; they are converted to int64 and recombined with wrapping shifts and adds
(Horner). The split itself is a handful of whole-tensor passes: with
``y = x + 2^21 + 2^43`` (wrapping), ``s_0 = (y mod 2^22) - 2^21``,
``s_1 = ((y >> 22) mod 2^22) - 2^21`` and ``s_2 = y >> 44`` (arithmetic shift), because
``y = (y mod 2^22) + ((y >> 22) mod 2^22) 2^22 + (y >> 44) 2^44`` exactly.

Exactness bound: a limb product is at most ``2^21 * 2^21 = 2^42`` in magnitude, the widest
group (``t = 1``: two such pairs; ``t = 2`` sums ``2^40 + 2^42 + 2^40``) at most ``2^43`` per
k, so every partial sum of a GEMM over K terms is an integer of magnitude at most
``K * 2^43``. float64 represents every integer up to 2^53 exactly, whatever the summation
order or FMA use of the BLAS, so ``K <= 2^10`` is exact. Longer K is cut into equal chunks of
at most 2^10 whose int64 results are added with wraparound.

Which way runs: the measurements above are from the machine these limbs were written for. On an
AMD EPYC with AVX-512 and torch 2.13.0, torch's own int64 matmul is about ten times faster than
the limbs (:mod:`secfwt.mpc.ring_tuning` has the numbers), so :func:`ring_matmul` times both ways
at the first product of each shape class in a process and keeps the faster one; the limb
functions below are the exact arithmetic either way is checked against.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from secfwt.mpc import ring_tuning
from secfwt.mpc.ring_tuning import SMALL_WORK, Kind

#: Number of signed limbs of an int64 and the width of the two low ones (the top one has 20).
_LIMBS = 3
_LIMB_BITS = 22
_LIMB_MASK = (1 << _LIMB_BITS) - 1
#: Offset that makes the unsigned fields of ``x + _OFFSET`` the signed limbs of ``x`` plus 2^21.
_HALF = 1 << (_LIMB_BITS - 1)
_OFFSET = _HALF + (_HALF << _LIMB_BITS)

#: Largest K per GEMM that keeps every partial sum exact in float64: a group of limb pairs sums
#: to at most 2^43 in magnitude per k (module docstring), so K * 2^43 <= 2^53 for K <= 2^10.
MAX_EXACT_K = 2**10


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` for int64 tensors, exactly modulo 2^64: torch's int64 matmul or
    the float64 limb GEMMs, whichever :mod:`secfwt.mpc.ring_tuning` measured faster here.

    Same shape semantics as :func:`torch.matmul` (1-D, 2-D, batched and broadcast N-D) and
    bit-identical results. Tensors that are not both int64, and products too small to gain
    from the limb split (:data:`~secfwt.mpc.ring_tuning.SMALL_WORK`), go straight to
    ``torch.matmul``.
    """
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        return torch.matmul(a, b)
    return ring_tuning.run(
        Kind.GENERAL,
        a.shape,
        b.shape,
        torch_fn=lambda: torch.matmul(a, b),
        limbs_fn=lambda: ring_matmul_limbs(a, b),
        device_fn=lambda dev: on_device(ring_matmul_limbs, a, b, dev),
    )


def ring_matmul_limbs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`ring_matmul` always through the float64 limb GEMMs (int64 operands)."""
    return _ring_matmul(a, b, max_k=MAX_EXACT_K)


def _ring_matmul(a: torch.Tensor, b: torch.Tensor, *, max_k: int) -> torch.Tensor:
    """The limb path of :func:`ring_matmul` alone, with the K chunk length as a parameter (tests
    force the limbs and the chunking through it)."""
    if a.dtype != torch.int64 or b.dtype != torch.int64 or a.dim() == 0 or b.dim() == 0:
        return torch.matmul(a, b)
    if not 1 <= max_k <= MAX_EXACT_K:
        raise ValueError(f"max_k must be in [1, {MAX_EXACT_K}] for exact float64 sums, got {max_k}")
    k = a.shape[-1]
    kdim_b = _k_dim_of_b(b)
    if k != b.shape[kdim_b] or k == 0:
        # Let torch raise its own shape error (or return the zeros of an empty product).
        return torch.matmul(a, b)
    result: torch.Tensor | None = None
    chunk = math.ceil(k / math.ceil(k / max_k))  # equal chunks: no short, inefficient GEMM
    for start in range(0, k, chunk):
        length = min(chunk, k - start)
        part = _limb_matmul(a.narrow(-1, start, length), b.narrow(kdim_b, start, length), kdim_b)
        result = part if result is None else result.add_(part)  # int64 add wraps mod 2^64
    assert result is not None
    return result


def _k_dim_of_b(b: torch.Tensor) -> int:
    """The contracted dimension of the right operand: rows of a matrix, the only dim of a vector."""
    return -2 if b.dim() >= 2 else -1


def _limb_matmul(
    a: torch.Tensor, b: torch.Tensor | None, kdim_b: int, b_limbs: torch.Tensor | None = None
) -> torch.Tensor:
    """One K chunk (K <= MAX_EXACT_K): three fused float64 GEMMs, recombined in int64.
    ``b_limbs``: ``b`` already split (:class:`PreparedRight`)."""
    k = a.shape[-1]
    a_limbs = _split_limbs(a, dim=-1, reverse=False)  # [..., 3K]: a_0 | a_1 | a_2
    if b_limbs is None:
        assert b is not None
        b_limbs = _split_limbs(b, dim=kdim_b, reverse=True)  # [..., 3K, N]: b_2; b_1; b_0
    acc: torch.Tensor | None = None
    for shift in reversed(range(_LIMBS)):  # Horner: (c2 * 2^22 + c1) * 2^22 + c0
        a_t = a_limbs.narrow(-1, 0, (shift + 1) * k)
        b_t = b_limbs.narrow(kdim_b, (_LIMBS - 1 - shift) * k, (shift + 1) * k)
        c_t = torch.matmul(a_t, b_t).to(torch.int64)  # exact integers, |c_t| <= 2^53
        if acc is None:
            acc = c_t
        else:
            acc.bitwise_left_shift_(_LIMB_BITS).add_(c_t)  # wraps mod 2^64 like int64 matmul
    assert acc is not None
    return acc


class PreparedRight:
    """A fixed right operand (a matrix, ``(..., K, N)``) split into limbs once, for many
    :func:`ring_matmul_prepared` products with it. Against a short input the split of the
    weight-sized operand is close to half the work (here ``[128x768] @ [768x3072]``: 194 ms
    split each time, 108 ms prepared). Holds three float64 copies (24 bytes per element)."""

    def __init__(self, b: torch.Tensor) -> None:
        if b.dtype != torch.int64 or b.dim() < 2:
            raise TypeError("PreparedRight needs an int64 matrix (or batch)")
        k = b.shape[-2]
        self.shape = b.shape
        self.chunk = math.ceil(k / math.ceil(k / MAX_EXACT_K)) if k else 1
        self.limbs = [
            _split_limbs(b.narrow(-2, start, min(self.chunk, k - start)), dim=-2, reverse=True)
            for start in range(0, k, self.chunk)
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.limbs)


def ring_matmul_prepared(a: torch.Tensor, b: PreparedRight) -> torch.Tensor:
    """:func:`ring_matmul` of an int64 ``a`` (``(..., M, K)``) and a prepared ``b``: the same
    bits."""
    k = a.shape[-1]
    if a.dtype != torch.int64 or a.dim() < 2 or k != b.shape[-2] or k == 0:
        raise TypeError(
            f"ring_matmul_prepared: int64 (..., M, {b.shape[-2]}) expected, got {a.dtype} "
            f"{tuple(a.shape)}"
        )
    result: torch.Tensor | None = None
    for i, start in enumerate(range(0, k, b.chunk)):
        length = min(b.chunk, k - start)
        part = _limb_matmul(a.narrow(-1, start, length), None, -2, b_limbs=b.limbs[i])
        result = part if result is None else result.add_(part)  # int64 add wraps mod 2^64
    assert result is not None
    return result


def _split_limbs(x: torch.Tensor, *, dim: int, reverse: bool) -> torch.Tensor:
    """float64 tensor with ``dim`` three times longer holding the signed limbs of ``x``.

    Block ``i`` along ``dim`` holds limb ``i`` (limb ``2 - i`` when ``reverse``), so that the
    operands of every fused GEMM are contiguous slices along K. Stacked in int64 and converted
    once, with no cross-dtype ``copy_`` (which fake CUDA tensors cannot run on a CPU-only torch,
    where the device plumbing is tested): the weight-sized ``[768x3072]`` split takes 17 ms
    here against 12 ms with ``copy_``, once per fixed weight.
    """
    dim = dim % x.dim()
    fields = list(_limb_fields(x))
    if reverse:
        fields.reverse()
    out = torch.stack(fields, dim).to(torch.float64)  # exact: every field < 2^22
    low = out.narrow(dim, 1 if reverse else 0, _LIMBS - 1)  # the two 22-bit limbs
    low.sub_(_HALF)
    return out.flatten(dim, dim + 1)


def _limb_fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y mod 2^22, (y >> 22) mod 2^22, y >> 44)`` for ``y = x + 2^21 + 2^43`` (wrapping).

    The signed limbs of ``x`` are the first two minus 2^21 and the third as it is (module
    docstring); the subtraction is left to the caller, on the float64 copy.
    """
    y = x + _OFFSET  # int64 addition wraps modulo 2^64
    low = torch.bitwise_and(y, _LIMB_MASK)
    y.bitwise_right_shift_(_LIMB_BITS)
    mid = torch.bitwise_and(y, _LIMB_MASK)
    return low, mid, y.bitwise_right_shift_(_LIMB_BITS)


#: Magnitude bound of a "narrow" operand of :func:`ring_matmul_narrow` (fixed-point weights:
#: |w| < 32 at 16 fractional bits), and the K per GEMM that keeps its products exact: a limb
#: product is below 2^21 * 2^21 = 2^42 and only one pair has each shift, so K * 2^42 <= 2^53.
NARROW_BOUND = 2**21
MAX_EXACT_K_NARROW = 2**11


def ring_matmul_narrow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` modulo 2^64 for int64 ``a`` and a float64 ``b`` holding integers with
    ``|b| < NARROW_BOUND``, bit-identical to ``torch.matmul(a, b.long())``.

    ``b`` needs no split, so the three limbs of ``a`` meet it in ONE GEMM (the limbs stacked
    along a new leading dim: 3K multiply-adds per output against 6K for :func:`ring_matmul`).
    The caller guarantees the bound (an owner's fixed-point weights, checked once when shared);
    ``b`` is float64 so that it can be converted once and reused.
    """
    if a.dtype != torch.int64 or b.dtype != torch.float64 or a.dim() < 2 or b.dim() < 2:
        raise TypeError("ring_matmul_narrow needs an int64 matrix (or batch) and a float64 one")
    k = a.shape[-1]
    chunk = math.ceil(k / max(1, math.ceil(k / MAX_EXACT_K_NARROW)))
    result: torch.Tensor | None = None
    for start in range(0, k, chunk):
        length = min(chunk, k - start)
        limbs = torch.stack(_limb_fields(a.narrow(-1, start, length))).to(torch.float64)
        limbs.narrow(0, 0, 2).sub_(_HALF)  # (3, ..., M, length): the signed limbs of a
        parts = torch.matmul(limbs, b.narrow(-2, start, length)).to(torch.int64)  # exact
        # select, not indexing: a device's fake tensors (the plumbing tests) cannot index
        part = parts.select(0, 2).bitwise_left_shift_(_LIMB_BITS).add_(parts.select(0, 1))
        part.bitwise_left_shift_(_LIMB_BITS).add_(parts.select(0, 0))  # wraps mod 2^64
        result = part if result is None else result.add_(part)
    assert result is not None
    return result


def on_device(
    fn: Callable[[torch.Tensor, Any], torch.Tensor], a: torch.Tensor, b: Any, dev: torch.device
) -> torch.Tensor:
    """``fn(a, b)`` on ``dev``, the result back where ``a`` is: the device way of every ring
    product (:mod:`secfwt.mpc.device`). ``a`` is copied there; ``b`` too when it is a tensor
    still elsewhere (a fixed operand already there, or a :class:`PreparedRight` split there,
    is used as it is)."""
    if isinstance(b, torch.Tensor):
        b = b.to(device=dev)
    return fn(a.to(device=dev), b).to(a.device)


#: id of a host tensor -> (a weak reference to it, its copies by device and dtype). Keyed by
#: id with a weak reference, not a WeakKeyDictionary, whose key comparison would call a
#: tensor's elementwise ``==``.
_device_copies: dict[int, tuple[weakref.ref[torch.Tensor], dict[Any, torch.Tensor]]] = {}


def fixed_on_device(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as ``dtype`` on ``dev``, copied once while ``t`` lives: for operands fixed for a
    session (an owner's encoded weights), which must not change in place afterwards."""
    key = id(t)
    entry = _device_copies.get(key)
    if entry is None or entry[0]() is not t:
        entry = (weakref.ref(t, lambda _ref: _device_copies.pop(key, None)), {})
        _device_copies[key] = entry
    copies = entry[1]
    if (str(dev), dtype) not in copies:
        copies[str(dev), dtype] = t.to(device=dev, dtype=dtype)
    return copies[str(dev), dtype]


def _signed_limbs(x: torch.Tensor) -> torch.Tensor:
    """``x.shape + (3,)`` int64 tensor of the signed limbs ``s_i`` of ``x`` (for tests and docs)."""
    low, mid, top = _limb_fields(x)
    return torch.stack([low - _HALF, mid - _HALF, top], dim=-1)


__all__ = [
    "MAX_EXACT_K",
    "MAX_EXACT_K_NARROW",
    "NARROW_BOUND",
    "SMALL_WORK",
    "PreparedRight",
    "fixed_on_device",
    "on_device",
    "ring_matmul",
    "ring_matmul_limbs",
    "ring_matmul_narrow",
    "ring_matmul_prepared",
]
