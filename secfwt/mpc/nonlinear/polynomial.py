"""Polynomials on shares: Chebyshev series with every factor opened once, and their fits.

* **Each factor opened once.** A polynomial's products share factors (``T_2`` enters ``T_3`` and
  ``T_4``). :class:`_OpenedOnce` opens every factor once and the dealer supplies the products of
  their masks, so a degree-8 Chebyshev series opens 4 values per element instead of 7
  (:func:`_chebyshev_series`, a baby-step / giant-step split as in Paterson and Stockmeyer,
  SIAM J. Comput. 1973).
* **Fits are deterministic.** Coefficients are least squares at Chebyshev nodes (near-minimax:
  Trefethen, *Approximation Theory and Approximation Practice*, 2013), numpy only, so every
  party derives the same ones.
* :func:`_clenshaw` evaluates a series on MPCTensors (no share-level tricks) for inputs whose
  range is known by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from secfwt.crypten_compat import crypten
from secfwt.errors import ProtocolError
from secfwt.mpc import beaver
from secfwt.mpc.nonlinear.fixed_point import _ONE, _divide, _mul, _plus

_COEF_BITS = 16  # fractional bits of public polynomial coefficients (on top of the data's 16)
_FIT_NODES = 4000


class _OpenedOnce:
    """Products among a fixed set of values (same shape) in which each value is opened only once,
    however many products it enters: Beaver's protocol with a value's mask reused across its
    products (the dealer supplies ``a_i a_j`` for every pair, :func:`beaver.mask_products`).

    Value ``k`` is opened as ``d_k = x_k - a_k`` with its own uniform mask ``a_k``, so every opening
    is a one-time pad as in Beaver's protocol, and
    ``x_i x_j = d_i d_j + d_i a_j + d_j a_i + a_i a_j`` is local given the openings. Without the
    TTP dealer each product is an ordinary Beaver product.
    """

    def __init__(
        self,
        size: torch.Size,
        keys: Sequence[int],
        pairs: Sequence[tuple[int, int]],
        *,
        select: int | None = None,
    ) -> None:
        # ``select``: a value (key) a bit will also select (:meth:`select_shares`); it comes
        # first among the masks, the one the dealer keeps for it
        keys = list(keys) if select is None else [select, *(k for k in keys if k != select)]
        self._index = {k: i for i, k in enumerate(keys)}
        self._pair = {p: i for i, p in enumerate(pairs)}
        self._select = select
        indices = tuple((self._index[i], self._index[j]) for i, j in pairs)
        dealt = beaver.mask_products(size, len(keys), indices, keep_first=select is not None)
        self._a: torch.Tensor | None = None  # masks a_k, stacked on dim 0; None without the dealer
        self._c_of: Callable[[], torch.Tensor] | None = None
        if dealt is not None:
            self._a, self._c_of = dealt
        self._c: torch.Tensor | None = None
        self._known: dict[int, torch.Tensor] = {}  # d_k (opened), or x_k itself without the dealer
        self._rank0 = crypten.communicator.get().get_rank() == 0

    def open(self, values: dict[int, torch.Tensor]) -> None:
        """Open those of ``values`` not opened yet, in one exchange."""
        fresh = [k for k in values if k not in self._known]
        if self._a is None:
            self._known.update({k: values[k] for k in fresh})
        elif fresh:
            masked = torch.stack([values[k] - self._a[self._index[k]] for k in fresh])
            self._known.update(
                zip(fresh, crypten.communicator.get().all_reduce(masked), strict=True)
            )

    @property
    def dealt(self) -> bool:
        """Whether the TTP dealer gave the masks (else :meth:`product` is a Beaver product and
        :meth:`select_shares` is unavailable)."""
        return self._a is not None

    def select_shares(
        self, k: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]]:
        """For a bit select of the opened value ``k`` (``compare._select``'s protocol with this
        value's own mask, so the value is not opened again) and of one more value, once: ``k``'s
        opening ``d_k`` and the dealer's bits for both (:func:`beaver.mask_select`, requested
        now, its reply read after the select's exchange)."""
        if self._c is None and self._c_of is not None:  # one dealer request open at a time
            self._c = self._c_of()
        dealt = beaver.mask_select(self._known[k].size()) if k == self._select else None
        if dealt is None:
            raise ProtocolError(f"value {k} was not opened for a select with the dealer's mask")
        self._select = None
        return self._known[k], dealt

    def product(self, i: int, j: int) -> torch.Tensor:
        """Share of ``x_i x_j`` (exact ring product) for opened ``i``, ``j``."""
        if self._a is None or self._c_of is None:  # no dealer: both None
            return _mul(self._known[i], self._known[j])
        if self._c is None:
            self._c = self._c_of()
        d_i, d_j = self._known[i], self._known[j]
        a_i, a_j = self._a[self._index[i]], self._a[self._index[j]]
        z = d_i * a_j + d_j * a_i + self._c[self._pair[(i, j)]]
        return z + d_i * d_j if self._rank0 else z


def _square(a: torch.Tensor) -> torch.Tensor:
    """Share of the exact ring square: one opening, as CrypTen's square protocol, with the
    dealer's ``r^2`` requested before the opening instead of awaited before it."""
    once = _OpenedOnce(a.size(), [0], [(0, 0)])
    once.open({0: a})
    return once.product(0, 0)


def _basis_schedule(degree: int) -> list[tuple[int, list[int]]]:
    """The doubling levels of :func:`_chebyshev_basis`: ``(p, js)`` forms ``T_(p+j)`` for ``j``
    in ``js``."""
    levels, p = [], 1
    while p < degree:
        levels.append((p, [j for j in range(1, p + 1) if p + j <= degree]))
        p *= 2
    return levels


def _chebyshev_basis(
    u: torch.Tensor, degree: int, products: _OpenedOnce
) -> dict[int, torch.Tensor]:
    """Shares of ``T_1 .. T_degree`` of ``u`` (16 frac bits), one opening per doubling level.

    Uses ``T_(p+j) = 2 T_p T_j - T_(p-j)`` with ``p`` doubling, so all ``T_(p+1) .. T_(2p)`` come
    from one round; ``products`` opens each ``T_j`` once, at the first level that needs it.
    """
    basis = {1: u}
    for p, js in _basis_schedule(degree):
        products.open({k: basis[k] for k in (p, *js)})
        for j in js:
            twice = _divide(products.product(p, j), _ONE // 2)
            basis[p + j] = twice - basis[p - j] if p > j else _plus(twice, -_ONE)
    return basis


_B = -1  # key of the series' inner combination among _OpenedOnce's values


def _chebyshev_series(u: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_j c_j T_j(u)`` (16 frac bits) for ``u`` in [-1, 1], with ``ceil(n/2)`` products.

    With ``m = ceil(n/2)`` and ``T_(m+i) = 2 T_m T_i - T_(m-i)``, the series of degree ``n`` is
    ``A + 2 T_m B`` where ``A`` and ``B`` are public combinations of ``T_0 .. T_m`` (a baby-step /
    giant-step split as in Paterson and Stockmeyer, SIAM J. Comput. 1973): ``m - 1`` products
    for the basis plus one, instead of ``n - 1``; ``ceil(log2 m) + 1`` rounds. Every factor is
    opened once (:class:`_OpenedOnce`): for degree 8, ``T_1``, ``T_2``, ``T_4`` and ``B``, 32 bytes
    per element where a fresh Beaver triple per product opened 56.
    """
    n = len(coefficients) - 1
    m = max(1, math.ceil(n / 2))
    schedule = _basis_schedule(m)
    pairs = [(p, j) for p, js in schedule for j in js] + ([(m, _B)] if n > m else [])
    keys = sorted({k for pair in pairs for k in pair})
    products = _OpenedOnce(u.size(), keys, pairs)
    basis = _chebyshev_basis(u, m, products)
    outer = list(coefficients[: m + 1])  # A
    inner = [0.0] * (m + 1)  # B
    for i in range(1, n - m + 1):
        outer[m - i] -= coefficients[m + i]
        inner[i] = coefficients[m + i]
    total = _chebyshev_combination(basis, outer)
    if n > m:
        products.open({m: basis[m], _B: _chebyshev_combination(basis, inner)})
        total = total + _divide(products.product(m, _B), _ONE // 2)
    return total


def _chebyshev_combination(
    basis: dict[int, torch.Tensor], coefficients: Sequence[float]
) -> torch.Tensor:
    """``sum_j c_j T_j`` for public ``c`` (kept to 2^-32, one truncation), ``T_0 = 1``."""
    terms = torch.stack([basis[j] for j in range(1, len(coefficients))])
    weights = torch.tensor([round(c * 2**_COEF_BITS) for c in coefficients[1:]], dtype=torch.long)
    weights = weights.view(-1, *([1] * (terms.dim() - 1)))
    acc = _divide((terms * weights).sum(0), 1 << _COEF_BITS)
    return _plus(acc, round(coefficients[0] * _ONE))


def _affine_public(u: torch.Tensor, coefficients: tuple[float, float]) -> torch.Tensor:
    """``c0 + c1 u`` with public constants kept to 2^-32 (16 frac bits)."""
    c0, c1 = coefficients
    return _plus(_divide(u * round(c1 * 2**_COEF_BITS), 1 << _COEF_BITS), round(c0 * _ONE))


def _chebyshev_fit(fn: Callable[[np.ndarray], np.ndarray], degree: int) -> tuple[float, ...]:
    """Least-squares Chebyshev coefficients of ``fn`` on [-1, 1] at 4000 Chebyshev nodes.

    Deterministic (no randomness, numpy only), so every party derives the same coefficients."""
    k = np.arange(_FIT_NODES)
    t = np.cos(np.pi * (k + 0.5) / _FIT_NODES)
    return tuple(float(c) for c in np.polynomial.chebyshev.chebfit(t, fn(t), degree))


def _even_part_fit(
    fn: Callable[[np.ndarray], np.ndarray], half_square: int, degree: int
) -> tuple[float, ...]:
    """Coefficients of the even ``h(x) = fn(x) - x/2`` as a series in ``x^2 / half_square - 1``."""

    def even_part(s: np.ndarray) -> np.ndarray:
        x = np.sqrt(half_square * (s + 1.0))
        return fn(x) - x / 2.0

    return _chebyshev_fit(even_part, degree)


def _clenshaw(t: Any, coef: tuple[float, ...]) -> Any:
    """sum_k coef[k] T_k(t) by Clenshaw's recurrence: one secret product per degree, all
    intermediate values bounded by sum |coef| (no growth of monomial coefficients)."""
    b1: Any = None
    b2: Any = None
    for a in reversed(coef[1:]):
        acc: Any = (t * b1) * 2.0 if b1 is not None else None
        b0 = a if acc is None else acc + a
        if b2 is not None:
            b0 = b0 - b2
        b1, b2 = b0, b1
    if b1 is None:
        return t * 0.0 + coef[0]
    out = t * b1 + coef[0]
    return out - b2 if b2 is not None else out
