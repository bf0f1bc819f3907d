"""``secfwt verify-model`` for causal decoders: the secure forward against transformers' forward.

Input: sample chat prompts rendered by the checkpoint's chat template (random ids when it has no
tokenizer): the first row a multi-turn conversation filling all ``seq_len`` positions, the others
single questions left-padded as in batched generation. The parties run
:class:`~secfwt.models.decoder.DecoderModel` with the model owner's frozen weights (linear layers,
and the tied LM head, held in the clear by it: :class:`~secfwt.mpc.owned.OwnedMatrix`) and reveal
the logits, and with ``per_layer`` every layer's output, to the data owner.

The reference is transformers' float64 forward with ``sdpa`` attention (its eager attention turns
left-padded rows into NaN in float64) and ``position_ids = cumsum(mask) - 1``. Reported: logit
errors over real positions (max and mean abs, mean abs over the logits' std), next-token argmax
agreement, the activation ranges at every MPC nonlinearity (plaintext, same code) and whether
the secure ranges cover them, and optionally the error after every layer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ModelError
from secfwt.models.checkpoint import build_hf_model, load_checkpoint, spec_from_model, state_dict_of
from secfwt.models.decoder import RMS_MEAN_SQUARE_RANGE, DecoderModel
from secfwt.models.ranges import RangeRecorder
from secfwt.models.spec import Attention, Family, Head, ModelSpec
from secfwt.models.transformer import ForwardSettings, plain_params
from secfwt.mpc.disclosure import DisclosureTerms, Revealable
from secfwt.mpc.launcher import PartyContext
from secfwt.roles import Role

log = logging.getLogger(__name__)

#: A public conversation (user turns and short assistant answers) for the first, full row.
CONVERSATION = (
    ("user", "What does secure multi-party computation let two organisations do?"),
    (
        "assistant",
        "It lets them compute a function of their combined data, such as fine-tuning a model, "
        "while each of them keeps its own inputs secret from the other.",
    ),
    ("user", "Why would a hospital and a model vendor want that?"),
    (
        "assistant",
        "The hospital cannot share patient records and the vendor will not hand over its "
        "weights, but both want a model adapted to the hospital's data.",
    ),
    ("user", "How slow is it compared with ordinary inference?"),
)
#: Single questions for the left-padded rows.
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 100.",
    "How do I bake bread at home?",
    "Translate 'good morning' into Spanish.",
)


def check_decoder_request(req: Any, *, head: Head) -> None:
    """Refusals that must happen before any party starts."""
    if head not in (Head.CAUSAL_LM, Head.BASE):
        raise ModelError(
            f"--head {head.value!r}: decoders support 'causal_lm' (next-token logits) and 'base'"
        )
    if req.samples < 1:
        raise ModelError(f"--samples {req.samples}: must be at least 1")


def sample_chat_inputs(
    model_dir: Path, *, seq_len: int, samples: int, vocab_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Token ids and key mask (samples, seq_len): row 0 full, the others left-padded."""
    from secfwt.data.tokenize import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok is None or not getattr(tok, "chat_template", None):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab_size, (samples, seq_len), generator=g)
        return ids, torch.ones(samples, seq_len, dtype=torch.long), "random token ids"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows, masks = [], []
    chat = [{"role": r, "content": c} for r, c in CONVERSATION]
    full = _chat_ids(tok, chat)
    while len(full) < seq_len:  # repeat the conversation until it fills the row
        full = full + _chat_ids(tok, chat)
    rows.append(full[:seq_len])
    masks.append([1] * seq_len)
    for i in range(1, samples):
        q = QUESTIONS[(i - 1) % len(QUESTIONS)]
        ids = _chat_ids(tok, [{"role": "user", "content": q}])[-seq_len:]
        rows.append([pad] * (seq_len - len(ids)) + ids)
        masks.append([0] * (seq_len - len(ids)) + [1] * len(ids))
    return (
        torch.tensor(rows),
        torch.tensor(masks),
        "chat-template prompts (row 0 full, rest left-padded)",
    )


