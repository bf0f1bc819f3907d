"""The decoder on the MPC backend equals its float64 plaintext reference, in real party processes.

Two tiny random checkpoints run in one session (model owner, data owner, dealer):

* Llama with grouped-query attention (4 query heads, 2 key/value heads) and an untied LM head,
  left padding, with the key mask public (positions cumsum(mask) - 1) and secret (positions
  0..T-1);
* Mistral with a sliding window of 4 (< T) and a tied LM head, right padding, secret key mask;

and RMSNorm on rows shaped like SmolLM2's residual stream after its massive activation (one
channel of 2.5e4 among values of ~10, mean square 1.1e6, beyond the LayerNorm range of 2^18),
with the decoder's mean-square range.

As in ``secfwt verify-model``, the model owner keeps its linear weights in the clear
(:class:`~secfwt.mpc.owned.OwnedMatrix`, one-sided products) and secret-shares everything else
(norm weights, the word-embedding table, which the tied head multiplies by Beaver's product).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secfwt.models.checkpoint import load_checkpoint
from secfwt.models.decoder import RMS_MEAN_SQUARE_RANGE, DecoderModel
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
NORM_ATOL = 2e-3
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
    rows = crypten.cryptensor(payload["rows"], src=data_owner)
    weight = crypten.cryptensor(payload["rows_weight"], src=owner)
    out["rms_norm"] = (
        SecureOps()
        .rms_norm(rows, weight=weight, eps=1e-5, mean_square_range=RMS_MEAN_SQUARE_RANGE)
        .get_plain_text()
    )
    return out if ctx.role is Role.DATA_OWNER else None


def _massive_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 576) rows: typical values of std 10, one row with a 2.5e4 channel (as SmolLM2's first
    token from layer 12 on), one with 770 (layers 3-8), one tiny row (mean square 7e-3)."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 576, generator=g) * 10
    rows[0, 100] = 2.49e4
    rows[1, 7] = -770.0
    rows[3] *= 0.0085
    return rows, torch.rand(576, generator=g) + 0.5


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
    rows, weight = _massive_rows()
    common = {"rows": rows, "rows_weight": weight}
    results = run_parties(
        _party,
        payloads={
            Role.MODEL_OWNER: {"cases": owner_cases, **common},
            Role.DATA_OWNER: {"cases": data_cases, **common},
        },
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
    r = rows.double()
    want = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    # [measured 3.1e-4, outputs up to 34]: rms_norm's 1e-4 relative plus 2^-16 input resolution
    assert (got["rms_norm"].double() - want).abs().max() < NORM_ATOL
