"""Self-attention cores: softmax attention and Random Feature Attention (RFA), bidirectional
and causal.

All take per-head queries, keys and values of shape (N, nh, T, dh) and a key mask of shape
(N, T) (1 = real token, 0 = padding) and run unchanged on :class:`PlainOps` and
:class:`SecureOps`. Causal RFA (:func:`causal_rfa_attention`, for decoders) uses the same
features with prefix sums over the key axis.

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


def _query_key_features(
    ops: Ops, q: Tensor, k: Tensor, key_mask: Tensor, *, w: torch.Tensor, settings: RFASettings
) -> tuple[Tensor, Tensor]:
    """phi(q^) (N, nh, T, D) and m_j phi(k^_j) (N, nh, T, D): padded keys' features are 0."""
    n, t = key_mask.shape
    phi_q = _features(ops, _normalise(ops, q), w, settings)
    phi_k = _features(ops, _normalise(ops, k), w, settings) * key_mask.reshape(n, 1, t, 1)
    return phi_q, phi_k


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
    phi_q, phi_k = _query_key_features(ops, q, k, key_mask, w=w, settings=settings)
    s = phi_k.transpose(-1, -2).matmul(v)  # (N, nh, D, dh)
    z = phi_k.sum(-2, keepdim=True)  # (N, nh, 1, D)
    num = phi_q.matmul(s)  # (N, nh, T, dh)
    den = (phi_q * z).sum(-1, keepdim=True)  # (N, nh, T, 1)
    lo, hi = RFA_DENOMINATOR_RANGE
    return num * ops.reciprocal(den, lo=lo, hi=hi)


def causal_rfa_attention(
    ops: Ops,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor,
    *,
    w: torch.Tensor,
    settings: RFASettings,
    chunk: int | None = None,
) -> Tensor:
    """Causal Random Feature Attention: position t attends to the real keys j <= t only.

    q, k, v (N, nh, T, dh), key_mask (N, T) public or secret, 1 = real -> (N, nh, T, dh)::

        out_t = sum_{j<=t} m_j (phi(q_t).phi(k_j)) v_j / sum_{j<=t} m_j (phi(q_t).phi(k_j))

    with :func:`rfa_attention`'s features. Causal linear attention is a prefix sum over the key
    axis (Katharopoulos et al., ICML 2020, sec. 3.4; RFA, Peng et al., ICLR 2021, sec. 3.1),
    kept here per chunk of ``chunk`` positions (the chunkwise form of FLASH, Hua et al., ICML
    2022, sec. 3.3): each chunk's state ``sum_j phi(k_j) [v_j, 1]^T`` (D, dh + 1) is one matmul,
    the exclusive prefix sum of the states over chunks is a cumsum (local in MPC: no
    communication), and within a chunk ``(phi(q) phi(k)^T * lower-triangular) [v, 1]``. The
    appended ones column yields the normaliser from the same products.

    ``chunk = 1`` is the pure recurrence (every position's state opened: T D (dh + 1) values per
    sequence and head in MPC), ``chunk >= T`` the quadratic masked form (T^2 values); the default
    is the cheaper of that and chunks of :func:`default_causal_chunk`.

    A padded query's own key is masked, so its normaliser gets ``+1`` (local) and stays
    invertible even before the first real token (left padding); outputs at padded positions
    are unspecified, those at real positions exact.
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of positions, got {chunk}")
    n, nh, t, dh = v.shape
    phi_q, phi_k = _query_key_features(ops, q, k, key_mask, w=w, settings=settings)
    d = phi_q.shape[-1]
    c = min(chunk or default_causal_chunk(num_features=d, head_dim=dh, length=t), t)
    v1 = ops.cat([v, v[..., :1] * 0.0 + 1.0], dim=-1)  # (N, nh, T, dh + 1): [v, 1]
    b = -(-t // c)
    if b * c > t:  # pad to whole chunks with zero features (no key, no query)
        phi_q, phi_k, v1 = (
            ops.cat([x, x[..., : b * c - t, :] * 0.0], dim=2) for x in (phi_q, phi_k, v1)
        )
    fq = phi_q.reshape(n, nh, b, c, d)
    fk = phi_k.reshape(n, nh, b, c, d)
    vb = v1.reshape(n, nh, b, c, dh + 1)
    causal = torch.tril(torch.ones(c, c, dtype=torch.float64))  # (c, c), public
    if ops.secure:
        causal = causal.to(torch.float32)
    out = (fq.matmul(fk.transpose(-1, -2)) * causal).matmul(vb)  # (N, nh, B, c, dh + 1)
    if b > 1:
        states = fk.transpose(-1, -2).matmul(vb)  # (N, nh, B, D, dh + 1)
        earlier = ops.cat([states[:, :, :1] * 0.0, states[:, :, :-1]], dim=2).cumsum(2)
        out = out + fq.matmul(earlier)  # keys of chunks 0 .. b-1
    out = out.reshape(n, nh, b * c, dh + 1)[:, :, :t]
    num, den = out[..., :dh], out[..., dh:]  # (N, nh, T, dh), (N, nh, T, 1)
    den = den + (key_mask * -1.0 + 1.0).reshape(n, 1, t, 1)
    lo, hi = RFA_DENOMINATOR_RANGE
    return num * ops.reciprocal(den, lo=lo, hi=hi)


def default_causal_chunk(*, num_features: int, head_dim: int, length: int) -> int:
    """The chunk length that opens the fewest values in MPC, per sequence and head.

    With chunks of c < T positions the matmuls open (T / c) D (dh + 1) + T c values, least at
    c = sqrt(D (dh + 1)) (rounded here to a power of two), plus phi(q), phi(k) and [v, 1] a
    second time (2 T D + T (dh + 1)); one chunk (c = T) opens T^2. Measured with D = dh = 64
    (data owner's bytes, features included): T = 256: 16.4 MB one chunk, 16.7 MB chunks of 64,
    33.2 MB chunks of 1; T = 1024: 78.2 MB one chunk, 66.7 MB chunks of 64.
    """
    d1 = num_features * (head_dim + 1)
    c = 2 ** round(math.log2(math.sqrt(d1)))
    chunked = (
        math.ceil(length / c) * d1
        + length * c
        + 2 * length * num_features
        + length * (head_dim + 1)
    )
    return length if length * length <= chunked or c >= length else c


def softmax_attention(ops: Ops, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017); key_mask (N, T), 1 = real token."""
    dh = q.shape[-1]
    n, t = key_mask.shape
    scores = (q * (1.0 / math.sqrt(dh))).matmul(k.transpose(-1, -2))  # (N, nh, T, T)
    probs = ops.softmax(scores, mask=key_mask.reshape(n, 1, 1, t))
    return probs.matmul(v)