def _chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def decoder_party(ctx: PartyContext, payload: dict[str, Any]) -> Any:
    """One party of the decoder check (model owner, data owner)."""
    from secfwt.mpc.owned import OwnedMatrix
    from secfwt.runtime.inputs import embed_tokens
    from secfwt.runtime.session import PartySession

    sess = PartySession(
        role=ctx.role, terms=DisclosureTerms.from_dict_list(payload["terms"]), audit_path=None
    )
    req = payload["request"]
    spec = state = None
    if ctx.role is Role.MODEL_OWNER:
        spec, state = load_checkpoint(
            Path(payload["model_dir"]), head=payload["head"], num_labels=0, seed=req.seed
        )
    spec = sess.agree_spec(spec)
    mask = sess.broadcast(payload.get("mask"), src=Role.DATA_OWNER)  # public padding (sample)
    shape = tuple(mask.shape)
    t0 = time.perf_counter()
    params = sess.share_params(spec, state, names=[n for n, _ in spec.param_shapes], frozen=True)
    if spec.head is Head.CAUSAL_LM and "lm_head.weight" not in params:
        # the tied head: the model owner's table in the clear for the (T, H) x (H, V) product
        table = None if state is None else state[spec.word_embeddings]
        params["lm_head.weight"] = OwnedMatrix.share(
            table,
            owner=Role.MODEL_OWNER.rank,
            shape=spec.shape_of(spec.word_embeddings),
            fixed_mask=True,
        )
    h = embed_tokens(
        sess,
        spec,
        state,
        mode=req.embedding,
        input_ids=payload.get("input_ids"),
        shape=shape,
        secret_table=params.get(spec.word_embeddings),
    )
    model = DecoderModel(spec, params, sess.ops, decoder_settings(req))
    to = [Role.DATA_OWNER]
    layers = []
    for i in range(spec.num_layers):
        h = model.layers(h, mask.float(), start=i, stop=i + 1)
        if req.per_layer and i < spec.num_layers - 1:
            layers.append(
                sess.discloser.reveal(
                    h, value=Revealable.VERIFY_OUTPUTS, to=to, note=f"layer {i} output"
                )
            )
    normed = model.final_norm(h)
    out = model.lm_logits(normed) if spec.head is Head.CAUSAL_LM else normed
    compute_s = time.perf_counter() - t0
    if req.per_layer:
        layers.append(
            sess.discloser.reveal(normed, value=Revealable.VERIFY_OUTPUTS, to=to, note="final norm")
        )
    out_plain = sess.discloser.reveal(
        out,
        value=Revealable.VERIFY_OUTPUTS,
        to=to,
        note="logits" if spec.head is Head.CAUSAL_LM else "last hidden states",
    )
    return {"output": out_plain, "layers": layers, "compute_s": compute_s}


def decoder_settings(req: Any) -> ForwardSettings:
    """The forward both the parties and the reference run (attention and RFA draws)."""
    return ForwardSettings(attention=req.attention, rfa=req.rfa)


def decoder_reference(
    model_dir: Path,
    *,
    head: Head,
    seed: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    settings: ForwardSettings,
) -> dict[str, Any]:
    """transformers' float64 forward (sdpa) and secfwt's plaintext decoder with range recording.

    With RFA the reference is the plaintext decoder itself (with the parties' random features):
    the RFA model is by design a different function from the checkpoint's softmax model.
    """
    hf = build_hf_model(model_dir, head=head, num_labels=0, seed=seed, attn="sdpa").double()
    spec = spec_from_model(hf, family=Family(hf.config.model_type), head=head)
    params = plain_params(state_dict_of(hf))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        o = hf(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
        )
    hf_out = o.logits if head is Head.CAUSAL_LM else o.last_hidden_state
    recorder = RangeRecorder()
    plain_out, plain_layers = _recorded_forward(spec, params, recorder, ids, mask, settings)
    if settings.attention is Attention.RFA:
        return {
            "output": plain_out,
            "layers": plain_layers,
            "plain_vs_transformers": None,
            "ranges": recorder.summary(),
            "uncovered": recorder.uncovered(mean_square_range=RMS_MEAN_SQUARE_RANGE),
        }
    return {
        "output": hf_out,
        "layers": list(o.hidden_states[1:]),  # layer 0 .. L-2 outputs, then the final norm
        "plain_vs_transformers": (plain_out - hf_out)[mask.bool()].abs().max().item(),
        "ranges": recorder.summary(),
        "uncovered": recorder.uncovered(mean_square_range=RMS_MEAN_SQUARE_RANGE),
    }


