"""A BERT layer written with CrypTen 0.4.1's own operations: the "vanilla CrypTen" baseline.

The same code runs the vanilla forward (``secfwt bench vanilla``) and, with parameters that
have ``requires_grad``, the MPC backpropagation baseline (CrypTen autograd + ``crypten.optim.SGD``,
``secfwt bench fot-vs-backprop``): secfwt's range-safe nonlinearities work on raw shares and have
no backward pass, so a backpropagation baseline in CrypTen has to use CrypTen's functions.

CrypTen functions used (its default approximations, which fail on wide ranges: ``exp`` below
-256, ``reciprocal`` above ~300, ``softmax`` from T ~ 256, which :func:`softmax` keeps in
range): ``matmul`` (Beaver triples),
``softmax`` (max by a comparison tree, ``exp`` by limit approximation, ``reciprocal`` by Newton),
LayerNorm as ``mean``/``var``/``inv_sqrt`` (``sqrt().reciprocal()`` when gradients are needed:
``inv_sqrt`` has no registered gradient), GELU in its tanh form (CrypTen's ``erf`` diverges
outside a narrow range) with CrypTen's ``tanh``, ``cross_entropy`` for the loss. Shapes follow
Hugging Face ``BertLayer`` (post-LayerNorm); parameter names are its state-dict names.

"Vanilla" also means CrypTen's own engine: :func:`vanilla_engine_env` starts every process of a
vanilla run (the dealer included, hence the environment variable) with ``SECFWT_RING_MATMUL=0``,
which keeps out secfwt's speed-ups (those :func:`secfwt.mpc.engine.install` switches: ring
matmul, unwrapped attribute access, Beaver protocols, two-party collectives, keystream draws).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from secfwt.mpc.ring_tuning import RING_MATMUL_ENV

#: Adds a timed section around a block of code: ``section(name)`` is a context manager.
Section = Callable[[str], Any]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: Read by :mod:`secfwt.mpc.engine` in every process (its ``SECFWT_RING_MATMUL`` switch).
_RING_MATMUL_ENV = RING_MATMUL_ENV


def _no_section(name: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _linear(x: Any, p: Mapping[str, Any], module: str) -> Any:
    return x.matmul(p[module + ".weight"].t()) + p[module + ".bias"]


def layer_norm(x: Any, weight: Any, bias: Any, *, eps: float, differentiable: bool) -> Any:
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdim=True) + eps
    inv = var.sqrt().reciprocal() if differentiable else var.inv_sqrt()
    return xc * inv * weight + bias


def gelu_tanh(x: Any) -> Any:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with CrypTen's tanh."""
    inner = (x + x * x * x * 0.044715) * _SQRT_2_OVER_PI
    return x * (inner.tanh() + 1.0) * 0.5


#: The largest softmax denominator handed to CrypTen's Newton reciprocal (rows up to this long
#: get CrypTen's own softmax).
DENOMINATOR_RANGE = 16


def softmax(scores: Any) -> Any:
    """Softmax over the last dim (N, nh, Tq, T): CrypTen's, with its denominator's reciprocal
    taken in range for rows longer than :data:`DENOMINATOR_RANGE`.

    Why: CrypTen's ``reciprocal`` runs Newton's method, ``y <- 2 y - d y^2``, from
    ``3 exp(1 - 2 d) + 0.003``. With 16 fractional bits ``y^2`` is rounded to a unit of 2^-16,
    so ``d y^2`` is off by up to ``d 2^-17`` against ``y = 1/d``: a relative error of about
    ``d^2 2^-17`` (3% at d = 60). From a few hundred up, the rounded start turns the iteration
    negative and it diverges (its ``exp`` of ``1 - 2 d`` also wraps below -256). A softmax
    row's denominator is up to T. Measured on single rows with CrypTen's own softmax: row sums
    0.95-1.06 at T=128 for scores of std 0.1; about 4e9 at T=256 and 512 for uniform rows,
    also with ``exp_iterations`` raised to 12 or with its ``log`` reciprocal; and MiniLM-shaped
    full fine-tuning at T=512 had losses 3.6e8 and 1.4e9 off float64. The fix a CrypTen user
    would write: ``reciprocal(d / c) / c`` with ``c = T / 16``, so that Newton's method sees
    ``d / c`` in ``[16 / T, 16]`` (at most 0.2% off; its start is inside the basin down to
    ``d / c`` of 1e-3); two public divisions of the (N, nh, Tq, 1) denominators, no messages.
    The backward is CrypTen's softmax backward from the saved probabilities.
    """
    if isinstance(scores, torch.Tensor):  # the float64 reference of the tests
        return scores.softmax(-1)
    from secfwt.crypten_compat import crypten

    name = "secfwt_bench_softmax"
    if crypten.gradients.get_grad_fn(name) is None:  # once per process
        crypten.gradients.register_function(name)(_in_range_softmax_class())
    # a registered name is how CrypTen applies an autograd function, with or without grad
    return getattr(scores, name)(-1)


def _softmax_forward(x: Any, dim: int) -> Any:
    """The probabilities of :func:`softmax` on a CrypTen tensor with autograd off."""
    from secfwt.crypten_compat import crypten

    t = x.size(dim)
    if t <= DENOMINATOR_RANGE:
        return x.softmax(dim)
    numerator = (x - x.max(dim, keepdim=True)[0]).exp()
    scale = t / DENOMINATOR_RANGE
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        inverse = numerator.sum(dim, keepdim=True).div(scale).reciprocal().div(scale)
    return numerator * inverse


