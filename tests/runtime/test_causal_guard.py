"""A causal-LM job's response losses are range-checked (``loss_guard``): a truncation failure
injected into the final norm, the LM head's product or the loss of a secure forward (2^48 added
to one party's share of one value, what a failed 2-party truncation adds) is found by its row's
check and that row computed again, so the losses match the plaintext forward; the same forward
without the guard carries the failure."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

import pytest
import torch

from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role
from tests.conftest import data_owner_result, save_random_decoder

pytestmark = pytest.mark.multiprocess

#: What a failed 2-party truncation adds to one party's share: 2^64 / 2^16 (ring units), i.e.
#: 2^32 in real units at 16 fractional bits.
FAILURE_RING = 2**48
N, T, R = 4, 10, 4  # rows, tokens, response window
NORM = "model.norm.weight"  # the only trainable value: the job's cut is then every layer
#: Rows the injected failures hit, flat in a step's (K N) losses: the final norm (first
#: parameter set), the LM head's product (second set), an evaluation's loss. The norm and head
#: failures go to the window's last position, a reply token in every row (a failure at a
#: prompt position, weight 0, leaves the loss as it is and is rightly not flagged).
NORM_ROW, HEAD_ROW, EVAL_ROW = 2, N + 1, 3
#: Per-row losses (about 6) in fixed point against float64 [measured 3e-4 .. 4.7e-4 in four
#: runs]: the final norm's inverse square root, the head's states at 2^-12 (HEAD_HEADROOM_BITS,
#: about 1e-4 per token) and the range-safe log-sum-exp (about 1e-4, probabilities.py); a
#: failure adds 2^32 or garbage beyond OUTPUT_BOUND.
TOL = 2e-3


def _failing(cls: type, name: str, at: tuple[int, ...], rank: int) -> Any:
    """``patch.object(cls, name, ...)``: the method whose first output gets
    :data:`FAILURE_RING` on rank 0's share of element ``at``; later outputs as they are (the
    row's recomputation runs clean, as a fresh one does)."""
    fn, armed = getattr(cls, name), [True]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if armed and armed.pop() and rank == 0:
            out.share[at] += FAILURE_RING
        return out

    return patch.object(cls, name, wrapped)


def _party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    from secfwt.crypten_compat import crypten
    from secfwt.models.decoder import DecoderModel
    from secfwt.models.ops import SecureOps
    from secfwt.mpc.disclosure import DisclosureTerms, Revealable
    from secfwt.runtime.range_checks import OUTPUT_BOUND, RangeChecks
    from secfwt.runtime.session import PartySession
    from secfwt.tuning.causal_lm import CausalLMForward, ResponseTargets
    from secfwt.tuning.guard import Guard

    both, do, mo = [Role.MODEL_OWNER, Role.DATA_OWNER], Role.DATA_OWNER, Role.MODEL_OWNER
    terms = DisclosureTerms.of([(Revealable.RANGE_CHECK, both), (Revealable.VERIFY_OUTPUTS, [do])])
    sess = PartySession(role=ctx.role, terms=terms, audit_path=None)
    spec, h = payload["spec"], payload["spec"].hidden_size
    mine, theirs = ctx.role is do, ctx.role is mo
    cache = sess.share(payload["cache"] if mine else None, owner=do, shape=(N, R, h), name="x")
    targets = ResponseTargets(
        rows=sess.share(payload["rows"] if mine else None, owner=do, shape=(N, R, h), name="E"),
        weights=sess.share(payload["weights"] if mine else None, owner=do, shape=(N, R), name="w"),
    )
    # the frozen LM head with the model owner in the clear, as a job holds it
    frozen = sess.share_params(
        spec, payload["state"] if theirs else None, names=["lm_head.weight"], frozen=True
    )
    thetas = [
        {NORM: sess.share(v if theirs else None, owner=mo, shape=(h,), name=NORM)}
        for v in payload["norms"]
    ]
    checks = RangeChecks(sess)
    rank = crypten.communicator.get().get_rank()

    def run(guard: Guard | None) -> dict[str, Any]:
        forward = CausalLMForward(
            ops=sess.ops,
            spec=spec,
            frozen=frozen,
            settings=payload["settings"],
            cache=cache,
            mask=None,  # unused: the cache holds the window's last-layer states
            targets=targets,
            cut=spec.num_layers,
            window=R,
            loss_guard=guard,
        )
        idx, out = list(range(N)), {}
        # a failure in a step's final norm, then one in its LM head, then in the loss of an
        # evaluation (one parameter set: what the safety gate scores, loss_sum adds up)
        with _failing(DecoderModel, "final_norm", (NORM_ROW, R - 1, 0), rank):
            out["step_norm"] = forward.example_losses(thetas, idx)
        with _failing(DecoderModel, "lm_logits", (HEAD_ROW, R - 1, 0), rank):
            out["step_head"] = forward.example_losses(thetas, idx)
        with _failing(SecureOps, "target_token_nll", (EVAL_ROW,), rank):
            out["eval"] = forward.example_losses(thetas[-1:], idx)
        return out

    guarded = run(checks.guard(what="response losses", bound=OUTPUT_BOUND))
    recomputed, bare = checks.recomputed, run(None)
    got = {
        name: {
            k: sess.discloser.reveal(v, value=Revealable.VERIFY_OUTPUTS, to=[do])
            for k, v in out.items()
        }
        for name, out in (("guarded", guarded), ("bare", bare))
    }
    crypten.communicator.get().barrier()
    return {**got, "recomputed": recomputed} if mine else None


