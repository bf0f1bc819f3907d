"""The numeric backends the transformer code runs on: plaintext torch and CrypTen MPC.

The model code in :mod:`secfwt.models.encoder` and :mod:`secfwt.models.decoder` is written once
against :class:`Ops`; the plaintext backend is the reference the secure backend is tested against
("one protocol code, several runtimes"). The plaintext backend computes in float64 so that
differences in tests measure the MPC error, not float32 rounding.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = Any  # torch.Tensor or crypten MPCTensor


class Ops(abc.ABC):
    """Operations whose implementation differs between plaintext and MPC."""

    secure: bool = False

    def weight_matmul(self, x: Tensor, w: Tensor, *, headroom_bits: int = 0) -> Tensor:
        """``x @ w`` for a parameter ``w`` (a linear layer's transposed weight).

        ``headroom_bits`` (secure backend, weights the model owner holds): x keeps that many
        fewer fractional bits and the product's truncation is that many bits shorter, so each
        output's chance of a failed 2-party truncation (|value| / 2^64, SecureML) is 2^h times
        smaller; worth it where a product has very many outputs (an LM head's V per token)."""
        return x.matmul(w)

    @abc.abstractmethod
    def softmax(self, x: Tensor, *, mask: Tensor | None) -> Tensor:
        """Softmax over the last dim; ``mask`` (1 = keep, broadcastable) zeroes padded keys."""

    @abc.abstractmethod
    def gelu(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def gelu_tanh(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def silu(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def tanh(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def layer_norm(self, x: Tensor, *, weight: Tensor, bias: Tensor, eps: float) -> Tensor: ...

    @abc.abstractmethod
    def rms_norm(
        self, x: Tensor, *, weight: Tensor, eps: float, mean_square_range: tuple[float, float]
    ) -> Tensor:
        """RMSNorm over the last dim; the secure backend is accurate for row mean squares in
        ``mean_square_range``."""

    def keep_keys(self, allowed: torch.Tensor, key_mask: Tensor) -> Tensor:
        """0/1 attention mask ``allowed * key_mask``: a public pattern (.., T, T) times a key mask
        (N, 1, 1, T), public or secret; exact (the secure backend multiplies ring shares by the
        public integers, where CrypTen's product by a public float would truncate)."""
        return key_mask * allowed.to(key_mask.dtype)

    @abc.abstractmethod
    def inv_sqrt(self, x: Tensor, *, lo: float, hi: float) -> Tensor: ...

    @abc.abstractmethod
    def reciprocal(self, x: Tensor, *, lo: float, hi: float) -> Tensor: ...

    @abc.abstractmethod
    def exp_bounded(self, x: Tensor, *, bound: float) -> Tensor:
        """exp(x) for inputs known (by construction, not by checking) to satisfy |x| <= bound."""

    @abc.abstractmethod
    def cat(self, xs: Sequence[Tensor], *, dim: int) -> Tensor: ...

    @abc.abstractmethod
    def stack(self, xs: Sequence[Tensor], *, dim: int) -> Tensor: ...

    @abc.abstractmethod
    def log_softmax_nll(self, logits: Tensor, onehot: Tensor) -> Tensor:
        """Per-example cross-entropy ``-sum(onehot * log_softmax(logits))``, shape (B,)."""

    @abc.abstractmethod
    def token_nll(self, logits: Tensor, onehot: Tensor, weights: Tensor) -> Tensor:
        """Per-sequence mean token cross-entropy over the weighted (response) tokens, (N,):
        ``sum_t w[n,t] (logsumexp(logits[n,t]) - <onehot[n,t], logits[n,t]>) / sum_t w[n,t]``
        for logits and onehot (N, T, V), weights (N, T) (secret or public; see
        :func:`secfwt.mpc.nonlinear.token_nll` for what public weights disclose). For a causal
        LM, ``onehot[n, t]`` is the token after position t (labels shifted by one)."""

    @abc.abstractmethod
    def target_token_nll(self, logits: Tensor, target_logits: Tensor, weights: Tensor) -> Tensor:
        """:meth:`token_nll` given the target tokens' logits (N, T) instead of one-hot rows:
        ``sum_t w[n,t] (logsumexp(logits[n,t]) - target_logits[n,t]) / sum_t w[n,t]``."""

    def act(self, name: str, x: Tensor) -> Tensor:
        if name == "gelu":
            return self.gelu(x)
        if name in ("gelu_new", "gelu_pytorch_tanh"):
            return self.gelu_tanh(x)
        if name == "relu":
            return x.relu() if self.secure else torch.relu(x)
        if name == "silu":
            return self.silu(x)
        raise ValueError(f"unsupported activation {name!r}")


class PlainOps(Ops):
    """Plaintext float64 reference."""

    secure = False

    def softmax(self, x, *, mask):
        if mask is not None:
            x = x.masked_fill(mask.to(torch.bool).logical_not(), float("-inf"))
        return torch.softmax(x, dim=-1)

    def silu(self, x):
        return F.silu(x)

    def gelu(self, x):
        return F.gelu(x)

    def gelu_tanh(self, x):
        return F.gelu(x, approximate="tanh")

    def tanh(self, x):
        return torch.tanh(x)

    def layer_norm(self, x, *, weight, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)

    def rms_norm(self, x, *, weight, eps, mean_square_range):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)

    def inv_sqrt(self, x, *, lo, hi):
        return torch.rsqrt(x)

    def reciprocal(self, x, *, lo, hi):
        return 1.0 / x

    def exp_bounded(self, x, *, bound):
        return torch.exp(x)

    def cat(self, xs, *, dim):
        return torch.cat(list(xs), dim=dim)

    def stack(self, xs, *, dim):
        return torch.stack(list(xs), dim=dim)

    def log_softmax_nll(self, logits, onehot):
        return -(torch.log_softmax(logits, dim=-1) * onehot).sum(-1)

    def token_nll(self, logits, onehot, weights):
        w = torch.as_tensor(weights, dtype=torch.float64)
        sums = w.sum(-1)  # (N,)
        if not bool((sums > 0).all()):
            raise ValueError("weights: every row must count at least one token (0/0 otherwise)")
        nll = torch.logsumexp(logits, dim=-1) - (onehot * logits).sum(-1)  # (N, T)
        return (w * nll).sum(-1) / sums

    def target_token_nll(self, logits, target_logits, weights):
        w = torch.as_tensor(weights, dtype=torch.float64)
        sums = w.sum(-1)  # (N,)
        if not bool((sums > 0).all()):
            raise ValueError("weights: every row must count at least one token (0/0 otherwise)")
        return (w * (torch.logsumexp(logits, dim=-1) - target_logits)).sum(-1) / sums


class SecureOps(Ops):
    """CrypTen MPC, with secfwt's range-safe approximations (:mod:`secfwt.mpc.nonlinear`)."""

    secure = True

    def __init__(self) -> None:
        from secfwt.mpc import nonlinear

        self._nl = nonlinear

    def weight_matmul(self, x, w, *, headroom_bits=0):
        """Weights the model owner holds in the clear (:class:`secfwt.mpc.owned.OwnedMatrix`)
        take the one-sided product; secret-shared ones Beaver's."""
        from secfwt.mpc import owned

        if not isinstance(w, owned.OwnedMatrix):
            return x.matmul(w)
        if headroom_bits:
            return owned.matmul(x, w, headroom_bits=headroom_bits)
        return owned.matmul(x, w)

    def softmax(self, x, *, mask):
        return self._nl.softmax(x, dim=-1, mask=mask)

    def gelu(self, x):
        return self._nl.gelu(x)

    def gelu_tanh(self, x):
        return self._nl.gelu_tanh(x)

    def silu(self, x):
        return self._nl.silu(x)

    def tanh(self, x):
        return self._nl.tanh(x)

    def layer_norm(self, x, *, weight, bias, eps):
        return self._nl.layer_norm(x, weight=weight, bias=bias, eps=eps)

    def rms_norm(self, x, *, weight, eps, mean_square_range):
        return self._nl.rms_norm(x, weight=weight, eps=eps, mean_square_range=mean_square_range)

    def keep_keys(self, allowed, key_mask):
        if torch.is_tensor(key_mask):
            return super().keep_keys(allowed, key_mask)
        share = key_mask.share * allowed.to(torch.long)  # ring integers: no truncation
        return type(key_mask).from_shares(share, precision=self._nl.FRAC_BITS)

    def inv_sqrt(self, x, *, lo, hi):
        return self._nl.inv_sqrt(x, lo=lo, hi=hi)

    def reciprocal(self, x, *, lo, hi):
        return self._nl.reciprocal(x, lo=lo, hi=hi)

    def exp_bounded(self, x, *, bound):
        return self._nl.exp_bounded(x, bound=bound)

    def cat(self, xs, *, dim):
        from secfwt.crypten_compat import crypten

        return crypten.cat(list(xs), dim=dim)

    def stack(self, xs, *, dim):
        from secfwt.crypten_compat import crypten

        return crypten.stack(list(xs), dim=dim)

    def log_softmax_nll(self, logits, onehot):
        return self._nl.cross_entropy(logits, onehot)

    def token_nll(self, logits, onehot, weights):
        return self._nl.token_nll(logits, onehot, weights)

    def target_token_nll(self, logits, target_logits, weights):
        return self._nl.target_token_nll(logits, target_logits, weights)
