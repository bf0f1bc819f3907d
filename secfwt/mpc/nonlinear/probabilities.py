"""Softmax and cross-entropy on MPCTensors: scores to probabilities, logits to a loss.

CrypTen's ``softmax`` breaks from sequence length ~256 or with a -1e4 additive mask: its exp is
garbage below -256 and its reciprocal above ~300. :func:`softmax` subtracts the row max
(a comparison tree), uses the clamped :func:`~.exponential.exp` and inverts the row sum by
:mod:`.inverse`'s normalise-then-Newton method. :func:`cross_entropy` is the log-sum-exp form
of the loss with the same max and exp and the range-reduced :func:`~.logarithm.log` of the sum,
accurate over whole vocabularies; :func:`token_nll` averages it over a sequence's response
tokens (the instruction-tuning loss).
"""

from __future__ import annotations

import math

import torch

from secfwt.errors import FixedPointRangeError
from secfwt.mpc import beaver
from secfwt.mpc.nonlinear.activations import _softplus_ring
from secfwt.mpc.nonlinear.compare import CMP_RESOLUTION, _max_last_dim
from secfwt.mpc.nonlinear.exponential import _WIDE_EXP, _exp_ring
from secfwt.mpc.nonlinear.fixed_point import (
    _MPC,
    _ONE,
    FRAC_BITS,
    MPCTensor,
    _divide,
    _fixed,
    _mul,
    _normalise_dim,
    _plus,
    _share_of,
)
from secfwt.mpc.nonlinear.inverse import _reciprocal_parts, _scale_by_pow2
from secfwt.mpc.nonlinear.logarithm import _log_ring, log

#: Offset subtracted from masked scores before the max (public; keeps them from being the max).
SOFTMAX_MASK_OFFSET = 4096


def softmax(
    x: MPCTensor, *, dim: int = -1, mask: torch.Tensor | MPCTensor | None = None
) -> MPCTensor:
    """Softmax along ``dim`` with an optional 0/1 key mask (1 = keep), broadcastable to ``x``.

    Steps: masked scores get ``-SOFTMAX_MASK_OFFSET`` (linear, also for a secret mask); the row
    max is a halving tree of comparisons (``n - 1`` per row, one call per level; CrypTen's
    log-reduction max without its one-hot argmax and tie-breaking); ``e = exp(x - max)`` with
    :func:`exp` (exactly 0 below -15.5); ``e`` times the mask (masked keys are exactly 0); the row
    sum ``S in [0.75, 1.35 n]`` is inverted by :func:`reciprocal`'s normalise-then-Newton method,
    kept as mantissa ``y in [1, 4)`` and power of two so that ``e * y`` is formed at full precision
    before the final rescale. Max subtraction is the standard stable softmax; PUMA
    (Dong et al., arXiv:2307.12533, 2023) uses the same max-subtract and bounded exp in MPC.

    Accuracy: max absolute error ~1e-4 (1e-3 asserted in the tests) for any scores with
    ``max - min + SOFTMAX_MASK_OFFSET < CMP_RANGE`` (e.g. scores in [-14000, 14000]) and any
    length; rows sum to 1 within the same error. A fully masked row returns all zeros. Scores
    may also carry a Hugging Face style additive -1e4 mask instead of ``mask``.
    Cost per element: ~2 comparisons (max tree and exp clamp), ~8 products (6 of them
    in exp); per row ``ceil(log4(2n))`` exact comparisons and 6 products for the reciprocal.
    """
    s = _share_of(x, "x")
    dim = _normalise_dim(dim, x.dim())
    s = s.transpose(dim, -1)  # (..., n)
    keep_public, keep_secret = _mask_parts(mask, tuple(x.size()), dim)
    if keep_public is not None:
        s = _plus(s, (keep_public - 1) * (SOFTMAX_MASK_OFFSET * _ONE))
    if keep_secret is not None:  # 0 or 2^16
        s = _plus(s + keep_secret * SOFTMAX_MASK_OFFSET, -SOFTMAX_MASK_OFFSET * _ONE)
    n = s.size(-1)
    e = _exp_ring(s - _max_last_dim(s))  # x - max <= 0 up to the comparison resolution
    if keep_public is not None:
        e = e * keep_public
    if keep_secret is not None:
        e = _divide(_mul(e, keep_secret), _ONE)
    total = e.sum(-1, keepdim=True)  # (..., 1)
    y, where = _reciprocal_parts(total, frac_bits=FRAC_BITS, lo=0.5, hi=max(2.0, 2.0 * n))
    p = _divide(_mul(e, y), _ONE)  # (..., n), in [0, 4)
    p = _scale_by_pow2(p, where.onehot, [-e_ for e_ in where.exps], out_bits=1)
    return _fixed(p.transpose(dim, -1))


