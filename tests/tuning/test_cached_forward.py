"""CachedForward's step losses: a ZO step that trains only the classifier's last linear layer
takes its perturbed logits from one secret product and local products with the public offsets
(CachedForward._offset_logits), the same losses as the product with every stacked perturbed
head, in plaintext and in MPC, for fewer bytes; and the guard checks each loss with the logits'
differences it depends on."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role
from secfwt.tuning.spsa import Perturbed, perturbed
from tests.conftest import data_owner_result, head_forward

N, H, Q = 6, 64, 3  # rows, hidden width (tiny BERT), directions (2 Q perturbed heads)
EPS = 0.5  # large, so that the offsets' part of the logits is O(1) and a wrong one shows
#: Logits and cross-entropy in fixed point: the head's products (64 terms, 2^-16 each) and the
#: range-safe log-sum-exp (about 1e-4, secfwt.mpc.nonlinear.probabilities).
TOL = 1e-2


def _setup(tiny_bert_cls: Any) -> dict[str, Any]:
    from secfwt.models.checkpoint import load_checkpoint
    from secfwt.models.spec import Head, Pooling
    from secfwt.models.transformer import ForwardSettings

    spec, state = load_checkpoint(
        tiny_bert_cls, head=Head.SEQUENCE_CLASSIFICATION, num_labels=2, seed=0
    )
    g = torch.Generator().manual_seed(1)
    head = {n: state[n].double() for n in ("classifier.weight", "classifier.bias")}
    return {
        "spec": spec,
        "settings": ForwardSettings(pooling=Pooling.MEAN),
        "pooled": torch.randn(N, H, generator=g),  # (N, H) cached pooled states
        "onehot": torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0, 1, 0]), 2).double(),
        "head": head,
        "us": [{n: torch.randn(v.shape, generator=g) for n, v in head.items()} for _ in range(Q)],
    }


def _forward(
    ops: Any, public: Any, setup: dict[str, Any], cache: Any, onehot: Any, guard: Any = None
) -> Any:
    return head_forward(
        ops=ops,
        public=public,
        spec=setup["spec"],
        settings=setup["settings"],
        cache=cache,
        onehot=onehot,
        guard=guard,
    )


def _variants(head: dict[str, Any], us: list[dict[str, torch.Tensor]]) -> list[Perturbed]:
    return [perturbed(head, u, s * EPS, lambda t: t) for u in us for s in (1, -1)]


def test_perturbed_heads_give_the_stacked_losses_in_plaintext(tiny_bert_cls) -> None:
    from secfwt.models.ops import PlainOps

    s = _setup(tiny_bert_cls)
    forward = _forward(PlainOps(), lambda t: t.double(), s, s["pooled"].double(), s["onehot"])
    us = [{n: u.double() for n, u in d.items()} for d in s["us"]]
    variants = _variants(s["head"], us)
    idx = list(range(N))
    assert forward._offset_logits(variants, idx) is not None
    linear = forward.example_losses(variants, idx)  # (2Q, N)
    stacked = forward.example_losses([dict(v) for v in variants], idx)  # plain mappings
    assert linear.shape == (2 * Q, N) and float(stacked.std()) > 0.1
    assert float((linear - stacked).abs().max()) < 1e-12
    # not the linear path: another base, or a parameter the logits are not linear in
    other = perturbed({n: v + 1 for n, v in s["head"].items()}, us[0], EPS, lambda t: t)
    assert forward._offset_logits([*variants, other], idx) is None
    frozen_dense = {**s["head"], "bert.pooler.dense.bias": torch.zeros(H, dtype=torch.float64)}
    zeros = {n: torch.zeros_like(v) for n, v in frozen_dense.items()}
    assert forward._offset_logits([Perturbed(frozen_dense, zeros)], idx) is None


def test_the_guard_checks_each_loss_with_the_logit_differences(tiny_bert_cls) -> None:
    from secfwt.models.ops import PlainOps

    s = _setup(tiny_bert_cls)
    checked: list[torch.Tensor] = []

    def guard(compute: Any, n: int) -> Any:  # what a guard sees: (rows, sets, C) per row
        checked.append(compute(list(range(n))))
        return checked[-1]

    forward = _forward(
        PlainOps(), lambda t: t.double(), s, s["pooled"].double(), s["onehot"], guard
    )
    us = [{n: u.double() for n, u in d.items()} for d in s["us"]]
    variants = _variants(s["head"], us)
    losses = forward.example_losses(variants, list(range(N)))  # (2Q, N)
    logits = forward._stacked_logits(variants, list(range(N)))  # (2Q, N, C)
    (rows,) = checked
    assert rows.shape == (N, 2 * Q, 2)
    assert torch.equal(rows[..., -1], losses.t())
    assert torch.equal(rows[..., 0], (logits[..., 1] - logits[..., 0]).t())


def _party(ctx: PartyContext, s: dict[str, Any]) -> dict[str, Any] | None:
    from secfwt.crypten_compat import crypten
    from secfwt.mpc import session
    from secfwt.mpc.disclosure import DisclosureTerms, Revealable
    from secfwt.runtime.session import PartySession

    do, mo = Role.DATA_OWNER, Role.MODEL_OWNER
    terms = DisclosureTerms.of([(Revealable.VERIFY_OUTPUTS, [do])])
    sess = PartySession(role=ctx.role, terms=terms, audit_path=None)
    mine = ctx.role is do
    cache = sess.share(s["pooled"] if mine else None, owner=do, shape=(N, H), name="x")
    onehot = sess.share(s["onehot"] if mine else None, owner=do, shape=(N, 2), name="y")
    head = {
        n: sess.share(v if ctx.role is mo else None, owner=mo, shape=tuple(v.shape), name=n)
        for n, v in s["head"].items()
    }
    forward = _forward(sess.ops, sess.public, s, cache, onehot)
    variants = _variants(head, s["us"])
    out, sent = {}, {}
    for key, sets in (("linear", variants), ("stacked", [dict(v) for v in variants])):
        before = session.traffic_now()
        losses = forward.example_losses(sets, list(range(N)))
        after = session.traffic_now()
        assert before is not None and after is not None
        sent[key] = after.minus(before).sent
        out[key] = sess.discloser.reveal(losses, value=Revealable.VERIFY_OUTPUTS, to=[do])
    crypten.communicator.get().barrier()
    return {**out, "sent": sent} if mine else None


@pytest.mark.multiprocess
def test_perturbed_heads_in_mpc_match_plaintext_and_open_one_head(tiny_bert_cls) -> None:
    from secfwt.models.ops import PlainOps

    s = _setup(tiny_bert_cls)
    got = data_owner_result(_party, s)
    plain = _forward(PlainOps(), lambda t: t.double(), s, s["pooled"].double(), s["onehot"])
    us = [{n: u.double() for n, u in d.items()} for d in s["us"]]
    want = plain.example_losses(_variants(s["head"], us), list(range(N)))  # (2Q, N)
    assert float(want.std()) > 0.1
    for key in ("linear", "stacked"):
        err = (got[key].double() - want).abs()
        assert float(err.max()) < TOL, (key, err)
    # the stacked product opens each of the 2Q perturbed heads (C x H values) where the linear
    # path opens one head; everything else (the features' opening, the loss) is the same
    c = s["head"]["classifier.weight"].shape[0]
    assert got["sent"]["stacked"] - got["sent"]["linear"] == 8 * (2 * Q - 1) * c * H
