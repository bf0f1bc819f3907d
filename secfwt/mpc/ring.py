"""Exact matrix products in the int64 ring Z/2^64 computed with float64 GEMMs.

Why: CrypTen keeps secret shares as int64 and multiplies them with ``torch.matmul``. torch
has no BLAS kernel for integers, so an int64 matmul runs a plain loop: on this machine
(2 cores, torch 2.13 CPU, MKL) ``[7424x384] @ [384x384]`` takes 2.7 s in int64 against
0.09 s for one float64 GEMM of the same shape (the int64 kernel also uses a single thread).
:func:`ring_matmul` computes the int64 product exactly through float64 GEMMs and is
bit-identical to ``torch.matmul`` (two's-complement wraparound modulo 2^64). Measured here
on an otherwise idle machine, best of several runs: ``[7424x384] @ [384x384]`` 2.5 s ->
0.35 s (7x; 0.68 s, 3.9x, with one thread), ``[128x768] @ [768x768]`` 0.17 s -> 0.024 s (7x).

How: every int64 value ``x`` is split into four unsigned 16-bit limbs,
``x = sum_i x_i * 2^(16 i) (mod 2^64)`` with ``0 <= x_i < 2^16``. Then

    a @ b = sum_{i,j} (a_i @ b_j) * 2^(16 (i + j))   (mod 2^64),

and only the ten pairs with ``i + j < 4`` survive the reduction modulo 2^64. Pairs with the
same shift ``t = i + j`` are fused into one GEMM by concatenating the limbs along K:
``[a_0 | a_1 | ... | a_t] @ [b_t; b_(t-1); ...; b_0]``. Laid out once as
``A = [a_0 | a_1 | a_2 | a_3]`` (along K) and ``B = [b_3; b_2; b_1; b_0]``, the operands
of shift ``t`` are the views ``A[..., :(t+1)K]`` and ``B[(3-t)K:, :]``, so the ten limb
products cost four GEMM calls and no copies. The four float64 results are exact integers;
they are converted to int64 and recombined with wrapping shifts and adds (Horner).

Exactness bound: a limb product is at most (2^16 - 1)^2 < 2^32, the widest group sums
``(t + 1) <= 4`` of them per k, so every partial sum of a GEMM over K terms is an integer
below ``4 * K * 2^32``. float64 represents every integer up to 2^53 exactly, whatever the
summation order or FMA use of the BLAS, so ``K <= 2^53 / (4 * 2^32) = 2^19`` is exact.
Longer K is cut into chunks of at most 2^19 whose int64 results are added with wraparound.
"""

from __future__ import annotations

import math
import sys

import torch

#: Number of 16-bit limbs of an int64 and their width in bits.
_LIMBS = 4
_LIMB_BITS = 16
_LIMB_MASK = (1 << _LIMB_BITS) - 1

#: Largest K per GEMM that keeps every partial sum exact in float64: the sum of up to 4 limb
#: pairs over K is at most 4 * K * (2^16 - 1)^2 < 4 * K * 2^32, below 2^53 for K <= 2^19.
MAX_EXACT_K = 2**19

