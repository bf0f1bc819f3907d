"""ring_matmul is bit-identical to torch's int64 matmul (wraparound modulo 2^64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secfwt.mpc.ring import MAX_EXACT_K, SMALL_WORK, _ring_matmul, ring_matmul

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
EDGE_VALUES = torch.tensor([INT64_MIN, INT64_MAX, 0, -1], dtype=torch.int64)


def full_range(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(INT64_MIN, INT64_MAX, shape, dtype=torch.int64, generator=gen)


def edge_values(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, len(EDGE_VALUES), shape, generator=gen)
    return EDGE_VALUES[idx]


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, *, max_k: int = MAX_EXACT_K) -> None:
    expected = torch.matmul(a, b)
    for got in (ring_matmul(a, b), _ring_matmul(a, b, max_k=max_k)):
        assert got.dtype == torch.int64
        assert got.shape == expected.shape
        assert torch.equal(got, expected)


SHAPES = [
    ((7,), (7,)),  # dot -> 0-d
    ((5,), (5, 3)),  # vector @ matrix
    ((4, 5), (5,)),  # matrix @ vector
    ((6, 9), (9, 4)),
    ((3, 6, 9), (9, 4)),  # batched @ matrix
    ((6, 9), (3, 9, 4)),  # matrix @ batched
    ((2, 1, 6, 9), (3, 9, 4)),  # broadcast batch dims, 4-D
    ((2, 3, 6, 9), (2, 1, 9, 4)),
    ((9,), (2, 3, 9, 4)),  # vector @ batched
    ((2, 3, 6, 9), (9,)),  # batched @ vector
    ((0, 9), (9, 4)),  # empty M
    ((6, 0), (0, 4)),  # empty K: zeros
    ((6, 9), (9, 0)),  # empty N
]


@pytest.mark.parametrize(("shape_a", "shape_b"), SHAPES)
@pytest.mark.parametrize("values", [full_range, edge_values])
def test_matches_torch_int64(shape_a: tuple[int, ...], shape_b: tuple[int, ...], values) -> None:
    gen = torch.Generator().manual_seed(1234)
    a, b = values(shape_a, gen), values(shape_b, gen)
    assert_bit_identical(a, b)
    assert_bit_identical(a, b, max_k=2)  # several K chunks


@pytest.mark.parametrize("value", EDGE_VALUES.tolist())
def test_constant_edge_values(value: int) -> None:
    a = torch.full((5, 33), value, dtype=torch.int64)
    b = torch.full((33, 3), value, dtype=torch.int64)
    assert_bit_identical(a, b)
    assert_bit_identical(a, -b)


def test_large_product_takes_limb_path() -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = full_range((64, 200), gen), full_range((200, 48), gen)
    assert 64 * 200 * 48 >= SMALL_WORK
    assert torch.equal(ring_matmul(a, b), torch.matmul(a, b))


def test_non_contiguous_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    a = full_range((20, 12), gen).t()  # [12, 20], column-major
    b = full_range((8, 20, 3), gen)[::2].transpose(-1, -2).transpose(-1, -2)
    assert_bit_identical(a, b)
    assert_bit_identical(a[:, ::2], full_range((10, 5), gen), max_k=3)
    expanded = full_range((20, 4), gen).expand(3, 20, 4)  # stride 0 batch dim
    assert_bit_identical(full_range((3, 2, 20), gen), expanded, max_k=7)


def test_exact_at_the_float64_bound() -> None:
    """All limbs 0xFFFF with K = 2^19 makes the widest GEMM sum reach 4 K (2^16-1)^2 < 2^53."""
    a = torch.full((2, MAX_EXACT_K), -1, dtype=torch.int64)
    b = torch.full((MAX_EXACT_K, 2), -1, dtype=torch.int64)
    assert torch.equal(_ring_matmul(a, b, max_k=MAX_EXACT_K), torch.matmul(a, b))


def test_k_beyond_the_bound_is_chunked() -> None:
    k = MAX_EXACT_K + 5
    gen = torch.Generator().manual_seed(11)
    a = torch.full((k,), -1, dtype=torch.int64)
    a[:100] = full_range((100,), gen)
    b = full_range((k, 2), gen)
    assert_bit_identical(a, b)
    lowest = torch.full((k,), INT64_MIN, dtype=torch.int64)
    assert_bit_identical(lowest, torch.full((k,), -1, dtype=torch.int64))


def test_rejects_inexact_chunk_length() -> None:
    a = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="max_k"):
        _ring_matmul(a, a, max_k=MAX_EXACT_K + 1)


def test_other_dtypes_and_errors_are_torchs() -> None:
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(ring_matmul(x, y), torch.matmul(x, y))
    i = torch.ones(4, 5, dtype=torch.int64)
    with pytest.raises(RuntimeError):
        ring_matmul(i, torch.ones(4, 5, dtype=torch.int64))  # K mismatch
    with pytest.raises(RuntimeError):
        _ring_matmul(i, torch.ones(4, 5, dtype=torch.int64), max_k=4)
    with pytest.raises(RuntimeError):
        ring_matmul(i, y.float())  # mixed dtypes


@st.composite
def matmul_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes torch.matmul accepts: 1-D or N-D on either side, broadcastable batch dims."""
    m, k, n = (draw(st.integers(1, 6)) for _ in range(3))
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    batch_a = [d if draw(st.booleans()) else 1 for d in batch]
    batch_b = [d if draw(st.booleans()) else 1 for d in batch]
    batch_b = batch_b[draw(st.integers(0, len(batch_b))) :]  # b may have fewer batch dims
    shape_a = (k,) if draw(st.booleans()) else (*batch_a, m, k)
    shape_b = (k,) if draw(st.booleans()) else (*batch_b, k, n)
    return shape_a, shape_b


@settings(max_examples=60, deadline=None)
@given(
    shapes=matmul_shapes(), seed=st.integers(0, 2**31), max_k=st.integers(1, 7), edges=st.booleans()
)
def test_random_shapes(shapes, seed: int, max_k: int, edges: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = edge_values if edges else full_range
    a, b = values(shapes[0], gen), values(shapes[1], gen)
    assert_bit_identical(a, b, max_k=max_k)


def test_limb_split_matches_shifts() -> None:
    """The uint16 reinterpretation used on little-endian hosts equals the shift-and-mask split."""
    from secfwt.mpc.ring import _limbs_by_shifts, _limbs_last

    gen = torch.Generator().manual_seed(5)
    x = torch.cat([full_range((3, 7), gen), edge_values((3, 7), gen)])
    by_shifts = _limbs_by_shifts(x)
    assert by_shifts.shape == (6, 7, 4)
    assert bool(((by_shifts >= 0) & (by_shifts < 2**16)).all())
    assert torch.equal(_limbs_last(x).to(torch.int64), by_shifts)
    assert torch.equal(_limbs_last(x.t()).to(torch.int64), _limbs_by_shifts(x.t()))
    weights = torch.tensor([1, 2**16, 2**32, 2**48], dtype=torch.int64)
    assert torch.equal((by_shifts * weights).sum(-1), x)  # wraps back to x modulo 2^64