def test_a_failure_in_a_steps_or_an_evaluations_losses_is_caught_and_recomputed(tmp_path) -> None:
    from secfwt.models.checkpoint import load_checkpoint
    from secfwt.models.decoder import DecoderModel
    from secfwt.models.ops import PlainOps
    from secfwt.models.spec import Head
    from secfwt.models.transformer import ForwardSettings, plain_params
    from secfwt.runtime.range_checks import OUTPUT_BOUND
    from secfwt.tuning.causal_lm import CausalLMForward, ResponseTargets, causal_prefix

    spec, state = load_checkpoint(
        save_random_decoder(tmp_path / "tiny"), head=Head.CAUSAL_LM, num_labels=0, seed=0
    )
    settings = ForwardSettings()
    params = plain_params(state)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.float64)
    mask[1, :3] = mask[3, :5] = 0  # left padding
    model = DecoderModel(spec, params, PlainOps(), settings)
    word = params[spec.word_embeddings][ids]  # (N, T, H)
    # the job's frozen prefix at cut = num_layers: the window's last-layer states (N, R, H)
    cache = causal_prefix(model, word, mask, cut=spec.num_layers, window=R)
    target_ids = ids[:, T - R :]  # the window's next tokens
    weights = torch.ones(N, R, dtype=torch.float64)
    weights[0, :2] = weights[2, :1] = 0  # prompt tokens in the window
    head = params["lm_head.weight"]
    rows = head[target_ids]  # (N, R, H)
    # a ZO step's perturbed final norms, then the current one
    norms = [params[NORM] + 0.1 * torch.randn(spec.hidden_size, generator=g) for _ in range(2)]
    norms.append(params[NORM])
    payload = {
        "spec": spec,
        "settings": settings,
        "state": state,
        "cache": cache.float(),
        "rows": rows.float(),
        "weights": weights.float(),
        "norms": [v.float() for v in norms],
    }
    got = data_owner_result(_party, payload)
    plain = CausalLMForward(
        ops=PlainOps(),
        spec=spec,
        frozen={"lm_head.weight": head},
        settings=settings,
        cache=cache.float().double(),
        mask=None,
        targets=ResponseTargets(rows=rows.float().double(), weights=weights),
        cut=spec.num_layers,
        window=R,
    )
    idx = list(range(N))
    thetas = [{NORM: v.float().double()} for v in norms]
    want = {
        "step_norm": plain.example_losses(thetas, idx),  # (K, N)
        "step_head": plain.example_losses(thetas, idx),
        "eval": plain.example_losses(thetas[-1:], idx),  # (1, N)
    }
    assert float(want["eval"].min()) > 1.0  # real losses (log 300 = 5.7 at random), not 0
    # guarded: each injected failure's row was found and computed again, all rows are right
    assert got["recomputed"] == 3
    for k, w in want.items():
        err = (got["guarded"][k].double() - w).abs()
        assert float(err.max()) < TOL, (k, err)
    # without the guard the same forwards carry the failures: 2^32 where the injection went
    # straight to the loss (the evaluation's); garbage far beyond the bound where it went
    # through the LM head and the log-sum-exp (of unknown size: measured 2.6e7 .. 3.8e9 in five
    # runs); every other row right
    for k, at in (("step_norm", NORM_ROW), ("step_head", HEAD_ROW), ("eval", EVAL_ROW)):
        err = (got["bare"][k].double() - want[k]).abs().flatten()
        if k == "eval":
            assert float(err[at]) == pytest.approx(2.0**32, rel=1e-6), (k, err)
        else:
            assert float(err[at]) > OUTPUT_BOUND, (k, err)
        err[at] = 0
        assert float(err.max()) < TOL, (k, err)
