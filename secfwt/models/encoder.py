"""BERT/RoBERTa encoder and heads, written once over :class:`~secfwt.models.ops.Ops`.

Parameter names are the Hugging Face state-dict names, so jobs select trainable parameters by
those names. Layout follows ``transformers.models.bert.modeling_bert`` (post-LayerNorm blocks);
RoBERTa differs only in position numbering (``padding_idx + 1`` offset) and head names.

Shapes: N sequences, T tokens, H hidden, nh heads, dh = H / nh.
The Llama-family decoders are :mod:`secfwt.models.decoder`; what both share is
:mod:`secfwt.models.transformer`.
"""

from __future__ import annotations

from collections.abc import Mapping

from secfwt.models.attention import rfa_attention, softmax_attention
from secfwt.models.ops import Ops, Tensor
from secfwt.models.spec import Attention, Family, Head, ModelSpec, Pooling
from secfwt.models.transformer import (
    LORA_A,
    LORA_B,
    SOFT_PROMPT,
    ForwardSettings,
    TransformerModel,
    plain_params,
)

# Re-exported: callers import the forward settings and parameter names from here.
__all__ = ["LORA_A", "LORA_B", "SOFT_PROMPT", "EncoderModel", "ForwardSettings", "plain_params"]


class EncoderModel(TransformerModel):
    """One forward computation over a parameter mapping (plain tensors or MPC shares)."""

    def __init__(
        self, spec: ModelSpec, params: Mapping[str, Tensor], ops: Ops, settings: ForwardSettings
    ) -> None:
        super().__init__(spec, params, ops, settings)

    # -- building blocks -------------------------------------------------------------------
    def layer_norm(self, x: Tensor, module: str) -> Tensor:
        return self.ops.layer_norm(
            x,
            weight=self.p[f"{module}.weight"],
            bias=self.p[f"{module}.bias"],
            eps=self.spec.layer_norm_eps,
        )

    # -- encoder ---------------------------------------------------------------------------
    def embed(self, word_emb: Tensor) -> Tensor:
        """Input embeddings (N, T, H) from word embeddings; positions are public (0..T-1)."""
        pre = self.spec.prefix + "embeddings."
        t = word_emb.shape[1]
        off = self.spec.position_offset
        pos = self.p[pre + "position_embeddings.weight"][off : off + t]  # (T, H)
        typ = self.p[pre + "token_type_embeddings.weight"][0]  # (H,): single-segment inputs
        return self.layer_norm(word_emb + pos + typ, pre + "LayerNorm")

    def insert_prompt(
        self, h: Tensor, key_mask: Tensor, prompt: Tensor, ones: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Insert a soft prompt (P, H) or (N, P, H) after the first token ([CLS] / <s>); extend
        the mask with ``ones`` (N, P)."""
        return self.splice_prompt(h, key_mask, prompt, ones, at=1)

    def attention(
        self, h: Tensor, key_mask: Tensor, layer: int, *, query_rows: int | None = None
    ) -> Tensor:
        """The layer's first half, (N, T, H) -> (N, T, H); with ``query_rows`` only the first
        that many positions are computed, (N, query_rows, H), their keys and values still
        from every position (what a position reads does not depend on the others' outputs)."""
        spec = self.spec
        pre = f"{spec.prefix}encoder.layer.{layer}.attention."
        n = h.shape[0]
        nh, dh = spec.num_heads, spec.head_dim
        rows = h if query_rows is None else h[:, :query_rows]  # (N, Tq, H)

        def heads(x: Tensor) -> Tensor:  # (N, T', H) -> (N, nh, T', dh)
            return x.reshape(n, x.shape[1], nh, dh).transpose(1, 2)

        q = heads(self.linear(rows, pre + "self.query"))
        k = heads(self.linear(h, pre + "self.key"))
        v = heads(self.linear(h, pre + "self.value"))
        if self.settings.attention is Attention.RFA:
            ctx = rfa_attention(
                self.ops, q, k, v, key_mask, w=self.rfa_w[layer], settings=self.settings.rfa
            )
        else:
            ctx = softmax_attention(self.ops, q, k, v, key_mask)
        ctx = ctx.transpose(1, 2).reshape(n, rows.shape[1], nh * dh)  # (N, Tq, H)
        return self.layer_norm(
            self.linear(ctx, pre + "output.dense") + rows, pre + "output.LayerNorm"
        )

    def feed_forward(self, h: Tensor, layer: int) -> Tensor:
        """The layer's second half, from its attention half's output h (N, T, H)."""
        pre = f"{self.spec.prefix}encoder.layer.{layer}."
        inter = self.ops.act(
            self.spec.hidden_act, self.linear(h, pre + "intermediate.dense")
        )  # (N, T, I)
        return self.layer_norm(
            self.linear(inter, pre + "output.dense") + h, pre + "output.LayerNorm"
        )

    def block(
        self, h: Tensor, key_mask: Tensor, layer: int, *, query_rows: int | None = None
    ) -> Tensor:
        return self.feed_forward(self.attention(h, key_mask, layer, query_rows=query_rows), layer)

    def layers(
        self, h: Tensor, key_mask: Tensor, *, start: int = 0, stop: int | None = None
    ) -> Tensor:
        for i in range(start, self.spec.num_layers if stop is None else stop):
            h = self.block(h, key_mask, i)
        return h

    @property
    def head_reads_first_row(self) -> bool:
        """Whether the head reads the last hidden states at the first position only: a sequence
        classifier with CLS pooling (BERT's pooler and RoBERTa's classifier take token 0)."""
        cls = self.settings.pooling is Pooling.CLS
        return cls and self.spec.head is Head.SEQUENCE_CLASSIFICATION

    def query_rows(self, layer: int) -> int | None:
        """The positions layer ``layer`` computes for the head: 1 (the first) for the last layer
        when the head reads only that (:attr:`head_reads_first_row`), else all (None)."""
        last = layer == self.spec.num_layers - 1
        return 1 if last and self.head_reads_first_row else None

    def top_layers(self, h: Tensor, key_mask: Tensor, *, start: int = 0) -> Tensor:
        """Layers ``start`` to the last, for the head: (N, T, H) -> (N, T, H), or (N, 1, H) when
        the head reads only the first position (:attr:`head_reads_first_row`). The last layer
        then computes that position alone: its query, attention output and feed-forward, the
        keys and values still from every position. Exact, since no other position's output
        reaches the head, and it saves almost all of the last layer (in MPC every GELU,
        LayerNorm and softmax row but one per sequence): with only the top layer trained,
        almost all of a tuning step."""
        for i in range(start, self.spec.num_layers):
            h = self.block(h, key_mask, i, query_rows=self.query_rows(i))
        return h

    def top_from_attention(self, a: Tensor, key_mask: Tensor, layer: int) -> Tensor:
        """:meth:`top_layers` from layer ``layer``'s attention output ``a`` (N, T, H), or its
        first position only (N, 1, H) when ``layer`` is the last and the head reads only that."""
        rows = self.query_rows(layer)
        a = a if rows is None else a[:, :rows]
        return self.top_layers(self.feed_forward(a, layer), key_mask, start=layer + 1)

    # -- heads -----------------------------------------------------------------------------
    def pool(self, h: Tensor, pool_weights: Tensor | None) -> Tensor:
        """(N, T, H) -> (N, H). Mean pooling takes per-token weights mask/len from the data
        owner."""
        if self.settings.pooling is Pooling.MEAN:
            if pool_weights is None:
                raise ValueError("mean pooling needs pool_weights (N, T)")
            return (h * pool_weights.unsqueeze(-1)).sum(1)
        return h[:, 0]

    def classify(self, pooled: Tensor) -> Tensor:
        """Sequence-classification logits (N, C) from pooled features (N, H)."""
        return self.linear(self.classifier_input(pooled), self.output_module)

    @property
    def output_module(self) -> str:
        """The classifier's last linear layer: the logits are linear in its weight and bias."""
        return "classifier.out_proj" if self.spec.family is Family.ROBERTA else "classifier"

    def classifier_input(self, pooled: Tensor) -> Tensor:
        """What :attr:`output_module` reads (N, H) from pooled features (N, H)."""
        spec = self.spec
        if spec.family is Family.ROBERTA:
            return self.ops.tanh(self.linear(pooled, "classifier.dense"))
        if self.settings.pooling is Pooling.CLS:
            return self.ops.tanh(self.linear(pooled, spec.prefix + "pooler.dense"))
        return pooled

    def mlm_logits(self, h: Tensor) -> Tensor:
        """Masked-LM logits (N, T, V); the decoder is tied to the word embeddings."""
        spec = self.spec
        table = self.p[spec.word_embeddings]  # (V, H)
        if spec.family is Family.ROBERTA:
            x = self.ops.act(spec.hidden_act, self.linear(h, "lm_head.dense"))
            x = self.layer_norm(x, "lm_head.layer_norm")
            return x.matmul(table.t()) + self.p["lm_head.bias"]
        x = self.ops.act(spec.hidden_act, self.linear(h, "cls.predictions.transform.dense"))
        x = self.layer_norm(x, "cls.predictions.transform.LayerNorm")
        return x.matmul(table.t()) + self.p["cls.predictions.bias"]

    def output(self, h: Tensor, pool_weights: Tensor | None = None) -> Tensor:
        """The head's output for last hidden states h."""
        if self.spec.head is Head.BASE:
            return h
        if self.spec.head is Head.MASKED_LM:
            return self.mlm_logits(h)
        return self.classify(self.pool(h, pool_weights))

    def forward(
        self, word_emb: Tensor, key_mask: Tensor, pool_weights: Tensor | None = None
    ) -> Tensor:
        h = self.top_layers(self.embed(word_emb), key_mask)
        return self.output(h, pool_weights)