def _in_range_softmax_class() -> Any:
    from secfwt.crypten_compat import crypten

    class InRangeSoftmax(crypten.gradients.AutogradSoftmax):  # CrypTen's backward
        @staticmethod
        def forward(ctx: Any, input: Any, dim: int) -> Any:
            probs = _softmax_forward(input, dim)
            ctx.save_multiple_for_backward([probs, dim])
            return probs

    return InRangeSoftmax


def block(
    x: Any,
    p: Mapping[str, Any],
    *,
    prefix: str,
    num_heads: int,
    eps: float,
    differentiable: bool = False,
    section: Section = _no_section,
    query_rows: int | None = None,
) -> Any:
    """One BERT encoder layer on CrypTen tensors; x (N, T, H) -> (N, T, H). No padding mask.
    With ``query_rows`` only the first that many positions are computed, (N, query_rows, H),
    as :meth:`secfwt.models.encoder.EncoderModel.attention` does for a head that reads one."""
    n, _, h = x.shape
    dh = h // num_heads
    rows = x if query_rows is None else x.narrow(1, 0, query_rows)  # (N, Tq, H): see _first

    def heads(y: Any) -> Any:  # (N, T', H) -> (N, nh, T', dh)
        return y.reshape(n, y.shape[1], num_heads, dh).transpose(1, 2)

    att = prefix + "attention."
    with section("linear (weights)"):
        q = heads(_linear(rows, p, att + "self.query"))
        k = heads(_linear(x, p, att + "self.key"))
        v = heads(_linear(x, p, att + "self.value"))
    with section("attention matmuls & other"):
        scores = q.matmul(k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # (N, nh, Tq, T)
    with section("softmax"):
        probs = softmax(scores)
    with section("attention matmuls & other"):
        ctx = probs.matmul(v).transpose(1, 2).reshape(n, rows.shape[1], h)
    with section("linear (weights)"):
        a = _linear(ctx, p, att + "output.dense") + rows
    with section("LayerNorm"):
        a = layer_norm(
            a,
            p[att + "output.LayerNorm.weight"],
            p[att + "output.LayerNorm.bias"],
            eps=eps,
            differentiable=differentiable,
        )
    with section("linear (weights)"):
        inter = _linear(a, p, prefix + "intermediate.dense")
    with section("GELU"):
        inter = gelu_tanh(inter)
    with section("linear (weights)"):
        out = _linear(inter, p, prefix + "output.dense") + a
    with section("LayerNorm"):
        return layer_norm(
            out,
            p[prefix + "output.LayerNorm.weight"],
            p[prefix + "output.LayerNorm.bias"],
            eps=eps,
            differentiable=differentiable,
        )


def classifier_logits(
    x: Any,
    p: Mapping[str, Any],
    spec: Any,
    *,
    start: int = 0,
    mean: bool = False,
    every_position: bool = False,
) -> Any:
    """Logits (N, C) of a BERT classifier (``spec``: a :class:`~secfwt.models.spec.ModelSpec`)
    from layer ``start``'s input x (N, T, H), every layer differentiable. With the [CLS] head
    the last layer computes token 0 only, as secfwt's forward does, unless ``every_position``
    (the same logits: a reference); with ``mean`` every position and :func:`classify`'s mean."""
    last = spec.num_layers - 1
    h = x
    for layer in range(start, spec.num_layers):
        h = block(
            h,
            p,
            prefix=f"{spec.prefix}encoder.layer.{layer}.",
            num_heads=spec.num_heads,
            eps=spec.layer_norm_eps,
            differentiable=True,
            query_rows=None if mean or every_position or layer < last else 1,
        )
    return classify(h, p, prefix=spec.prefix, mean=mean)


def classify(h: Any, p: Mapping[str, Any], *, prefix: str, mean: bool = False) -> Any:
    """BERT's sequence-classification head: tanh pooler on the first token, then a linear layer;
    with ``mean`` the linear layer on the mean over tokens, as secfwt's mean pooling (no mask:
    every token real). h (N, T, H) -> (N, C)."""
    if mean:
        return _linear(h.mean(1), p, "classifier")
    pooled = _linear(_first(h), p, prefix + "pooler.dense").tanh()
    return _linear(pooled, p, "classifier")


def _first(h: Any) -> Any:
    """h[:, 0] (N, T, H) -> (N, H) that CrypTen's autograd sees: it records an operation when
    the operation is looked up as an attribute (``CrypTensor.__getattribute__``), and Python
    looks up ``h[:, 0]``'s ``__getitem__`` on the type, past that hook, so indexing returns a
    tensor with no graph and backward stops there. ``narrow`` is looked up as an attribute."""
    return h.narrow(1, 0, 1).reshape(h.shape[0], h.shape[-1])


@contextlib.contextmanager
def vanilla_engine_env() -> Iterator[None]:
    """Start party processes (and the dealer) with secfwt's engine adaptations off (module doc)."""
    old = os.environ.get(_RING_MATMUL_ENV)
    os.environ[_RING_MATMUL_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_RING_MATMUL_ENV, None)
        else:
            os.environ[_RING_MATMUL_ENV] = old