#: Below this many multiply-adds the int64 loop beats splitting into limbs (fixed overhead of
#: about 0.2 ms here): [32x64]@[64x64] (131k) int64 0.28 ms vs limbs 0.39 ms, [64x128]@[128x128]
#: (1M) int64 2.3 ms vs limbs 0.85 ms. Both paths give the same bits; this only picks the faster.
SMALL_WORK = 2**18


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` for int64 tensors, exactly modulo 2^64, through float64 GEMMs.

    Same shape semantics as :func:`torch.matmul` (1-D, 2-D, batched and broadcast N-D) and
    bit-identical results. Tensors that are not both int64, and products too small to gain
    from the limb split (:data:`SMALL_WORK`), go straight to ``torch.matmul``.
    """
    if a.dtype != torch.int64 or b.dtype != torch.int64 or _work(a, b) < SMALL_WORK:
        return torch.matmul(a, b)
    return _ring_matmul(a, b, max_k=MAX_EXACT_K)


def _work(a: torch.Tensor, b: torch.Tensor) -> int:
    """Approximate multiply-adds of ``a @ b`` (batch taken as the larger operand's; a heuristic)."""
    if a.dim() == 0 or b.dim() == 0:
        return 0
    m = a.shape[-2] if a.dim() >= 2 else 1
    n = b.shape[-1] if b.dim() >= 2 else 1
    batch = max(math.prod(a.shape[:-2]), math.prod(b.shape[:-2]))
    return batch * m * a.shape[-1] * n


def _ring_matmul(a: torch.Tensor, b: torch.Tensor, *, max_k: int) -> torch.Tensor:
    """:func:`ring_matmul` without the small-size shortcut and with the K chunk length as a
    parameter (tests force the limb path and the chunking through it)."""
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
    for start in range(0, k, max_k):
        length = min(max_k, k - start)
        part = _limb_matmul(a.narrow(-1, start, length), b.narrow(kdim_b, start, length), kdim_b)
        result = part if result is None else result.add_(part)  # int64 add wraps mod 2^64
    assert result is not None
    return result


def _k_dim_of_b(b: torch.Tensor) -> int:
    """The contracted dimension of the right operand: rows of a matrix, the only dim of a vector."""
    return -2 if b.dim() >= 2 else -1


def _limb_matmul(a: torch.Tensor, b: torch.Tensor, kdim_b: int) -> torch.Tensor:
    """One K chunk (K <= MAX_EXACT_K): four fused float64 GEMMs, recombined in int64."""
    k = a.shape[-1]
    a_limbs = _split_limbs(a, dim=-1, reverse=False)  # [..., 4K]: a_0 | a_1 | a_2 | a_3
    b_limbs = _split_limbs(b, dim=kdim_b, reverse=True)  # [..., 4K, N]: b_3; b_2; b_1; b_0
    acc: torch.Tensor | None = None
    for shift in reversed(range(_LIMBS)):  # Horner: ((c3 * 2^16 + c2) * 2^16 + c1) * 2^16 + c0
        a_t = a_limbs.narrow(-1, 0, (shift + 1) * k)
        b_t = b_limbs.narrow(kdim_b, (_LIMBS - 1 - shift) * k, (shift + 1) * k)
        c_t = torch.matmul(a_t, b_t).to(torch.int64)  # exact integers below 2^53
        if acc is None:
            acc = c_t
        else:
            acc.bitwise_left_shift_(_LIMB_BITS).add_(c_t)  # wraps mod 2^64 like int64 matmul
    assert acc is not None
    return acc


def _split_limbs(x: torch.Tensor, *, dim: int, reverse: bool) -> torch.Tensor:
    """float64 tensor with ``dim`` four times longer holding the unsigned 16-bit limbs of ``x``.

    Block ``i`` along ``dim`` holds limb ``i`` (limb ``3 - i`` when ``reverse``), so that the
    operands of every fused GEMM are contiguous slices along K.
    """
    dim = dim % x.dim()
    shape = list(x.shape)
    limbs = _limbs_last(x)
    out = torch.empty(shape[:dim] + [_LIMBS] + shape[dim:], dtype=torch.float64, device=x.device)
    for limb in range(_LIMBS):
        block = _LIMBS - 1 - limb if reverse else limb
        out.select(dim, block).copy_(limbs[..., limb])  # exact: every limb is < 2^16
    return out.flatten(dim, dim + 1)


def _limbs_last(x: torch.Tensor) -> torch.Tensor:
    """``x.shape + (4,)`` integer tensor whose ``[..., i]`` is the unsigned limb ``i`` of ``x``.

    On little-endian hosts a free reinterpretation of the int64 bytes as uint16 (one memory
    pass fewer per limb than shifting and masking: about 40 % off the split), else shifts.
    """
    if sys.byteorder == "little":
        if x.stride(-1) != 1:  # also for a last dim of size 1, which contiguous() keeps as is
            x = x.clone(memory_format=torch.contiguous_format)
        return x.view(torch.uint16).unflatten(-1, (x.shape[-1], _LIMBS))
    return _limbs_by_shifts(x)


def _limbs_by_shifts(x: torch.Tensor) -> torch.Tensor:
    """Endianness-free :func:`_limbs_last`: arithmetic shift, then mask to the limb's bits."""
    limbs = [
        torch.bitwise_right_shift(x, i * _LIMB_BITS).bitwise_and_(_LIMB_MASK) for i in range(_LIMBS)
    ]
    return torch.stack(limbs, dim=-1)


__all__ = ["MAX_EXACT_K", "ring_matmul"]
