"""The decoder on the MPC backend equals its float64 plaintext reference, in real party processes.

Two tiny random checkpoints run in one session (model owner, data owner, dealer):

* Llama with grouped-query attention (4 query heads, 2 key/value heads) and an untied LM head,
  left padding, with the key mask public (positions cumsum(mask) - 1) and secret (positions
  0..T-1);
* Mistral with a sliding window of 4 (< T) and a tied LM head, right padding, secret key mask.

As in ``secfwt verify-model``, the model owner keeps its linear weights in the clear
(:class:`~secfwt.mpc.owned.OwnedMatrix`, one-sided products) and secret-shares everything else
(norm weights, the word-embedding table, which the tied head multiplies by Beaver's product).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.decoder import DecoderModel
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Head
from secfwt.models.transformer import ForwardSettings, plain_params
from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from tests.conftest import save_random_decoder

#: Max absolute logit error against float64 [measured 2.0e-3 .. 2.9e-3 in two runs, logits ~7]:
#: fixed-point inputs (2^-16), RMSNorm (~4e-4 relative), softmax (1e-4), SiLU (1e-3 absolute)
#: through two layers and a 64-wide head.
ATOL = 1e-2
N, T = 2, 10


def _party(ctx: PartyContext, payload: dict[str, Any]) -> dict[str, Any] | None:
    from secfwt.crypten_compat import crypten
    from secfwt.models.ops import SecureOps
    from secfwt.mpc.owned import OwnedMatrix

    owner, data_owner = Role.MODEL_OWNER.rank, Role.DATA_OWNER.rank
    out: dict[str, Any] = {}
    for case in payload["cases"]:
        spec, state, word, mask = case["spec"], case.get("state"), case.get("word"), case["mask"]
        params = {
            n: OwnedMatrix.share(state[n] if state else None, owner=owner, shape=s)
            if spec.is_linear_weight(n)
            else crypten.cryptensor(state[n] if state else torch.zeros(s), src=owner)
            for n, s in spec.param_shapes
        }
        x = crypten.cryptensor(
            word if word is not None else torch.zeros(N, T, spec.hidden_size), src=data_owner
        )
        secret_mask = crypten.cryptensor(mask, src=data_owner)  # the other party's value unused
        model = DecoderModel(spec, params, SecureOps(), ForwardSettings())
        out[case["name"]] = {
            "public": model.forward(x, mask).get_plain_text() if case["public"] else None,
            "secret": model.forward(x, secret_mask).get_plain_text(),
        }
    return out if ctx.role is Role.DATA_OWNER else None


@pytest.mark.multiprocess
def test_secure_decoder_matches_plaintext(tmp_path) -> None:
    configs = {
        "llama-gqa-left": ("llama", {}, "left", True),
        "mistral-window-tied-right": (
            "mistral",
            {"sliding_window": 4, "tie_word_embeddings": True},
            "right",
            False,
        ),
    }
    owner_cases, data_cases, refs = [], [], {}
    for name, (family, overrides, padding, public) in configs.items():
        path = save_random_decoder(tmp_path / name, family=family, **overrides)
        spec, state = load_checkpoint(path, head=Head.CAUSAL_LM, num_labels=0, seed=0)
        ids = torch.randint(3, spec.vocab_size, (N, T), generator=torch.Generator().manual_seed(2))
        mask = torch.ones(N, T)
        if padding == "left":
            mask[1, :3] = 0
        else:
            mask[1, 6:] = 0
        word = state[spec.word_embeddings][ids].float()
        plain = DecoderModel(spec, plain_params(state), PlainOps(), ForwardSettings())
        refs[name] = (plain.forward(word.double(), mask.double()), mask.bool())
        common = {"name": name, "spec": spec, "mask": mask, "public": public}
        owner_cases.append({**common, "state": state})
        data_cases.append({**common, "word": word})
    results = run_parties(
        _party,
        payloads={Role.MODEL_OWNER: {"cases": owner_cases}, Role.DATA_OWNER: {"cases": data_cases}},
        provider=Provider.TTP,
        timeout_s=300,
    )
    got = results[Role.DATA_OWNER].value
    for name, (ref, real) in refs.items():
        for kind in ("public", "secret"):
            logits = got[name][kind]
            if logits is None:
                continue
            err = (logits.double() - ref)[real].abs().max()
            assert err < ATOL, (name, kind, float(err))
