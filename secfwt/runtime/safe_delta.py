"""Safe Delta inside a gated causal-LM job (``[safety_gate] safe_delta = true``): the tuned LoRA
deltas are corrected on secret shares before the gate scores them and before anything leaves
the parties (Lu et al., ICML 2025, arXiv:2505.12038; the maths: :mod:`secfwt.tuning.safe_delta`,
on shares: :mod:`secfwt.tuning.safe_delta_shares`).

* **Model owner, plaintext, before tuning**: its own aligned checkpoint (``from_pretrained``)
  runs the calibration conversations (:mod:`secfwt.data.calibration`: harmful requests with
  fixed refusals in the chat template, disjoint from the gate's prompts); hooks on each adapted
  Linear sum ``H = (2/N) sum_t x_t x_t^T`` over every token of the ``N`` samples
  (:func:`~secfwt.tuning.safe_delta.input_hessian`, the definition ``secfwt safety safe-delta``
  uses), then ``U = inverse_cholesky(H)`` (damped). The data owner computes nothing here.
* **Both computing parties, after tuning**: per LoRA module ``delta = scale B A`` (a product of
  two secrets), then :func:`~secfwt.tuning.safe_delta_shares.safe_delta_shares` with the model
  owner's ``U``; the result replaces the module's LoRA factors as a full weight delta
  ``"<module>.weight_delta"`` (:data:`~secfwt.models.transformer.WEIGHT_DELTA`). Tuned norm
  weights (and biases) pass through unchanged, as in the plaintext command. Nothing is revealed:
  the kept set, the costs and how much was kept stay secret.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from secfwt.config import JobConfig
from secfwt.data.calibration import CALIBRATION_TOKENS, calibration_pairs, calibration_texts
from secfwt.data.refusal_margin import load_prompts, require_outside
from secfwt.data.tokenize import load_tokenizer
from secfwt.errors import DataError, ModelError
from secfwt.models.transformer import LORA_A, LORA_B, WEIGHT_DELTA
from secfwt.roles import Role
from secfwt.tuning.safe_delta import input_hessian, inverse_cholesky
from secfwt.tuning.safe_delta_shares import safe_delta_shares

log = logging.getLogger(__name__)


def lora_modules(names: Any) -> list[str]:
    """The modules with LoRA factors among trainable ``names``, sorted."""
    return sorted({n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] == LORA_A})


def job_calibration(cfg: JobConfig) -> list[tuple[str, str]]:
    """The job's calibration pairs, refused if a request is also one of the gate's prompts
    (the score would then measure the data the correction was computed on)."""
    g = cfg.safety_gate
    pairs = calibration_pairs(g.safe_delta_calibration, field="safety_gate.safe_delta_calibration")
    require_outside(
        load_prompts(g.prompts, g.count),
        [p for p, _ in pairs],
        what="the Safe Delta calibration requests (safety_gate.safe_delta_calibration)",
    )
    return pairs


def hessian_hooks(
    modules: Mapping[str, torch.nn.Module], *, samples: int
) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Forward hooks summing each Linear's input Hessian (in, in) float64 over ``samples``
    samples; modules fed the same tensor (q, k, v) share one product. Remove the handles."""
    hessians = {
        n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
        for n, m in modules.items()
    }
    last: list[Any] = [None, None]  # the input tensor last seen and its Hessian contribution

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: Any, args: Any, _output: Any) -> None:
            if args[0] is not last[0]:
                last[0], last[1] = args[0], input_hessian(args[0], samples)
            hessians[name] += last[1]

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    return hessians, handles


def calibration_factors(cfg: JobConfig, model_dir: Path, modules: list[str]) -> dict[str, Any]:
    """The model owner's ``U`` (in, in) float64 per module (module doc), from its checkpoint."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    if tok is None:
        raise DataError(
            f"model.path: {model_dir} has no tokenizer files; Safe Delta's calibration "
            "conversations need the chat model's tokenizer and chat template"
        )
    texts = calibration_texts(tok, job_calibration(cfg))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
    )
    model.eval()
    named = dict(model.named_modules())
    missing = [m for m in modules if not isinstance(named.get(m), torch.nn.Linear)]
    if missing:
        raise ModelError(f"zo.lora_modules: {missing[0]!r} is not a Linear of {model_dir}")
    hessians, handles = hessian_hooks({m: named[m] for m in modules}, samples=len(texts))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                model(input_ids=ids[:, :CALIBRATION_TOKENS], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {m: inverse_cholesky(h) for m, h in hessians.items()}


def corrected_theta(
    theta: Mapping[str, Any],
    *,
    factors: Mapping[str, torch.Tensor] | None,
    scale: float,
    budget: float,
    progress: Callable[..., None],
) -> dict[str, Any]:
    """Both parties: ``theta`` with every LoRA pair replaced by its Safe Delta weight delta
    (shares, (out, in)); other tensors unchanged. ``factors``: the model owner's ``U`` per
    module (None on the data owner)."""
    out = {n: v for n, v in theta.items() if n.rsplit(".", 1)[-1] not in (LORA_A, LORA_B)}
    for m in lora_modules(theta):
        t0 = time.perf_counter()
        delta = theta[f"{m}.{LORA_B}"].matmul(theta[f"{m}.{LORA_A}"]) * scale  # (out, in)
        u = None if factors is None else factors[m]
        res = safe_delta_shares(delta, u, owner=Role.MODEL_OWNER.rank, s=budget)
        out[f"{m}.{WEIGHT_DELTA}"] = res.delta
        rows, cols = delta.size()
        seconds = time.perf_counter() - t0
        log.info("Safe Delta: %s (%d x %d) in %.1f s", m, rows, cols, seconds)
        progress(kind="phase", phase=f"Safe Delta: {m} ({rows} x {cols}) {seconds:.1f} s")
    return out
