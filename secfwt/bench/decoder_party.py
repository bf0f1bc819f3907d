"""The party side of ``secfwt bench decoder`` (inside each party process).

Two cases, registered in :mod:`secfwt.bench.party`: the secure forward of a causal decoder to
its vocabulary logits, as a job's frozen prefix runs it (linear weights and the tied LM head
with the model owner in the clear, norms shared, the key mask secret, the data owner's word
embeddings shared), and one ZO step of a causal-LM job from its cached prefix
(:class:`~secfwt.tuning.causal_lm.CausalLMForward`: final norm, LM head, response loss).
"""

from __future__ import annotations

from typing import Any

from secfwt.bench.probe import every_rep, measure_reps, reveal_each
from secfwt.mpc.launcher import PartyContext
from secfwt.mpc.traffic import TrafficMeter
from secfwt.roles import Role

#: The job computes its cache in MPC; here the data owner shares it, divided by this power of two
#: and multiplied back on the shares (exact): a layer's input holds SmolLM2's massive activations
#: (2.5e4), above what a shared input may hold (4096).
CACHE_SCALE = 16


def _shared(
    sess: Any, payload: dict[str, Any], key: str, shape: tuple[int, ...], *, scale: int = 1
) -> Any:
    value = payload.get(key)
    value = None if value is None else value / scale
    x = sess.share(value, owner=Role.DATA_OWNER, shape=shape, name=key)
    return x if scale == 1 else x * scale


def secure_decoder(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """Embeddings (N, T, H) -> all layers -> final norm -> logits (N, T, V)."""
    from secfwt.models.decoder import DecoderModel
    from secfwt.models.transformer import ForwardSettings
    from secfwt.mpc import owned
    from secfwt.runtime.causal import lm_head_params

    spec = sess.agree_spec(payload.get("spec"))
    state = payload.get("state")
    names = [n for n, _ in spec.param_shapes if n != spec.word_embeddings]
    params = sess.share_params(spec, state, names=names, frozen=True)
    params.update(lm_head_params(sess, spec, state))
    n, t = payload["input_shape"][:2]
    x = _shared(sess, payload, "input", (n, t, spec.hidden_size))
    mask = _shared(sess, payload, "mask", (n, t))  # secret, as a job's key mask
    model = DecoderModel(spec, params, sess.ops, ForwardSettings())

    def fn() -> Any:
        y = model.forward(x, mask)
        owned.drain()  # the work ahead this forward started is paid by it
        return y

    run, outs = every_rep(fn)
    _, costs = measure_reps(comm, meter, run, reps=payload["reps"])
    return {"costs": costs, **reveal_each(sess, outs, "decoder logits")}


def causal_zo_step(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """One SPSA step of a causal-LM job on a batch of its cached rows: the layers from the
    job's cut (``payload["cut"]``; none when only the final norm trains), the final norm, the LM
    head and the response loss, for 2 x directions parameter sets. The model owner's payload
    holds the weights and the trainable values' starting point (``init``)."""
    from secfwt.models.transformer import ForwardSettings
    from secfwt.mpc import owned
    from secfwt.runtime.causal import lm_head_params
    from secfwt.tuning.causal_lm import CausalLMForward, ResponseTargets
    from secfwt.tuning.spsa import SPSASettings, directions, spsa_step

    spec = sess.agree_spec(payload.get("spec"))
    state, init = payload.get("state"), payload.get("init")
    trainable, cut = payload["trainable"], payload["cut"]  # name -> shape; first trainable layer
    frozen = sess.share_params(spec, state, names=payload["frozen_names"], frozen=True)
    frozen.update(lm_head_params(sess, spec, state))
    theta = {
        n: sess.share(None if init is None else init[n], owner=Role.MODEL_OWNER, shape=s, name=n)
        for n, s in trainable.items()
    }
    b, r = payload["batch"], payload["window"]
    cache_shape = tuple(payload["cache_shape"])
    runner = CausalLMForward(
        ops=sess.ops,
        spec=spec,
        frozen=frozen,
        settings=ForwardSettings(),
        cache=_shared(sess, payload, "cache", cache_shape, scale=CACHE_SCALE),
        mask=_shared(sess, payload, "mask", (b, cache_shape[1])) if cut < spec.num_layers else None,
        targets=ResponseTargets(
            rows=_shared(sess, payload, "rows", (b, r, spec.hidden_size)),
            weights=_shared(sess, payload, "weights", (b, r)),
        ),
        cut=cut,
        window=r,
    )
    spsa = SPSASettings(lr=payload["lr"], eps=payload["eps"], directions=payload["directions"])
    shapes = tuple(trainable.items())
    idx = list(range(b))

    def step() -> Any:
        us = directions(seed=payload["seed"], step=0, shapes=shapes, count=spsa.directions)
        _new, _gs, mean_loss = spsa_step(
            lambda ps: runner.losses(ps, idx), theta, us=us, settings=spsa
        )
        owned.drain()
        return mean_loss

    run, losses = every_rep(step)  # the same step each time (theta is not updated in place)
    _, costs = measure_reps(comm, meter, run, reps=payload["reps"])
    return {"costs": costs, **reveal_each(sess, losses, "mean loss of the step")}
