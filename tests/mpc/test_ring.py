"""ring_matmul is bit-identical to torch's int64 matmul (wraparound modulo 2^64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secfwt.mpc import ring_tuning
from secfwt.mpc.ring import MAX_EXACT_K, SMALL_WORK, _ring_matmul, ring_matmul
from secfwt.mpc.ring_tuning import Method

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


@pytest.mark.parametrize("method", [Method.TORCH, Method.LIMBS])  # DEVICE: test_device.py
def test_large_product_takes_the_chosen_path(method: Method) -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = full_range((64, 200), gen), full_range((200, 48), gen)
    assert 64 * 200 * 48 >= SMALL_WORK
    with ring_tuning.forcing(method):
        assert torch.equal(ring_matmul(a, b), torch.matmul(a, b))
        (rec,) = ring_tuning.records()
    assert rec["method"] == method.value and rec["calls"] == 1


def test_non_contiguous_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    a = full_range((20, 12), gen).t()  # [12, 20], column-major
    b = full_range((8, 20, 3), gen)[::2].transpose(-1, -2).transpose(-1, -2)
    assert_bit_identical(a, b)
    assert_bit_identical(a[:, ::2], full_range((10, 5), gen), max_k=3)
    expanded = full_range((20, 4), gen).expand(3, 20, 4)  # stride 0 batch dim
    assert_bit_identical(full_range((3, 2, 20), gen), expanded, max_k=7)


def test_exact_at_the_float64_bound() -> None:
    """Limbs all -2^21 with K = 2^10 make the widest GEMM sum (shift 1: two limb products per k)
    reach K * 2 * 2^42 = 2^53, the last integer float64 still holds exactly at every step."""
    from secfwt.mpc.ring import _signed_limbs

    x = -(2**21) - 2**43  # both 22-bit limbs are -2^21, the top limb is 0
    assert _signed_limbs(torch.tensor([x])).tolist() == [[-(2**21), -(2**21), 0]]
    a = torch.full((2, MAX_EXACT_K), x, dtype=torch.int64)
    b = torch.full((MAX_EXACT_K, 2), x, dtype=torch.int64)
    assert torch.equal(_ring_matmul(a, b, max_k=MAX_EXACT_K), torch.matmul(a, b))
    lowest = -(2**21) - 2**43 + 2**63  # y = x + 2^21 + 2^43 wraps to -2^63: top limb -2^19
    assert _signed_limbs(torch.tensor([lowest])).tolist() == [[-(2**21), -(2**21), -(2**19)]]
    a = torch.full((2, MAX_EXACT_K), lowest, dtype=torch.int64)
    assert torch.equal(_ring_matmul(a, a.t(), max_k=MAX_EXACT_K), torch.matmul(a, a.t()))


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


def test_signed_limbs_recombine_within_their_bounds() -> None:
    """The split the GEMMs use: x = s_0 + s_1 2^22 + s_2 2^44 modulo 2^64, with the limb
    bounds the exactness argument (MAX_EXACT_K) relies on."""
    from secfwt.mpc.ring import _signed_limbs

    gen = torch.Generator().manual_seed(5)
    x = torch.cat([full_range((3, 7), gen), edge_values((3, 7), gen)])
    limbs = _signed_limbs(x)
    assert limbs.shape == (6, 7, 3)
    assert bool(((limbs[..., :2] >= -(2**21)) & (limbs[..., :2] < 2**21)).all())
    assert bool(((limbs[..., 2] >= -(2**19)) & (limbs[..., 2] < 2**19)).all())
    weights = torch.tensor([1, 2**22, 2**44], dtype=torch.int64)
    assert torch.equal((limbs * weights).sum(-1), x)  # wraps back to x modulo 2^64


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [((5, 7), (7, 3)), ((2, 6, 9), (9, 4)), ((2, 6, 9), (2, 9, 4)), ((3, 4500), (4500, 2))],
)
def test_narrow_matches_torch_int64(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
    """A full-range left operand times a right one below NARROW_BOUND (K = 4500: 3 chunks)."""
    from secfwt.mpc.ring import NARROW_BOUND, ring_matmul_narrow

    gen = torch.Generator().manual_seed(8)
    a = torch.cat([full_range(shape_a, gen).reshape(-1)[:-4], EDGE_VALUES]).reshape(shape_a)
    b = torch.randint(-NARROW_BOUND + 1, NARROW_BOUND, shape_b, generator=gen)
    b.view(-1)[:2] = torch.tensor([NARROW_BOUND - 1, -NARROW_BOUND + 1])
    assert torch.equal(ring_matmul_narrow(a, b.double()), torch.matmul(a, b))
    extreme = torch.full(shape_a, -(2**21) - 2**43, dtype=torch.int64)  # limbs -2^21, -2^21, 0
    full = torch.full(shape_b, -NARROW_BOUND + 1, dtype=torch.int64)
    assert torch.equal(ring_matmul_narrow(extreme, full.double()), torch.matmul(extreme, full))


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [
        ((6, 9), (9, 4)),
        ((3, 6, 9), (9, 4)),
        ((2, 6, 9), (2, 9, 4)),
        ((5, 2 * MAX_EXACT_K + 3), (2 * MAX_EXACT_K + 3, 3)),
    ],
)
def test_prepared_right_operand_is_bit_identical(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> None:
    """A right operand split once (fixed masks of frozen weights) gives torch's bits, also
    across K chunks and with edge values, product after product."""
    from secfwt.mpc.ring import PreparedRight, ring_matmul_prepared

    gen = torch.Generator().manual_seed(11)
    b = full_range(shape_b, gen)
    b.view(-1)[: len(EDGE_VALUES)] = EDGE_VALUES
    prepared = PreparedRight(b)
    assert prepared.nbytes == 3 * b.numel() * 8
    for make in (full_range, edge_values, full_range):
        a = make(shape_a, gen)
        assert torch.equal(ring_matmul_prepared(a, prepared), torch.matmul(a, b))
    with pytest.raises(TypeError):
        ring_matmul_prepared(full_range((2, shape_b[-2] + 1), gen), prepared)