def _mask_parts(
    mask: torch.Tensor | MPCTensor | None, shape: tuple[int, ...], dim: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A 0/1 key mask as (public 0/1 int64 tensor, None) or (None, secret share of 0 or 2^16),
    expanded to ``shape`` and with ``dim`` moved last."""
    if mask is None:
        return None, None
    if not (torch.is_tensor(mask) or isinstance(mask, _MPC)):
        raise TypeError(f"mask must be a torch tensor or an MPCTensor, got {type(mask).__name__}")
    try:
        target = beaver.broadcast_shapes(tuple(mask.size()), shape)
    except RuntimeError as exc:
        raise ValueError(
            f"mask of shape {tuple(mask.size())} does not broadcast to {shape}"
        ) from exc
    if target != shape:
        raise ValueError(f"mask of shape {tuple(mask.size())} would enlarge x of shape {shape}")
    if isinstance(mask, _MPC):
        scale = mask.encoder.scale
        if scale not in (1, _ONE):
            raise FixedPointRangeError(
                f"a secret mask must have scale 1 or 2^{FRAC_BITS}, has {scale}"
            )
        return None, (mask.share * (_ONE // scale)).expand(*shape).transpose(dim, -1)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 (drop) and 1 (keep)")
    return mask.to(torch.long).expand(*shape).transpose(dim, -1), None


#: Bound on a per-token loss ``logsumexp(z) - z_y`` that :func:`token_nll` supports (for logits
#: in [-30, 40] and V = 2^16 at most it is below 70 + log V < 82).
TOKEN_NLL_BOUND = 128.0


#: Extra fractional bits of the exponentials summed in a log-sum-exp: the sum of n terms is then
#: truncated once, from below n 2^40 (a failure probability n 2^-24 per row, 2^-8 of it for the
#: rows real language models give, whose sums stay below ~16).
_SUM_EXTRA_BITS = 8


def cross_entropy(logits: MPCTensor, onehot: MPCTensor | torch.Tensor) -> MPCTensor:
    """Cross-entropy over the last dim, ``logsumexp(z) - <onehot, z>``: (..., C) -> (...).

    ``onehot`` is secret (shares of 0/1, scale 1 or 2^16) or public (a 0/1 tensor). Range-safe for
    any number of classes up to 2^17 (vocabularies included): :func:`_log_sum_exp_ring`.
    Accuracy: see :func:`_log_sum_exp_ring`; the target logit is exact (one product per element
    left untruncated until the row sum). Two classes take ``softplus(z_o - z_t)`` for the other
    class ``o`` instead (:func:`.activations._softplus_ring`: 1.7e-4 measured where the
    log-sum-exp took 3.6e-4, in fewer bytes and rounds).
    """
    s = _share_of(logits, "logits")
    if s.size(-1) == 2:
        # logsumexp(z) - z_t = softplus(z_o - z_t) for the other class o: one softplus per row
        # (about 100 bytes per party) where the max, two exps and a log took about 280
        margin = s.sum(-1) - 2 * _target_logit(s, onehot)
        return _fixed(_softplus_ring(margin))
    return _fixed(_log_sum_exp_ring(s) - _target_logit(s, onehot))


def _log_sum_exp_ring(s: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim, ``m' + log(sum_j exp(z_j - m'))``, on shares.

    ``m`` is the comparison tree's row max (:func:`.compare._max_last_dim`), within
    ``ceil(log2 n) * CMP_RESOLUTION`` (0.5 for n = 49,152) below the true max; ``m'`` adds that
    public slack so that every ``z - m' <= 0`` is in :func:`.exponential.exp`'s range and the
    sum lies in ``[e^-slack, n]``. The identity ``logsumexp(z) = m' + log sum exp(z - m')``
    holds for any ``m'``, so neither the tree's error nor the slack enters the result. The sum's
    log is :func:`.logarithm.log` on ``[1/2, n]`` (powers of four, then a Chebyshev series).
    Max-subtracted log-sum-exp with a bounded exp is PUMA's softmax recipe (Dong et al.,
    arXiv:2307.12533, 2023), here with the exp's clamp lowered from softmax's -15.5 to -23.5:
    at -15.5 the dropped tail was up to 1.5e-3 of the sum on logits shaped like
    SmolLM2-135M-Instruct's (6.5e-4 measured on its own logits); at -23.5 it is below
    ``n e^-23 = 5e-6``.

    Accuracy (absolute, on ``logsumexp``): each term's truncations are unbiased and its last one
    is to 2^-24, so the ~10^4 terms of a row add up to ~1e-4 of noise where 2^-16 each made 7e-4;
    exp's fit error is 1.5e-5 relative, the log adds ~6e-5. Cost per row of n: ``n - 1``
    comparisons in ``ceil(log2 n)`` calls; per element exp's comparison, 4 products, a bit
    product and 3 squares; per row ``ceil(log4 2n)`` exact comparisons and 7 products.
    """
    n = s.size(-1)
    slack = math.ceil(math.log2(max(n, 2))) * CMP_RESOLUTION
    m = _plus(_max_last_dim(s), round(slack * _ONE))  # (..., 1)
    # terms kept to 2^-24 until the row sum (each term's rounding is then 1/256 of a 2^-16 unit)
    terms = _exp_ring(s - m, _WIDE_EXP, extra_bits=_SUM_EXTRA_BITS)  # (..., n)
    total = _divide(terms.sum(-1), 1 << _SUM_EXTRA_BITS)  # (...,) in [e^-slack, n]
    return _log_ring(total, lo=0.5, hi=max(2.0, float(n))) + m.squeeze(-1)


def _target_logit(s: torch.Tensor, onehot: MPCTensor | torch.Tensor) -> torch.Tensor:
    """Shares of ``<onehot, z>`` over the last dim (16 fractional bits)."""
    if isinstance(onehot, _MPC):
        scale = onehot.encoder.scale
        if scale not in (1, _ONE) or tuple(onehot.size()) != tuple(s.size()):
            raise ValueError(
                f"onehot must be shares of 0/1 with scale 1 or 2^{FRAC_BITS} and the logits' "
                f"shape {tuple(s.size())}; got scale {scale}, shape {tuple(onehot.size())}"
            )
        return _divide(_mul(s, onehot.share).sum(-1), scale)  # one truncation per row
    if not torch.is_tensor(onehot) or tuple(onehot.shape) != tuple(s.size()):
        raise ValueError(f"onehot must be a tensor of the logits' shape {tuple(s.size())}")
    if not bool(((onehot == 0) | (onehot == 1)).all()):
        raise ValueError("a public onehot must contain only 0 and 1")
    return (s * onehot.to(torch.long)).sum(-1)


def log_on_class_range(s: MPCTensor, num_classes: int) -> MPCTensor:
    """log(s) for s in [1, num_classes] (the sum of exp(z - max z) over classes): :func:`log`."""
    return log(s, lo=0.5, hi=max(2.0, float(num_classes)))


def token_nll(
    logits: MPCTensor, onehot: MPCTensor | torch.Tensor, weights: MPCTensor | torch.Tensor
) -> MPCTensor:
    """Per-sequence weighted mean of token cross-entropies: (N, T, V), (N, T, V), (N, T) -> (N,).

    ``loss[n] = sum_t w[n,t] (logsumexp(z[n,t]) - <onehot[n,t], z[n,t]>) / sum_t w[n,t]``, the
    instruction-tuning loss with ``w`` the response mask (1 = response token). ``weights`` may
    be secret (shares; what a response mask reveals, each sequence's prompt and response
    lengths, stays hidden) with values in [0, 1] and row sums in [1, T], or public (a tensor of
    non-negative weights, every row summing to more than 0; it then discloses those lengths to
    both parties, which the job's terms must say). Each token's loss must stay below
    ``TOKEN_NLL_BOUND``.

    The division keeps full precision: ``1/W = y 2^-E`` with ``y in [1, 4)`` (secret ``W``:
    :func:`.inverse.reciprocal`'s normalise-then-Newton parts; public ``W``: computed locally),
    the weighted sum is first scaled by ``2^-E`` (one product by a small secret integer; its
    value is then about the loss, so the 2^-16 resolution costs nothing) and then multiplied by
    ``y``. A plain ``sum * reciprocal(W)`` would keep 1/W to only 2^-16 absolute (0.3 % at
    W = 200). Cost beyond :func:`cross_entropy`: per element 1 product (secret weights), per
    row ``ceil(log4 2T)`` exact comparisons and 9 products (none for public weights).
    """
    nll = _share_of(cross_entropy(logits, onehot), "nll")  # (N, T)
    if nll.dim() != 2:
        raise ValueError(f"logits must be (N, T, V), got {tuple(logits.size())}")
    return _weighted_row_mean(nll, weights)


def target_token_nll(
    logits: MPCTensor, target_logits: MPCTensor, weights: MPCTensor | torch.Tensor
) -> MPCTensor:
    """:func:`token_nll` with the target logits given: (N, T, V), (N, T), (N, T) -> (N,).

    ``target_logits[n, t]`` is the logit of the token to predict, ``z[n, t, y] = <x, E[y]>`` for
    the final hidden state x and the LM head's row ``E[y]``; a caller that holds shares of
    ``E[y]`` (looked up once per example) computes it in one (N, T, H) product and never forms
    the (N, T, V) one-hot rows, which :func:`token_nll` multiplies into the logits at every call.
    Accuracy and cost otherwise as :func:`token_nll`.
    """
    s, target = _share_of(logits, "logits"), _share_of(target_logits, "target_logits")
    if s.dim() != 3 or tuple(target.shape) != tuple(s.shape[:-1]):
        raise ValueError(
            f"logits must be (N, T, V) and target_logits (N, T); got {tuple(s.shape)} and "
            f"{tuple(target.shape)}"
        )
    return _weighted_row_mean(_log_sum_exp_ring(s) - target, weights)


def _weighted_row_mean(nll: torch.Tensor, weights: MPCTensor | torch.Tensor) -> MPCTensor:
    """``sum_t w nll / sum_t w`` per row of the shares ``nll`` (N, T), at full precision (see
    :func:`token_nll`)."""
    n, t = nll.shape
    if isinstance(weights, _MPC):
        if tuple(weights.size()) != (n, t) or weights.encoder.scale != _ONE:
            raise ValueError(f"secret weights must be ({n}, {t}) with 16 fractional bits")
        w = weights.share
        total = _divide(_mul(nll, w).sum(-1), _ONE)  # (N,) sum_t w nll
        y, where = _reciprocal_parts(w.sum(-1), frac_bits=FRAC_BITS, lo=0.5, hi=max(2.0, 2.0 * t))
        out_bits = math.ceil(math.log2(TOKEN_NLL_BOUND))
        q = _scale_by_pow2(total, where.onehot, [-e for e in where.exps], out_bits=out_bits)
        return _fixed(_divide(_mul(q, y), _ONE))
    w_pub = torch.as_tensor(weights, dtype=torch.float64)
    if tuple(w_pub.shape) != (n, t) or not bool((w_pub >= 0).all()):
        raise ValueError(f"public weights must be ({n}, {t}) and non-negative")
    sums = w_pub.sum(-1)
    if not bool((sums > 0).all()):
        empty = [int(i) for i in torch.nonzero(sums <= 0).flatten()]
        raise ValueError(f"weights: rows {empty} count no token (the loss would be 0/0)")
    w_fixed = torch.round(w_pub * _ONE).to(torch.long)  # public weights to 2^-16
    total = _divide((nll * w_fixed).sum(-1), _ONE)
    exps = torch.ceil(torch.log2(sums)).clamp(min=0)  # 2^E >= W
    y = torch.round(torch.exp2(exps) / sums * _ONE).to(torch.long)  # 2^E / W in [1, 2)
    q = total.div(torch.exp2(exps).to(torch.long), rounding_mode="trunc")
    return _fixed(_divide(q * y, _ONE))
