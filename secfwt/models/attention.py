"""Self-attention cores: softmax attention and Random Feature Attention (RFA).

Both take per-head queries, keys and values of shape (N, nh, T, dh) and a key mask of shape
(N, 1, 1, T) (1 = real token, 0 = padding) and run unchanged on :class:`PlainOps` and
:class:`SecureOps`.

RFA follows SecFwT / SecP-Tuning (Luo et al., arXiv 2506.15307), which replaces softmax with
Random Feature Attention (Peng et al., ICLR 2021: queries and keys are l2-normalised, then mapped
by random features so attention becomes linear in the sequence length). The feature map here is
the positive one of FAVOR+ (Choromanski et al., ICLR 2021) because it keeps the normaliser
positive, which trigonometric features do not:

    q^ = q / |q|,  k^ = k / |k|,  u_i(x) = w_i . x,  w_i ~ N(0, I_dh) (public, seeded)
    phi_i(x) = exp(sigma * u_i(x) - c) / sqrt(D)        i = 1..D
    E[phi(q^) . phi(k^)] = e^{sigma^2 - 2c} / D * exp(sigma^2 q^.k^)    (a softmax kernel at
                                                                         temperature sigma^2)
    out_t = sum_j m_j (phi(q_t).phi(k_j)) v_j / sum_j m_j (phi(q_t).phi(k_j))

The constant c = sigma * tau (tau = 2) cancels in the ratio; it only centres exp's argument so
the features sit well inside the fixed-point range. |u_i| <= |w_i| by Cauchy-Schwarz, so exp
is evaluated on a public bound with no comparison. Cost per layer is linear in T: two
normalisations, one public matmul, one bounded exp, two secret matmuls of size D x dh, one
reciprocal per query.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from secfwt.models.ops import Ops, Tensor

#: Head-vector squared norms the range-safe inverse square root must cover.
NORM_SQ_RANGE = (2.0**-10, 2.0**16)
#: Centre of exp's argument in units of sigma (c = sigma * tau): see the module docstring.
_TAU = 2.0
#: Slack on the Cauchy-Schwarz bound for the approximation error of |q^| = 1.
_NORM_SLACK = 1.05


@dataclasses.dataclass(frozen=True)
class RFASettings:
    num_features: int = 64
    sigma: float = 1.5
    seed: int = 0


def rfa_projection(*, layer: int, head_dim: int, settings: RFASettings) -> torch.Tensor:
    """The public random matrix W (D, dh) of one layer, derived from the job seed."""
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + layer)
    return torch.randn(settings.num_features, head_dim, generator=g, dtype=torch.float64)


def _normalise(ops: Ops, x: Tensor) -> Tensor:
    sq = (x * x).sum(-1, keepdim=True)  # (N, nh, T, 1)
    return x * ops.inv_sqrt(sq, lo=NORM_SQ_RANGE[0], hi=NORM_SQ_RANGE[1])


def _features(ops: Ops, x_hat: Tensor, w: torch.Tensor, settings: RFASettings) -> Tensor:
    sigma = settings.sigma
    c = sigma * _TAU
    proj = (sigma * w.t()).to(torch.float64)  # (dh, D)
    if ops.secure:
        proj = proj.to(torch.float32)
    else:
        proj = proj.to(x_hat.dtype)
    arg = x_hat.matmul(proj) - c  # (N, nh, T, D): public matmul, local for MPC
    bound = sigma * float(w.norm(dim=1).max()) * _NORM_SLACK + c
    return ops.exp_bounded(arg, bound=bound) * (1.0 / math.sqrt(settings.num_features))


#: Range the RFA normaliser sum_j phi(q).phi(k_j) is inverted on. Its expectation is
#: n * e^{sigma^2 - 2c} * E[exp(sigma^2 q^.k^)] / 1, i.e. about 0.02 n for sigma = 1.5 and
#: n <= 512 keys; the range leaves several octaves of margin on both sides.
RFA_DENOMINATOR_RANGE = (2.0**-12, 2.0**16)


def rfa_attention(
    ops: Ops,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor,
    *,
    w: torch.Tensor,
    settings: RFASettings,
) -> Tensor:
    """Random Feature Attention; q, k, v (N, nh, T, dh), key_mask (N, T) -> (N, nh, T, dh)."""
    n, t = key_mask.shape
    phi_q = _features(ops, _normalise(ops, q), w, settings)  # (N, nh, T, D)
    phi_k = _features(ops, _normalise(ops, k), w, settings) * key_mask.reshape(
        n, 1, t, 1
    )  # padded keys -> 0
    s = phi_k.transpose(-1, -2).matmul(v)  # (N, nh, D, dh)
    z = phi_k.sum(-2, keepdim=True)  # (N, nh, 1, D)
    num = phi_q.matmul(s)  # (N, nh, T, dh)
    den = (phi_q * z).sum(-1, keepdim=True)  # (N, nh, T, 1)
    lo, hi = RFA_DENOMINATOR_RANGE
    return num * ops.reciprocal(den, lo=lo, hi=hi)


def softmax_attention(ops: Ops, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017); key_mask (N, T), 1 = real token."""
    dh = q.shape[-1]
    n, t = key_mask.shape
    scores = (q * (1.0 / math.sqrt(dh))).matmul(k.transpose(-1, -2))  # (N, nh, T, T)
    probs = ops.softmax(scores, mask=key_mask.reshape(n, 1, 1, t))
    return probs.matmul(v)
