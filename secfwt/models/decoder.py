"""Llama-family causal decoders (Llama and SmolLM2, Qwen2, Mistral), written once over
:class:`~secfwt.models.ops.Ops`.

Layout follows ``transformers.models.llama.modeling_llama`` (pre-norm blocks, Touvron et al.,
"LLaMA", 2023), with Hugging Face state-dict names under ``model.``::

    a = rms_norm(h);  h = h + o_proj(attention(rope(q_proj a), rope(k_proj a), v_proj a))
    m = rms_norm(h);  h = h + down_proj(silu(gate_proj m) * up_proj m)   (SwiGLU, Shazeer 2020)
    logits = lm_head(rms_norm(h))      lm_head tied to embed_tokens or its own weight

Qwen2 differs by q/k/v biases (:meth:`TransformerModel.linear` adds any bias present), Mistral
by a sliding attention window (a band in the public mask). Attention is causal and grouped-query
(nkv key/value heads, each serving nh / nkv query heads: Ainslie et al., EMNLP 2023).

Shapes: N sequences, T tokens, H hidden, nh query heads, nkv key/value heads, dh head width.

Positions and padding. Rotary embeddings (Su et al., "RoFormer", 2021) rotate q and k by angles
``position * theta_i``; the positions are public. With a public key mask they are
``cumsum(mask) - 1``, as transformers computes them for generation, so left and right padding both
reproduce transformers. With a secret key mask (lengths secret) they are ``0 .. T-1``: RoPE
scores depend only on the difference of positions (RoFormer, Sec. 3.4.2), and the real tokens of
a left- or right-padded row are contiguous, so every unmasked score is the same (up to the float32
rounding of transformers' rotary tables). Padded keys are masked; a padded query attends to itself
only, so no softmax row is empty and its (unused) output stays finite on both backends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from secfwt.errors import ModelError
from secfwt.models.attention import causal_rfa_attention
from secfwt.models.ops import Ops, Tensor
from secfwt.models.spec import Attention, Head, ModelSpec
from secfwt.models.transformer import ForwardSettings, TransformerModel

#: Row mean squares the secure RMSNorm is accurate on. Measured on the packaged SmolLM2 (6 chat
#: prompts, docs/numerics.md): 7e-3 (embeddings into layer 0) to 1.09e6 (the residual stream of
#: the first token from layer 12 on, one channel near 2.5e4: a "massive activation", Sun et al.,
#: 2024). 2^-14 .. 2^24 leaves factors of 100 below and 15 above.
RMS_MEAN_SQUARE_RANGE = (2.0**-14, 2.0**24)


def rotary_tables(
    positions: torch.Tensor, *, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, 1, T, dh), float64, for public positions (N, T).

    Built exactly as ``LlamaRotaryEmbedding`` builds them (inverse frequencies and angles in
    float32, then cast), so both backends use transformers' own table bit for bit.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (N, T, dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, T, dh)
    return emb.cos().double().unsqueeze(1), emb.sin().double().unsqueeze(1)


def attention_pattern(t: int, *, window: int) -> torch.Tensor:
    """Public (T, T) 0/1 pattern of causal attention: key j is visible to query i when
    ``j <= i`` and, for a sliding window w > 0, ``j > i - w`` (transformers' sliding mask)."""
    i = torch.arange(t).unsqueeze(1)
    j = torch.arange(t).unsqueeze(0)
    keep = j <= i
    if window > 0:
        keep &= j > i - window
    return keep.to(torch.long)


def positions_of(key_mask: Tensor, n: int, t: int) -> torch.Tensor:
    """Public positions (N, T): cumsum(mask) - 1 for a public mask, 0..T-1 for a secret one."""
    if torch.is_tensor(key_mask):
        return (key_mask.to(torch.long).cumsum(-1) - 1).clamp(min=0)
    return torch.arange(t).expand(n, t)


class DecoderModel(TransformerModel):
    """One causal-LM forward over a parameter mapping (plain tensors or MPC shares)."""

    def __init__(
        self, spec: ModelSpec, params: Mapping[str, Tensor], ops: Ops, settings: ForwardSettings
    ) -> None:
        if not spec.family.is_decoder:
            raise ModelError(f"DecoderModel needs a decoder family, got {spec.family.value!r}")
        super().__init__(spec, params, ops, settings)

    # -- building blocks -------------------------------------------------------------------
    def rms_norm(self, x: Tensor, module: str) -> Tensor:
        return self.ops.rms_norm(
            x,
            weight=self.p[f"{module}.weight"],
            eps=self.spec.layer_norm_eps,
            mean_square_range=RMS_MEAN_SQUARE_RANGE,
        )

    def rotate(self, x: Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tensor:
        """RoPE on (N, heads, T, dh): ``x cos + rotate_half(x) sin`` (transformers' layout: the
        two halves of each head are the pairs rotated together). Public tables: local in MPC."""
        half = x.shape[-1] // 2
        rot = self.ops.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def mask(self, key_mask: Tensor, *, t: int, window: int) -> Tensor:
        """(N, 1, T, T) 0/1 attention mask: the public causal (and window) pattern on real keys,
        and each query's own key (so a padded query's row is never empty)."""
        n = key_mask.shape[0]
        eye = torch.eye(t, dtype=torch.long)
        off_diagonal = attention_pattern(t, window=window) - eye
        keys = key_mask.reshape(n, 1, 1, t)
        return self.ops.keep_keys(off_diagonal, keys) + eye.to(torch.float64)

    def attention(
        self, h: Tensor, mask: Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int
    ) -> Tensor:
        spec = self.spec
        pre = f"{spec.prefix}layers.{layer}.self_attn."
        n, t, _ = h.shape
        nh, nkv, dh = spec.num_heads, spec.kv_heads, spec.head_dim

        def heads(x: Tensor, k: int) -> Tensor:  # (N, T, k dh) -> (N, k, T, dh)
            return x.reshape(n, t, k, dh).transpose(1, 2)

        q = self.rotate(heads(self.linear(h, pre + "q_proj"), nh), cos, sin)
        k = self.rotate(heads(self.linear(h, pre + "k_proj"), nkv), cos, sin)
        v = heads(self.linear(h, pre + "v_proj"), nkv)
        if self.settings.attention is Attention.RFA:  # mask: the key mask (N, T)
            k, v = self.repeat_kv(k, nh // nkv), self.repeat_kv(v, nh // nkv)  # (N, nh, T, dh)
            w = self.rfa_w[layer]
            ctx = causal_rfa_attention(self.ops, q, k, v, mask, w=w, settings=self.settings.rfa)
        else:
            ctx = grouped_softmax_attention(self.ops, q, k, v, mask)  # (N, nh, T, dh)
        return self.linear(ctx.transpose(1, 2).reshape(n, t, nh * dh), pre + "o_proj")

    def repeat_kv(self, x: Tensor, rep: int) -> Tensor:
        """(N, nkv, T, dh) -> (N, nkv rep, T, dh): head h reads key/value head h // rep, as
        transformers' ``repeat_kv``. Random features are per query-key pair, so unlike softmax
        attention the grouped heads cannot share one product."""
        if rep == 1:
            return x
        n, nkv, t, dh = x.shape
        return self.ops.stack([x] * rep, dim=2).reshape(n, nkv * rep, t, dh)

    def mlp(self, x: Tensor, layer: int) -> Tensor:
        pre = f"{self.spec.prefix}layers.{layer}.mlp."
        gate = self.ops.act(self.spec.hidden_act, self.linear(x, pre + "gate_proj"))  # (N, T, I)
        return self.linear(gate * self.linear(x, pre + "up_proj"), pre + "down_proj")

    def block(
        self, h: Tensor, mask: Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int
    ) -> Tensor:
        pre = f"{self.spec.prefix}layers.{layer}."
        h = h + self.attention(self.rms_norm(h, pre + "input_layernorm"), mask, cos, sin, layer)
        return h + self.mlp(self.rms_norm(h, pre + "post_attention_layernorm"), layer)

    # -- decoder ---------------------------------------------------------------------------
    def embed(self, word_emb: Tensor) -> Tensor:
        """Input embeddings are the word embeddings (positions enter as rotations)."""
        return word_emb

    def insert_prompt(
        self, h: Tensor, key_mask: Tensor, prompt: Tensor, ones: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Prepend a soft prompt (P, H) or (N, P, H) to the input embeddings (as PEFT's prompt
        tuning does for causal LMs); extend the key mask with ``ones`` (N, P)."""
        return self.splice_prompt(h, key_mask, prompt, ones, at=0)

    def layers(
        self,
        h: Tensor,
        key_mask: Tensor,
        *,
        start: int = 0,
        stop: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> Tensor:
        """Residual stream (N, T, H) after layers ``start .. stop - 1`` (no final norm).

        ``key_mask`` (N, T): 1 = real token, public (torch) or secret; ``positions`` (N, T)
        overrides the positions derived from it (:func:`positions_of`).
        """
        spec = self.spec
        n, t = h.shape[0], h.shape[1]
        pos = positions_of(key_mask, n, t) if positions is None else positions
        cos, sin = rotary_tables(pos, head_dim=spec.head_dim, theta=spec.rope_theta)
        masks: dict[int, Tensor] = {}
        for i in range(start, spec.num_layers if stop is None else stop):
            window = spec.layer_windows[i] if spec.layer_windows else 0
            window = 0 if window >= t else window  # a window covering the sequence is no band
            if self.settings.attention is Attention.RFA:
                if window:
                    raise ModelError(
                        f"model.attention = 'rfa': layer {i} has a sliding window of {window} "
                        f"tokens, shorter than the {t}-token input; causal RFA has no window: "
                        "use attention = 'softmax' or inputs no longer than the window"
                    )
                masks[window] = key_mask  # causal RFA masks padded keys itself
            elif window not in masks:
                masks[window] = self.mask(key_mask, t=t, window=window)
            h = self.block(h, masks[window], cos, sin, i)
        return h

    # -- head ------------------------------------------------------------------------------
    def final_norm(self, h: Tensor) -> Tensor:
        return self.rms_norm(h, self.spec.prefix + "norm")

    def lm_logits(self, x: Tensor, *, headroom_bits: int = 0) -> Tensor:
        """Next-token logits (.., V) of final-normed hidden states (.., H): ``lm_head``, or the
        word-embedding table when tied (a ``lm_head.weight`` entry, e.g. an owned copy of the
        tied table, takes precedence). ``headroom_bits``: see :meth:`Ops.weight_matmul` (the
        head itself only: no LoRA or bias on it)."""
        if "lm_head.weight" in self.p:
            if not headroom_bits:
                return self.linear(x, "lm_head")
            table = self.p["lm_head.weight"]
        else:
            table = self.p[self.spec.word_embeddings]  # (V, H)
        return self.ops.weight_matmul(x, table.transpose(-1, -2), headroom_bits=headroom_bits)

    def output(self, h: Tensor, pool_weights: Tensor | None = None) -> Tensor:
        """Logits (N, T, V) for CAUSAL_LM, final-normed hidden states (N, T, H) for BASE."""
        x = self.final_norm(h)
        return self.lm_logits(x) if self.spec.head is Head.CAUSAL_LM else x

    def forward(
        self, word_emb: Tensor, key_mask: Tensor, positions: torch.Tensor | None = None
    ) -> Tensor:
        return self.output(self.layers(self.embed(word_emb), key_mask, positions=positions))


def grouped_softmax_attention(ops: Ops, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Masked softmax attention with grouped key/value heads.

    q (N, nh, T, dh), k and v (N, nkv, T, dh), mask (N, 1, T, T) with 1 = keep -> (N, nh, T, dh).
    Query head h uses key/value head h // (nh / nkv), as transformers' ``repeat_kv``; the rep
    query heads of a group are stacked along the query axis instead of repeating k and v, so
    each key/value head enters one product.
    """
    n, nh, t, dh = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    qg = (q * (1.0 / math.sqrt(dh))).reshape(n, nkv, rep * t, dh)
    scores = qg.matmul(k.transpose(-1, -2))  # (N, nkv, rep T, T)
    probs = ops.softmax(scores, mask=mask.repeat(1, 1, rep, 1) if rep > 1 else mask)
    return probs.matmul(v).reshape(n, nh, t, dh)