def _recorded_forward(
    spec: ModelSpec,
    params: dict[str, torch.Tensor],
    recorder: RangeRecorder,
    ids: torch.Tensor,
    mask: torch.Tensor,
    settings: ForwardSettings,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output and the layer outputs (layer 0 .. L-2, then the final norm), as transformers'
    ``hidden_states[1:]`` lists them."""
    model = DecoderModel(spec, params, recorder, settings)
    h = params[spec.word_embeddings][ids]
    key_mask = mask.to(torch.float64)
    layers = []
    for i in range(spec.num_layers):
        recorder.layer = i
        h = model.layers(h, key_mask, start=i, stop=i + 1)
        if i < spec.num_layers - 1:
            layers.append(h)
    recorder.layer = spec.num_layers
    layers.append(model.final_norm(h))
    return model.output(h), layers


#: A position whose reference top-1 logit leads the runner-up by less than this many logits'
#: standard deviations is a near tie: two logits each off by the tolerated mean error (1% of the
#: std) in opposite directions can swap it, so a flip there is within tolerance, not a failure.
#: Random-weight models have many (flat logits); the packaged SmolLM2 at 64 tokens had none flip.
TIE_LEAD_OVER_STD = 0.02


def decoder_report(
    secure: dict[str, Any], ref: dict[str, Any], *, mask: torch.Tensor, per_layer: bool
) -> dict[str, Any]:
    """Logit errors and argmax agreement over real positions, plus the per-layer errors."""
    real = mask.bool()
    s, r = secure["output"].double()[real], ref["output"][real]  # (positions, V)
    err = (s - r).abs()
    agree = s.argmax(-1) == r.argmax(-1)  # (positions,)
    top2 = r.topk(2, dim=-1).values  # (positions, 2)
    lead = (top2[:, 0] - top2[:, 1]) / r.std()  # the reference's top-1 lead, in logits' stds
    decisive = lead >= TIE_LEAD_OVER_STD
    report: dict[str, Any] = {
        "positions": int(real.sum()),
        "logits_max_abs_err": err.max().item(),
        "logits_mean_abs_err": err.mean().item(),
        "logits_std": r.std().item(),
        "logits_mean_abs_err_over_std": (err.mean() / r.std()).item(),
        "argmax_agreement": agree.double().mean().item(),
        "argmax_near_ties": int((~decisive).sum()),
        "argmax_agreement_outside_near_ties": (
            agree[decisive].double().mean().item() if bool(decisive.any()) else 1.0
        ),
        "argmax_disagreements": [
            {"position": int(i), "reference_lead_over_std": lead[i].item()}
            for i in torch.nonzero(~agree).flatten()
        ],
        "plaintext_decoder_vs_transformers_max_abs_err": ref["plain_vs_transformers"],
        "activation_ranges": ref["ranges"],
        "ranges_not_covered": ref["uncovered"],
    }
    if per_layer:
        rows = []
        for i, (got, want) in enumerate(zip(secure["layers"], ref["layers"], strict=True)):
            g, w = got.double()[real], want[real]
            e = (g - w).abs()
            rows.append(
                {
                    "layer": i if i < len(ref["layers"]) - 1 else "final_norm",
                    "max_abs_err": e.max().item(),
                    "mean_abs_err": e.mean().item(),
                    "reference_mean_abs": w.abs().mean().item(),
                    "reference_max_abs": w.abs().max().item(),
                }
            )
        report["per_layer"] = rows
    return report
