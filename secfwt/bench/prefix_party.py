"""The party side of the frozen prefix a tuning job computes once per training row (inside each
party process), for ``time-to-target``'s one-time costs.

As a classification job computes it (:func:`secfwt.runtime.job` with the cached prefix of
:func:`secfwt.tuning.forward.prefix`): the model owner's frozen weights held by it
(``frozen=True``), the data owner's word embeddings (it embeds its own tokens), attention mask
and mean-pooling weights shared, the rows in chunks of the job's ``eval_batch`` and each row
range-checked (:class:`~secfwt.runtime.range_checks.RangeChecks`). Two measured sections: the
layers below the top one (what backprop training only the top layer caches), then the top
layer and the mean pooling (the rest of what head-only ZO caches). Both outputs are revealed to
the data owner (``verify_outputs``) for the check against float64 plaintext.
"""

from __future__ import annotations

from typing import Any

import torch

from secfwt.bench.probe import measure_reps
from secfwt.mpc.disclosure import Revealable
from secfwt.mpc.launcher import PartyContext
from secfwt.mpc.traffic import TrafficMeter
from secfwt.roles import Role


def frozen_prefix(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """``payload["rows"]`` rows of T=``seq_len``: layers 0 .. L-2, then layer L-1 and pooling."""
    from secfwt.models.encoder import EncoderModel, ForwardSettings
    from secfwt.models.spec import Pooling
    from secfwt.mpc import owned
    from secfwt.runtime.range_checks import RangeChecks
    from secfwt.tuning.forward import mean_pool_weights

    spec = sess.agree_spec(payload.get("spec"))
    names = [
        n
        for n, _ in spec.param_shapes
        if n != spec.word_embeddings and not n.startswith((spec.prefix + "pooler.", "classifier"))
    ]
    frozen = sess.share_params(spec, payload.get("state"), names=names, frozen=True)
    n, t, h = payload["rows"], payload["seq_len"], spec.hidden_size
    mine = sess.role is Role.DATA_OWNER
    do = Role.DATA_OWNER
    word = sess.share(payload.get("input"), owner=do, shape=(n, t, h), name="word embeddings")
    ones = torch.ones(n, t)
    mask = sess.share(ones if mine else None, owner=do, shape=(n, t), name="attention mask")
    pool_w = sess.share(
        mean_pool_weights(ones).float() if mine else None,
        owner=do,
        shape=(n, t),
        name="pooling weights",
    )
    model = EncoderModel(
        spec,
        frozen,
        sess.ops,
        ForwardSettings(attention=payload["attention"], pooling=Pooling.MEAN),
    )
    checks, top = RangeChecks(sess), spec.num_layers - 1
    chunk = payload["chunk"]

    def rows(compute: Any) -> Any:
        out = checks.prefix(compute, n=n, batch=chunk, progress=lambda **_: None)
        owned.drain()  # the work ahead this section started is paid by it
        return out

    def below() -> Any:  # (n, t, h)
        return rows(
            lambda r: model.layers(
                model.embed(word[torch.tensor(r)]), mask[torch.tensor(r)], stop=top
            )
        )

    hidden, costs = measure_reps(comm, meter, below, reps=1)

    def upper() -> Any:  # (n, h)
        def compute(r: list[int]) -> Any:
            ix = torch.tensor(r)
            return model.pool(model.layers(hidden[ix], mask[ix], start=top), pool_w[ix])

        return rows(compute)

    pooled, top_costs = measure_reps(comm, meter, upper, reps=1)
    reveal = sess.discloser.reveal
    terms = {"value": Revealable.VERIFY_OUTPUTS, "to": [do]}
    return {
        "costs": costs,
        "top_costs": top_costs,
        "recomputed": checks.recomputed,
        "hidden": reveal(hidden, note="prefix below the top layer", **terms),
        "output": reveal(pooled, note="pooled prefix", **terms),
    }


__all__ = ["frozen_prefix"]
