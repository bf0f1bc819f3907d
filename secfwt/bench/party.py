"""What each computing party runs in a benchmark case (inside its own party process).

One entry point, :func:`bench_party`, dispatches on ``payload["case"]``. The model owner's
payload carries the weights, the data owner's the inputs; both secret-share them exactly as a
job does (:class:`~secfwt.runtime.session.PartySession`), then time one section between
barriers (:func:`secfwt.bench.probe.measure`). Setup (process start, CrypTen init, sharing) is
never inside a measured section. Outputs are revealed to the data owner only, under the
``verify_outputs`` term, so the parent can check them against a plaintext reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from secfwt.bench import decoder_party, prefix_party, safe_delta_party
from secfwt.bench.probe import Profile, every_rep, measure_reps, peak_rss_mb, reveal, reveal_each
from secfwt.mpc.disclosure import DisclosureTerms, Revealable
from secfwt.mpc.launcher import PartyContext
from secfwt.mpc.traffic import TrafficMeter
from secfwt.roles import Role

#: The only reveals a benchmark makes: outputs of the measured section, to the data owner, and
#: (the CMA-ES iteration, as its job does) the candidates' logits on its own batch.
TERMS = DisclosureTerms.of(
    [
        (Revealable.VERIFY_OUTPUTS, [Role.DATA_OWNER]),
        (Revealable.TRAIN_OUTPUTS, [Role.DATA_OWNER]),
        # one bit per row of a range-checked forward, as the job's (``time-to-target``)
        (Revealable.RANGE_CHECK, [Role.DATA_OWNER, Role.MODEL_OWNER]),
    ]
)

#: Op classes of the cost breakdown, by :class:`~secfwt.models.ops.Ops` method name.
OP_CLASSES = {
    "softmax": "softmax",
    "act": "GELU",
    "gelu": "GELU",
    "gelu_tanh": "GELU",
    "layer_norm": "LayerNorm",
    "inv_sqrt": "RFA nonlinear",
    "reciprocal": "RFA nonlinear",
    "exp_bounded": "RFA nonlinear",
}
LINEAR = "linear (weights)"
REMAINDER = "attention matmuls & other"


class ProfiledOps:
    """Forwards to a real :class:`~secfwt.models.ops.Ops`, timing the methods of OP_CLASSES."""

    def __init__(self, inner: Any, profile: Profile) -> None:
        self._inner = inner
        self._profile = profile

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        cls = OP_CLASSES.get(name)
        return self._profile.wrap(cls, attr) if cls is not None and callable(attr) else attr


def _profiled_encoder(spec: Any, params: Any, ops: Any, settings: Any, profile: Profile) -> Any:
    from secfwt.models.encoder import EncoderModel
    from secfwt.models.ops import Ops

    class ProfiledEncoder(EncoderModel):
        def linear(self, x: Any, module: str) -> Any:
            with profile.section(LINEAR):
                return super().linear(x, module)

    return ProfiledEncoder(spec, params, cast(Ops, ProfiledOps(ops, profile)), settings)


def bench_party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any]:
    from secfwt.crypten_compat import crypten
    from secfwt.runtime.session import PartySession

    comm = crypten.communicator.get()
    meter = TrafficMeter(comm)
    sess = PartySession(role=ctx.role, terms=TERMS, audit_path=None)
    _warm_up(sess)
    case: Callable[..., dict[str, Any]] = _CASES[payload["case"]]
    out = case(ctx=ctx, sess=sess, comm=comm, meter=meter, payload=payload)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _warm_up(sess: Any) -> None:
    """One product and one comparison, so no measured section pays first-use costs."""
    x = sess.share(
        torch.ones(4) if sess.role is Role.DATA_OWNER else None,
        owner=Role.DATA_OWNER,
        shape=(4,),
        name="warm-up",
    )
    (x * x).gt(0.5)


def _share_inputs(
    sess: Any, payload: dict[str, Any], names: list[str] | None, *, frozen: bool
) -> tuple[Any, dict[str, Any], Any]:
    """The model owner's spec and weights (all, or ``names``) and the data owner's input x.

    ``frozen``: linear weights stay with the model owner (as a job's frozen weights do);
    otherwise every weight is secret-shared (vanilla CrypTen's only way).
    """
    spec = sess.agree_spec(payload.get("spec"))
    wanted = names if names is not None else [n for n, _ in spec.param_shapes]
    params = sess.share_params(
        spec,
        payload.get("state"),
        names=[n for n in wanted if n in dict(spec.param_shapes)],
        frozen=frozen,
    )
    shape = tuple(payload["input_shape"])
    x = sess.share(payload.get("input"), owner=Role.DATA_OWNER, shape=shape, name="input")
    return spec, params, x


# -- cases ------------------------------------------------------------------------------------


def _secure_forward(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """secfwt's engine: one encoder layer ("block") or embeddings + all layers ("encoder")."""
    from secfwt.models.encoder import ForwardSettings
    from secfwt.mpc import owned

    spec, params, x = _share_inputs(sess, payload, payload.get("param_names"), frozen=True)
    n, t = x.shape[0], x.shape[1]
    mask = sess.public(torch.ones(n, t))
    profile = Profile(meter)
    model = _profiled_encoder(
        spec, params, sess.ops, ForwardSettings(attention=payload["attention"]), profile
    )
    if payload["what"] == "block":
        forward = lambda: model.block(x, mask, 0)  # noqa: E731
    else:
        forward = lambda: model.layers(model.embed(x), mask)  # noqa: E731

    def fn() -> Any:
        y = forward()
        owned.drain()  # the work ahead this forward started (for the next) is paid by it
        return y

    run, outs = every_rep(fn)
    _, costs = measure_reps(
        comm, meter, run, reps=payload["reps"], profile=profile, remainder=REMAINDER
    )
    return {"costs": costs, **reveal_each(sess, outs, payload["what"])}


def _vanilla_forward(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """CrypTen's own ops (:mod:`secfwt.bench.vanilla`): one encoder layer."""
    from secfwt.bench import vanilla

    spec, params, x = _share_inputs(sess, payload, payload.get("param_names"), frozen=False)
    profile = Profile(meter)
    prefix = spec.prefix + "encoder.layer.0."

    def fn() -> Any:
        return vanilla.block(
            x,
            params,
            prefix=prefix,
            num_heads=spec.num_heads,
            eps=spec.layer_norm_eps,
            section=profile.section,
        )

    run, outs = every_rep(fn)
    _, costs = measure_reps(
        comm, meter, run, reps=payload["reps"], profile=profile, remainder=REMAINDER
    )
    return {"costs": costs, **reveal_each(sess, outs, "vanilla block")}


def _attention(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """The attention core alone (softmax or RFA) for each sequence length, q/k/v private."""
    from secfwt.models.attention import (
        RFASettings,
        rfa_attention,
        rfa_projection,
        softmax_attention,
    )
    from secfwt.models.spec import Attention

    heads, dh, batch = payload["heads"], payload["head_dim"], payload["batch"]
    settings = RFASettings()
    w = rfa_projection(layer=0, head_dim=dh, settings=settings)
    rows = []
    for t in payload["seq_lens"]:
        shape = (batch, heads, t, dh)
        qkv = payload.get("qkv", {}).get(t)
        q, k, v = (
            sess.share(
                None if qkv is None else qkv[i],
                owner=Role.DATA_OWNER,
                shape=shape,
                name=f"qkv[{i}]",
            )
            for i in range(3)
        )
        mask = sess.public(torch.ones(batch, t))
        if payload["attention"] is Attention.RFA:
            fn = lambda q=q, k=k, v=v, mask=mask: rfa_attention(  # noqa: E731
                sess.ops, q, k, v, mask, w=w, settings=settings
            )
        else:
            fn = lambda q=q, k=k, v=v, mask=mask: softmax_attention(  # noqa: E731
                sess.ops, q, k, v, mask
            )
        run, outs = every_rep(fn)
        _, costs = measure_reps(comm, meter, run, reps=payload["reps"])
        rows.append({"seq_len": t, "costs": costs, **reveal_each(sess, outs, f"attention T={t}")})
    return {"rows": rows}


def _upper_params(spec: Any, cut: int) -> list[str]:
    """Names of the parameters a forward from the cached prefix at layer ``cut`` uses: layers
    ``cut`` and up and the head (not the embeddings, not the layers below)."""
    below = tuple(f"{spec.prefix}encoder.layer.{i}." for i in range(cut))
    return [
        n for n, _ in spec.param_shapes if not n.startswith((*below, spec.prefix + "embeddings."))
    ]


def _step_inputs(
    sess: Any, payload: dict[str, Any]
) -> tuple[Any, Any, int, dict[str, Any], Any, Any]:
    """What both tuning steps start from: spec, trainable set, first trainable layer, the
    trainable values (model owner), the cached prefix (B, T, H), or the pooled features (B, H)
    when only the head trains, and one-hot labels (data owner)."""
    from secfwt.tuning.trainable import select_trainable

    spec = sess.agree_spec(payload.get("spec"))
    trainable = select_trainable(
        spec,
        patterns=tuple(payload["trainable"]),
        lora_modules=tuple(payload.get("lora_modules", ())),
        lora_rank=payload.get("lora_rank", 0),
        soft_prompt_length=0,
        prompt_layer=0,
        max_tokens=spec.max_tokens,
    )
    state = payload.get("state")
    theta = {
        n: sess.share(None if state is None else state[n], owner=Role.MODEL_OWNER, shape=s, name=n)
        for n, s in trainable.shapes
    }
    b, t = payload["batch"], payload["seq_len"]
    cut = trainable.first_layer(spec)
    cache = sess.share(
        payload.get("input"),
        owner=Role.DATA_OWNER,
        shape=(b, spec.hidden_size) if cut == spec.num_layers else (b, t, spec.hidden_size),
        name="cached prefix",
    )
    labels = payload.get("labels")
    onehot = sess.share(
        None if labels is None else torch.nn.functional.one_hot(labels, spec.num_labels).float(),
        owner=Role.DATA_OWNER,
        shape=(b, spec.num_labels),
        name="labels",
    )
    return spec, trainable, cut, theta, cache, onehot


def _fot_step(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """One secfwt SPSA step (MeZO): 2 forwards per direction of the trainable upper layers
    and head from the cached frozen prefix, secret loss, local update. ``pooling`` (default
    CLS) and ``range_check`` (each row's logits and losses checked, as a job's step) as the
    payload says. Parameters of those layers and the head that do not train (the base weights
    under ``lora_modules``) stay with the model owner, as a job's frozen weights do."""
    from secfwt.models.encoder import ForwardSettings
    from secfwt.models.spec import Pooling
    from secfwt.runtime.range_checks import OUTPUT_BOUND, RangeChecks
    from secfwt.tuning.forward import CachedForward
    from secfwt.tuning.spsa import SPSASettings, directions, spsa_step

    spec, trainable, cut, theta, cache, onehot = _step_inputs(sess, payload)
    frozen_names = [n for n in _upper_params(spec, cut) if n not in theta]
    frozen = sess.share_params(spec, payload.get("state"), names=frozen_names, frozen=True)
    b, t = payload["batch"], payload["seq_len"]
    mask = sess.share(
        torch.ones(b, t) if sess.role is Role.DATA_OWNER else None,
        owner=Role.DATA_OWNER,
        shape=(b, t),
        name="attention mask",
    )
    pooling = payload.get("pooling", Pooling.CLS)
    runner = CachedForward(
        ops=sess.ops,
        public=sess.public,
        spec=spec,
        frozen=frozen,
        settings=ForwardSettings(attention=payload["attention"], pooling=pooling),
        cache=cache,
        mask=mask,
        pool_w=_pool_weights(sess, pooling, b, t) if cut < spec.num_layers else None,
        onehot=onehot,
        cut=cut,
        prompt_layer=0,
        guard=(
            RangeChecks(sess).guard(what="classifier outputs", bound=OUTPUT_BOUND)
            if payload.get("range_check")
            else None
        ),
        attention_cached=trainable.attention_frozen(spec),
    )
    spsa = SPSASettings(lr=1e-4, eps=1e-3, directions=payload["directions"])
    idx = list(range(b))

    def step() -> Any:
        us = directions(
            seed=payload["seed"], step=0, shapes=trainable.shapes, count=spsa.directions
        )
        new, _gs, mean_loss = spsa_step(
            lambda ps: runner.losses(ps, idx), theta, us=us, settings=spsa
        )
        return mean_loss

    # theta is not updated in place and the directions come from one seed: every repetition
    # is the same step, an independent trial of it (as the backprop baseline's)
    run, losses = every_rep(step)
    _, costs = measure_reps(comm, meter, run, reps=payload["reps"])
    return {
        "costs": costs,
        "cut": cut,
        "attention_cached": runner.attention_cached,
        "trainable_numel": trainable.numel,
        **reveal_each(sess, losses, "loss"),
    }


def _pool_weights(sess: Any, pooling: Any, b: int, t: int) -> Any:
    """Mean pooling's per-token weights (B, T), shared by the data owner as a job's are (every
    token real here); None for CLS pooling, which needs none."""
    from secfwt.models.spec import Pooling
    from secfwt.tuning.forward import mean_pool_weights

    if pooling is not Pooling.MEAN:
        return None
    mine = sess.role is Role.DATA_OWNER
    return sess.share(
        mean_pool_weights(torch.ones(b, t)) if mine else None,
        owner=Role.DATA_OWNER,
        shape=(b, t),
        name="pooling weights",
    )


def _backprop_step(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """One MPC backpropagation step: CrypTen autograd forward + backward, crypten.optim.SGD.
    With CLS pooling (the default) the last layer computes the first position only, as
    secfwt's forward does (:meth:`secfwt.models.encoder.EncoderModel.top_layers`); with
    ``pooling`` MEAN every position, and the classifier reads their mean."""
    from secfwt.bench import vanilla
    from secfwt.crypten_compat import crypten
    from secfwt.models.spec import Pooling

    spec, trainable, cut, params, x, onehot = _step_inputs(sess, payload)
    mean = payload.get("pooling", Pooling.CLS) is Pooling.MEAN
    for p in params.values():
        p.requires_grad = True
    # grad_threshold=None: CrypTen would clamp every gradient element with a secure comparison
    opt = crypten.optim.SGD(list(params.values()), lr=1e-4)
    # every repetition starts from the same weights (SGD's update undone outside the measured
    # section), so each is an independent trial of one iteration: CrypTen's local truncation
    # fails at random (about |v| 2^-32 for a value v), and a baseline of hundreds of millions
    # of truncations can compute a wrong loss in one repetition and the right one in another
    initial = {n: p.share.clone() for n, p in params.items()}
    losses: list[Any] = []

    def restore() -> None:
        for n, p in params.items():
            p.share = initial[n].clone()

    def step() -> Any:
        opt.zero_grad()
        logits = vanilla.classifier_logits(x, params, spec, start=cut, mean=mean)
        loss = logits.cross_entropy(onehot)
        loss.backward()
        opt.step()
        losses.append(loss.detach() if hasattr(loss, "detach") else loss)
        return losses[-1]

    _, costs = measure_reps(comm, meter, step, reps=payload["reps"], before=restore)
    each = [reveal(sess, v, "loss") for v in losses]  # (reps,), checked one by one
    return {
        "costs": costs,
        "cut": cut,
        "trainable_numel": trainable.numel,
        "output": each[-1],
        "output_each_rep": each,
    }


def _cma_step(
    *, ctx: PartyContext, sess: Any, comm: Any, meter: TrafficMeter, payload: dict[str, Any]
) -> dict[str, Any]:
    """One SecFwT / BBT CMA-ES iteration as a ``cma`` job runs it
    (:func:`secfwt.tuning.loops.cma_loop`): the data owner asks CMA-ES for ``population``
    prompts, shares them, the layers from ``prompt_layer`` up and the head run on population x
    batch rows with the model owner's frozen weights held by it
    (:class:`~secfwt.runtime.backend.SharedPromptScorer`), the logits go to the data owner, which
    computes the losses and tells CMA-ES."""
    from secfwt.models.encoder import ForwardSettings
    from secfwt.models.spec import Pooling
    from secfwt.runtime.backend import SharedPromptScorer
    from secfwt.tuning.cma import CMASettings, PromptSearch
    from secfwt.tuning.forward import CachedForward

    spec = sess.agree_spec(payload.get("spec"))
    cut = payload["prompt_layer"]
    frozen = sess.share_params(
        spec, payload.get("state"), names=_upper_params(spec, cut), frozen=True
    )
    b, t, h = payload["batch"], payload["seq_len"], spec.hidden_size
    mine = sess.role is Role.DATA_OWNER
    cache = sess.share(payload.get("input"), owner=Role.DATA_OWNER, shape=(b, t, h), name="prefix")
    mask = sess.share(
        torch.ones(b, t) if mine else None, owner=Role.DATA_OWNER, shape=(b, t), name="mask"
    )
    pooling = payload.get("pooling", Pooling.CLS)
    forward = CachedForward(
        ops=sess.ops,
        public=sess.public,
        spec=spec,
        frozen=frozen,
        settings=ForwardSettings(attention=payload["attention"], pooling=pooling),
        cache=cache,
        mask=mask,
        pool_w=_pool_weights(sess, pooling, b, t),
        onehot=None,  # the data owner scores the revealed logits itself
        cut=cut,
        prompt_layer=cut,
    )
    pop, p = payload["population"], payload["prompt_length"]
    search = (
        PromptSearch(
            CMASettings(
                intrinsic_dim=payload["intrinsic_dim"],
                prompt_length=p,
                hidden_size=h,
                population=pop,
                sigma0=1.0,
                seed=payload["seed"],
            ),
            embedding_std=1.0,  # the stand-in hidden states have unit variance
        )
        if mine
        else None
    )
    scorer = SharedPromptScorer(
        sess=sess,
        forward=forward,
        population=pop,
        prompt_shape=(p, h),
        labels=payload.get("labels"),
    )
    asked: list[torch.Tensor] = []  # each iteration's candidates, checked one by one

    def step() -> Any:
        cands = search.ask() if search is not None else None  # (pop, P, H)
        losses = scorer.candidate_losses(cands, list(range(b)), iteration=0)  # (pop,) or None
        if search is not None and cands is not None and losses is not None:
            search.tell(losses.tolist())
            asked.append(cands)
        return losses

    run, losses = every_rep(step)  # (pop,) per iteration: the data owner's, computed in the clear
    _, costs = measure_reps(comm, meter, run, reps=payload["reps"])
    return {
        "costs": costs,
        "cut": cut,
        "trainable_numel": payload["intrinsic_dim"],
        "output": losses[-1],
        "output_each_rep": losses,
        "candidates_each_rep": asked,
    }


_CASES: dict[str, Callable[..., dict[str, Any]]] = {
    "secure_decoder": decoder_party.secure_decoder,
    "causal_zo_step": decoder_party.causal_zo_step,
    "secure_forward": _secure_forward,
    "vanilla_forward": _vanilla_forward,
    "attention": _attention,
    "fot_step": _fot_step,
    "backprop_step": _backprop_step,
    "cma_step": _cma_step,
    "frozen_prefix": prefix_party.frozen_prefix,
    "safe_delta": safe_delta_party.safe_delta,
}
