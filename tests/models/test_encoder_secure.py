"""The encoder on the MPC backend equals its plaintext reference (one session, both weight forms).

A tiny random BERT checkpoint runs one forward (embeddings, two encoder layers, the
classification head) with the model owner's weights secret-shared (Beaver products) and with its
weight matrices held in the clear by the model owner (:class:`secfwt.mpc.owned.OwnedMatrix`,
one-sided products); the data owner's word embeddings are shared. Both must match the float64
plaintext forward of the same code within the stated tolerance, and each other within the
fixed-point noise.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Head
from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from tests.conftest import save_random_checkpoint

#: Max absolute error of the hidden states and logits against float64 [measured on two random
#: checkpoints: hidden states 1.1e-3 .. 1.2e-3, logits 9e-5 .. 4e-4, for either weight form]:
#: fixed-point inputs (2^-16), the nonlinearities' stated errors (GELU 3e-4, softmax 1e-4,
#: LayerNorm ~1e-3 at small variances), through two layers.
ATOL = 1e-2
T = 12


def _party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    from secfwt.crypten_compat import crypten
    from secfwt.models.ops import SecureOps
    from secfwt.mpc.owned import OwnedMatrix

    spec, state, word = payload["spec"], payload.get("state"), payload.get("word")
    owner = Role.MODEL_OWNER.rank
    secret = {
        n: crypten.cryptensor(state[n] if state else torch.zeros(s), src=owner)
        for n, s in spec.param_shapes
    }
    owned = dict(secret)
    for n, s in spec.param_shapes:
        if n.endswith(".weight") and len(s) == 2 and "embeddings" not in n:
            owned[n] = OwnedMatrix.share(state[n] if state else None, owner=owner, shape=s)
    x = crypten.cryptensor(
        word if word is not None else torch.zeros(1, T, spec.hidden_size), src=Role.DATA_OWNER.rank
    )
    mask = torch.ones(1, T)
    out: dict[str, Any] = {}
    for name, params in (("secret", secret), ("owned", owned)):
        model = EncoderModel(spec, params, SecureOps(), ForwardSettings())
        h = model.layers(model.embed(x), mask)
        out[name] = (h.get_plain_text(), model.output(h).get_plain_text())
    # the forward's last layer computes token 0 only (EncoderModel.top_layers)
    out["forward"] = model.forward(x, mask).get_plain_text()
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.mark.multiprocess
def test_secure_encoder_matches_plaintext_with_secret_and_owned_weights(tmp_path) -> None:
    path = save_random_checkpoint(tmp_path / "ckpt", family="bert", head="sequence_classification")
    spec, state = load_checkpoint(path, head=Head.SEQUENCE_CLASSIFICATION, num_labels=2, seed=0)
    ids = torch.randint(5, spec.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    word = state[spec.word_embeddings][ids].float()
    plain = EncoderModel(spec, plain_params(state), PlainOps(), ForwardSettings())
    h_ref = plain.layers(plain.embed(word.double()), torch.ones(1, T, dtype=torch.float64))
    logits_ref = plain.output(h_ref)
    results = run_parties(
        _party,
        payloads={
            Role.MODEL_OWNER: {"spec": spec, "state": state},
            Role.DATA_OWNER: {"spec": spec, "word": word},
        },
        provider=Provider.TTP,
        timeout_s=300,
    )
    got = results[Role.DATA_OWNER].value
    for name in ("secret", "owned"):
        h, logits = got[name]
        assert (h.double() - h_ref).abs().max() < ATOL, name
        assert (logits.double() - logits_ref).abs().max() < ATOL, name
    assert (got["secret"][0] - got["owned"][0]).abs().max() < ATOL
    assert (got["forward"].double() - logits_ref).abs().max() < ATOL
