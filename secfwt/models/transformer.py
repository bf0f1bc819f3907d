"""What the encoder and the decoder share: forward settings, linear layers with LoRA, soft prompts.

Both models are one forward computation over a parameter mapping (Hugging Face state-dict names
-> plain tensors or MPC shares) on an :class:`~secfwt.models.ops.Ops` backend; jobs select
trainable parameters by those names, so LoRA factors and the soft prompt are named here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from secfwt.models.attention import RFASettings, rfa_projection
from secfwt.models.ops import Ops, Tensor
from secfwt.models.spec import Attention, ModelSpec, Pooling

#: LoRA parameters live next to the module they adapt: "<module>.lora_A" (r, in),
#: "<module>.lora_B" (out, r).
LORA_A, LORA_B = "lora_A", "lora_B"
#: A full-rank secret weight delta "<module>.weight_delta" (out, in) added to the module's
#: weight: Safe Delta's corrected ``scale B A`` (:mod:`secfwt.runtime.safe_delta`).
WEIGHT_DELTA = "weight_delta"
#: Name of the soft prompt (P, H) inserted into the input embeddings.
SOFT_PROMPT = "soft_prompt"


@dataclasses.dataclass(frozen=True)
class ForwardSettings:
    attention: Attention = Attention.SOFTMAX
    rfa: RFASettings = dataclasses.field(default_factory=RFASettings)
    pooling: Pooling = Pooling.CLS
    lora_scale: float = 1.0


class TransformerModel:
    """Parameters, backend and settings of one forward, and the layers both families use."""

    def __init__(
        self, spec: ModelSpec, params: Mapping[str, Tensor], ops: Ops, settings: ForwardSettings
    ) -> None:
        self.spec = spec
        self.p = params
        self.ops = ops
        self.settings = settings
        #: public random-feature projections per layer, (D/2, dh), drawn from the job's seed
        self.rfa_w = {
            i: rfa_projection(layer=i, head_dim=spec.head_dim, settings=settings.rfa)
            for i in range(spec.num_layers)
        }

    def linear(self, x: Tensor, module: str) -> Tensor:
        """x @ W^T + b for the Hugging Face module ``module``, plus its LoRA update if present
        (Hu et al., ICLR 2022: ``+ scale * x A^T B^T``) and its full weight delta if present
        (``+ x D^T``)."""
        w = self.p[f"{module}.weight"]  # (out, in), or (k, out, in) for k stacked variants
        y = self.ops.weight_matmul(x, w.transpose(-1, -2))
        b = self.p.get(f"{module}.bias")
        if b is not None:
            y = y + (
                b.unsqueeze(-2) if b.dim() > 1 else b
            )  # stacked biases (k, out) -> (k, 1, out)
        a_name, b_name = f"{module}.{LORA_A}", f"{module}.{LORA_B}"
        if a_name in self.p:
            y = (
                y
                + x.matmul(self.p[a_name].t()).matmul(self.p[b_name].t()) * self.settings.lora_scale
            )
        delta = self.p.get(f"{module}.{WEIGHT_DELTA}")  # (out, in)
        if delta is not None:  # x (W + D)^T = x W^T + x D^T
            y = y + x.matmul(delta.t())
        return y

    def splice_prompt(
        self, h: Tensor, key_mask: Tensor, prompt: Tensor, ones: Tensor, *, at: int
    ) -> tuple[Tensor, Tensor]:
        """Insert a soft prompt (P, H) or (N, P, H) before position ``at`` of h (N, T, H); extend
        the key mask (N, T) with ``ones`` (N, P)."""
        n = h.shape[0]
        if prompt.dim() == 2:
            prompt = (
                prompt.unsqueeze(0).expand(n, *prompt.shape)
                if not self.ops.secure
                else _expand_secure(prompt, n)
            )
        h = self.ops.cat(_around(h, prompt, at), dim=1)
        parts = _around(key_mask, ones, at)
        public = all(torch.is_tensor(m) for m in parts)  # a public mask stays public
        key_mask = torch.cat(parts, dim=1) if public else self.ops.cat(parts, dim=1)
        return h, key_mask


def _around(x: Tensor, middle: Tensor, at: int) -> list[Tensor]:
    """[x before ``at``, middle, x from ``at``] along dim 1, without empty pieces."""
    return [x[:, :at], middle, x[:, at:]] if at > 0 else [middle, x]


def _expand_secure(prompt: Tensor, n: int) -> Tensor:
    from secfwt.crypten_compat import crypten

    return crypten.stack([prompt] * n, dim=0)


def plain_params(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 copies for the plaintext reference."""
    return {k: v.detach().to(torch.float64) for k, v in state.items()}
