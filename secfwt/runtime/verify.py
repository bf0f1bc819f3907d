"""``secfwt verify-model``: a secure forward of a checkpoint against its plaintext forward.

softmax mode: the reference is the ``transformers`` forward itself (eager attention).
rfa mode: the reference is secfwt's plaintext encoder with the same Random Feature Attention
(the RFA model is a different function from the checkpoint's softmax model by design).
Decoders (Llama, Qwen2, Mistral) are checked on chat prompts, by their logits:
:mod:`secfwt.runtime.verify_decoder`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ConfigError, ToleranceExceededError
from secfwt.models.attention import RFASettings
from secfwt.models.checkpoint import (
    build_hf_model,
    check_architecture,
    family_of,
    load_checkpoint,
    load_config,
    max_input_tokens,
    resolve_model_path,
    spec_from_model,
    state_dict_of,
)
from secfwt.models.encoder import EncoderModel, ForwardSettings, plain_params
from secfwt.models.ops import PlainOps
from secfwt.models.spec import Attention, EmbeddingMode, Head, Pooling
from secfwt.mpc.disclosure import DisclosureTerms, Revealable
from secfwt.mpc.launcher import PartyContext, run_parties
from secfwt.mpc.provider import Provider
from secfwt.roles import Role
from secfwt.runtime.verify_decoder import (
    check_decoder_request,
    decoder_party,
    decoder_reference,
    decoder_report,
    decoder_settings,
    sample_chat_inputs,
)

log = logging.getLogger(__name__)

SAMPLE_TEXT = (
    "Secure multi-party computation lets a hospital and a model vendor fine-tune a language model "
    "together without either of them seeing the other's secrets. The vendor's weights and the "
    "hospital's records are split into random-looking shares; every matrix product, softmax and "
    "layer normalisation runs on those shares, and only the values both sides agreed to reveal are "
    "ever reconstructed. This paragraph is long enough to fill a sequence of a few hundred tokens "
    "when it is repeated, so that the verification exercises realistic attention patterns, "
    "positional embeddings far from the start of the table, and activations of the ranges seen on "
    "real text rather than on random token identifiers. "
)


@dataclasses.dataclass(frozen=True)
class VerifyRequest:
    model_path: str
    attention: Attention = Attention.SOFTMAX
    seq_len: int = 128
    embedding: EmbeddingMode = EmbeddingMode.PRIVATE
    head: Head | None = None  # None: from the checkpoint's architectures
    rfa: RFASettings = dataclasses.field(default_factory=RFASettings)
    seed: int = 0
    provider: Provider = Provider.TTP
    max_abs_tol: float = 0.1
    mean_abs_tol: float = 0.01
    timeout_s: float = 1800.0
    # decoders: sample rows, per-layer report, and the pass criteria on the logits
    samples: int = 3
    per_layer: bool = False
    min_argmax_agreement: float = 0.99
    max_mean_err_over_std: float = 0.01


def head_from_config(config: Any) -> Head:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return Head.CAUSAL_LM
    if any(a.endswith("ForMaskedLM") for a in archs):
        return Head.MASKED_LM
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return Head.SEQUENCE_CLASSIFICATION
    return Head.BASE


def sample_inputs(
    model_dir: Path, *, seq_len: int, vocab_size: int, seed: int
) -> tuple[torch.Tensor, str]:
    """Token ids (1, seq_len) of the sample text, or random ids when there is no tokenizer."""
    from secfwt.data.tokenize import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(
            3, vocab_size, (1, seq_len), generator=g
        ), "random token ids (no tokenizer in checkpoint)"
    enc = tok(
        SAMPLE_TEXT * 8,
        truncation=True,
        max_length=seq_len,
        padding="max_length",
        return_tensors="pt",
    )
    return enc["input_ids"], "sample text"


def _party(ctx: PartyContext, payload: dict[str, Any]) -> Any:
    from secfwt.runtime.inputs import embed_tokens
    from secfwt.runtime.session import PartySession

    terms = DisclosureTerms.from_dict_list(payload["terms"])
    sess = PartySession(role=ctx.role, terms=terms, audit_path=None)
    req: VerifyRequest = payload["request"]
    spec = state = None
    if ctx.role is Role.MODEL_OWNER:
        spec, state = load_checkpoint(
            Path(payload["model_dir"]),
            head=payload["head"],
            num_labels=payload["num_labels"],
            seed=req.seed,
        )
    spec = sess.agree_spec(spec)
    ids = payload.get("input_ids")
    shape = sess.broadcast(None if ids is None else tuple(ids.shape), src=Role.DATA_OWNER)
    mlm = spec.head is Head.MASKED_LM
    secret_table = req.embedding is EmbeddingMode.PRIVATE or mlm
    names = [n for n, _ in spec.param_shapes if secret_table or n != spec.word_embeddings]
    t0 = time.perf_counter()
    params = sess.share_params(spec, state, names=names, frozen=True)
    word = embed_tokens(
        sess,
        spec,
        state,
        mode=req.embedding,
        input_ids=ids,
        shape=shape,
        secret_table=params.get(spec.word_embeddings),
    )
    mask = sess.public(torch.ones(shape))  # the sample has no padding
    model = EncoderModel(
        spec,
        params,
        sess.ops,
        ForwardSettings(attention=req.attention, rfa=req.rfa, pooling=Pooling.CLS),
    )
    h = model.layers(model.embed(word), mask)
    out = model.output(h)
    compute_s = time.perf_counter() - t0
    to = [Role.DATA_OWNER]
    h_plain = sess.discloser.reveal(
        h, value=Revealable.VERIFY_OUTPUTS, to=to, note="last hidden states"
    )
    out_plain = (
        sess.discloser.reveal(out, value=Revealable.VERIFY_OUTPUTS, to=to, note="head output")
        if spec.head is not Head.BASE
        else h_plain
    )
    return {"hidden": h_plain, "output": out_plain, "compute_s": compute_s}


def run_verify(req: VerifyRequest) -> dict[str, Any]:
    model_dir = resolve_model_path(req.model_path)
    config = load_config(model_dir)
    family = check_architecture(config)
    head = req.head or head_from_config(config)
    longest = max_input_tokens(config)
    if not 1 <= req.seq_len <= longest:
        raise ConfigError(
            f"--seq-len {req.seq_len}: must be between 1 and {longest}, the longest input this "
            "checkpoint's position table allows"
        )
    if family.is_decoder:
        return _run_decoder(req, model_dir=model_dir, family=family, head=head, config=config)
    num_labels = int(getattr(config, "num_labels", 2) or 2)
    ids, source = sample_inputs(
        model_dir, seq_len=req.seq_len, vocab_size=config.vocab_size, seed=req.seed
    )
    results, wall = _launch(
        _party,
        req,
        owner={"model_dir": str(model_dir), "head": head, "num_labels": num_labels},
        data={"input_ids": ids},
    )
    secure = results[Role.DATA_OWNER].value
    ref_hidden, ref_out, impl_err = _reference(
        model_dir, req=req, head=head, num_labels=num_labels, ids=ids
    )
    err = (secure["hidden"].double() - ref_hidden).abs()
    out_s, out_r = secure["output"].double(), ref_out
    agree = (out_s.argmax(-1) == out_r.argmax(-1)).double().mean().item()
    report = {
        **_header(req, model_dir=model_dir, family=family, head=head, source=source),
        "rfa": dataclasses.asdict(req.rfa) if req.attention is Attention.RFA else None,
        "reference": "transformers forward (eager attention)"
        if req.attention is Attention.SOFTMAX
        else "secfwt plaintext forward with the same RFA (float64)",
        "max_abs_err": err.max().item(),
        "mean_abs_err": err.mean().item(),
        "output_max_abs_err": (out_s - out_r).abs().max().item(),
        "argmax_agreement": agree,
        "reference_magnitude": {
            "hidden_max_abs": ref_hidden.abs().max().item(),
            "hidden_mean_abs": ref_hidden.abs().mean().item(),
        },
        "plaintext_encoder_vs_transformers_max_abs_err": impl_err,
        "tolerance": {"max_abs": req.max_abs_tol, "mean_abs": req.mean_abs_tol},
        "wall_s": wall,
        "secure_compute_s": secure["compute_s"],
        "parties": _parties(results),
    }
    report["passed"] = (
        report["max_abs_err"] < req.max_abs_tol and report["mean_abs_err"] < req.mean_abs_tol
    )
    return report


def _launch(
    party: Any, req: VerifyRequest, *, owner: dict[str, Any], data: dict[str, Any]
) -> tuple[dict[Role, Any], float]:
    """Run the parties (model owner, data owner, dealer) under terms that reveal the outputs to
    the data owner; returns their results and the wall time."""
    terms = [(Revealable.VERIFY_OUTPUTS, [Role.DATA_OWNER])]
    if req.embedding is EmbeddingMode.TABLE_TO_DATA_OWNER:
        terms.append((Revealable.EMBEDDING_TABLE, [Role.DATA_OWNER]))
    common = {"request": req, "terms": DisclosureTerms.of(terms).to_list()}
    t0 = time.perf_counter()
    results = run_parties(
        party,
        payloads={Role.MODEL_OWNER: {**common, **owner}, Role.DATA_OWNER: {**common, **data}},
        provider=req.provider,
        timeout_s=req.timeout_s,
    )
    return results, time.perf_counter() - t0


def _header(
    req: VerifyRequest, *, model_dir: Path, family: Any, head: Head, source: str
) -> dict[str, Any]:
    """What was checked: the first fields of every report."""
    return {
        "model_path": str(model_dir),
        "family": family.value,
        "head": head.value,
        "attention": req.attention.value,
        "embedding": req.embedding.value,
        "seq_len": req.seq_len,
        "input": source,
        "provider": req.provider.value,
    }


def _parties(results: dict[Role, Any]) -> dict[str, Any]:
    return {
        r.value: {**res.link_counts(), "wall_s": res.wall_s}
        for r, res in results.items()
        if r is not Role.DEALER
    }


def _run_decoder(
    req: VerifyRequest, *, model_dir: Path, family: Any, head: Head, config: Any
) -> dict[str, Any]:
    check_decoder_request(req, head=head)
    ids, mask, source = sample_chat_inputs(
        model_dir,
        seq_len=req.seq_len,
        samples=req.samples,
        vocab_size=config.vocab_size,
        seed=req.seed,
    )
    results, wall = _launch(
        decoder_party,
        req,
        owner={"model_dir": str(model_dir), "head": head},
        data={"input_ids": ids, "mask": mask},
    )
    secure = results[Role.DATA_OWNER].value
    settings = decoder_settings(req)
    ref = decoder_reference(
        model_dir, head=head, seed=req.seed, ids=ids, mask=mask, settings=settings
    )
    reference = (
        "secfwt's plaintext decoder with the same causal Random Feature Attention (float64)"
        if req.attention is Attention.RFA
        else "transformers forward (float64, sdpa attention, position_ids cumsum(mask)-1)"
    )
    report = {
        **_header(req, model_dir=model_dir, family=family, head=head, source=source),
        "samples": req.samples,
        "reference": reference,
        **decoder_report(secure, ref, mask=mask, per_layer=req.per_layer),
        "tolerance": {
            "min_argmax_agreement": req.min_argmax_agreement,
            "max_mean_err_over_std": req.max_mean_err_over_std,
        },
        "wall_s": wall,
        "secure_compute_s": secure["compute_s"],
        "parties": _parties(results),
    }
    report["passed"] = (
        report["argmax_agreement_outside_near_ties"] >= req.min_argmax_agreement
        and report["logits_mean_abs_err_over_std"] < req.max_mean_err_over_std
    )
    return report


def _reference(
    model_dir: Path, *, req: VerifyRequest, head: Head, num_labels: int, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    hf = build_hf_model(model_dir, head=head, num_labels=num_labels, seed=req.seed).double()
    family = family_of(hf.config)
    spec = spec_from_model(hf, family=family, head=head)
    params = plain_params(state_dict_of(hf))
    # load_checkpoint on the model owner initialised any missing head under the same seed,
    # so these are the same weights the parties used.
    plain = EncoderModel(
        spec,
        params,
        PlainOps(),
        ForwardSettings(attention=req.attention, rfa=req.rfa, pooling=Pooling.CLS),
    )
    mask = torch.ones(ids.shape, dtype=torch.float64)
    word = params[spec.word_embeddings][ids]
    h_plain = plain.layers(plain.embed(word), mask)
    out_plain = plain.output(h_plain)
    with torch.no_grad():
        o = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    hf_hidden = o.hidden_states[-1]
    hf_out = hf_hidden if head is Head.BASE else o.logits
    impl_err = (
        (h_plain - hf_hidden).abs().max().item()
        if req.attention is Attention.SOFTMAX
        else float("nan")
    )
    if req.attention is Attention.SOFTMAX:
        return hf_hidden, hf_out, impl_err
    return h_plain, out_plain, impl_err


def check(report: dict[str, Any]) -> None:
    if report["passed"]:
        return
    tol = report["tolerance"]
    if "min_argmax_agreement" in tol:
        raise ToleranceExceededError(
            "secure decoder forward disagrees with its reference "
            f"({report['reference']}): argmax agreement outside near ties "
            f"{report['argmax_agreement_outside_near_ties']:.4f} (at least "
            f"{tol['min_argmax_agreement']}), mean abs "
            f"logit error {report['logits_mean_abs_err_over_std']:.4g} of the logits' std (below "
            f"{tol['max_mean_err_over_std']})"
        )
    raise ToleranceExceededError(
        "secure forward disagrees with the plaintext reference: max_abs_err "
        f"{report['max_abs_err']:.4g} "
        f"(tolerance {tol['max_abs']}), mean_abs_err "
        f"{report['mean_abs_err']:.4g} "
        f"(tolerance {tol['mean_abs']})"
    )
