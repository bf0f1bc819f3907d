"""Public description of a model: what both owners agree on before a job (never the weights)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Family(enum.Enum):
    """Architecture family: the Hugging Face ``model_type``."""

    BERT = "bert"
    ROBERTA = "roberta"
    LLAMA = "llama"  # also SmolLM2
    QWEN2 = "qwen2"  # Llama with q/k/v biases
    MISTRAL = "mistral"  # Llama with a sliding attention window

    @property
    def is_decoder(self) -> bool:
        return self in _DECODERS


_DECODERS = frozenset({Family.LLAMA, Family.QWEN2, Family.MISTRAL})


class Head(enum.Enum):
    """Which Hugging Face head sits on the encoder or decoder."""

    BASE = "base"  # BertModel / LlamaModel ...: last hidden states
    MASKED_LM = "masked_lm"  # *ForMaskedLM: vocabulary logits per position
    SEQUENCE_CLASSIFICATION = "sequence_classification"  # *ForSequenceClassification
    CAUSAL_LM = "causal_lm"  # *ForCausalLM: next-token logits per position (decoders)


class Pooling(enum.Enum):
    """How a sequence-classification head reads the encoder output."""

    CLS = "cls"  # exactly the Hugging Face head (first token; BERT's pooler dense+tanh)
    MEAN = "mean"  # masked mean over tokens (how sentence-transformers checkpoints are trained)


class Attention(enum.Enum):
    SOFTMAX = "softmax"
    RFA = "rfa"  # Random Feature Attention (Peng et al., ICLR 2021), as in SecFwT


class EmbeddingMode(enum.Enum):
    """How the data owner's token ids become secret-shared input embeddings."""

    #: Token ids and the embedding table both stay secret: one-hot(ids) x table in MPC.
    PRIVATE = "private"
    #: The model owner discloses the word-embedding table to the data owner, who embeds its
    #: tokens locally and secret-shares the embeddings (SecFwT's setting). Cheaper; the
    #: disclosure ``embedding_table -> data_owner`` must be in the job's terms.
    TABLE_TO_DATA_OWNER = "table_to_data_owner"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Architecture and parameter shapes of a checkpoint: public to both parties."""

    family: Family
    head: Head
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int  # 0 for decoders
    layer_norm_eps: float  # eps of the normalisation layers (LayerNorm, or RMSNorm for decoders)
    pad_token_id: int
    hidden_act: str
    num_labels: int
    #: parameter name (Hugging Face state-dict name) -> shape, in a fixed order
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    # -- decoders only (defaults describe an encoder) -----------------------------------------
    #: key/value heads of grouped-query attention (Ainslie et al., EMNLP 2023); 0: num_heads
    num_kv_heads: int = 0
    #: per-head width when the config sets it apart from hidden_size / num_heads; 0: the quotient
    attention_head_dim: int = 0
    #: base of the rotary frequencies theta_i = rope_theta^(-2i/dh) (Su et al., RoFormer, 2021)
    rope_theta: float = 0.0
    #: the LM head is the word-embedding table (no lm_head.weight of its own)
    tie_word_embeddings: bool = False
    #: per layer: the sliding attention window (keys i - w < j <= i), 0 for full causal attention
    layer_windows: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def prefix(self) -> str:
        """State-dict prefix of the backbone: "bert." / "roberta." / "model." under a head, ""
        for a base model."""
        if self.head is Head.BASE:
            return ""
        return "model." if self.family.is_decoder else f"{self.family.value}."

    @property
    def word_embeddings(self) -> str:
        """State-dict name of the word-embedding table (V, H)."""
        if self.family.is_decoder:
            return self.prefix + "embed_tokens.weight"
        return self.prefix + "embeddings.word_embeddings.weight"

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from padding_idx + 1 (Hugging Face
        ``create_position_ids_from_input_ids``); BERT from 0; decoders have no position table."""
        return self.pad_token_id + 1 if self.family is Family.ROBERTA else 0

    @property
    def max_tokens(self) -> int:
        """Longest input sequence the position table allows."""
        return self.max_positions - self.position_offset

    def shape_of(self, name: str) -> tuple[int, ...]:
        for n, s in self.param_shapes:
            if n == name:
                return s
        raise KeyError(name)

    def is_linear_weight(self, name: str) -> bool:
        """Whether ``name`` is a linear module's (out, in) weight, used only as ``x @ W^T``
        (:meth:`secfwt.models.encoder.EncoderModel.linear`); embedding tables are indexed, not."""
        return (
            name.endswith(".weight")
            and len(self.shape_of(name)) == 2
            and ".embeddings." not in f".{name}"
            and name != self.word_embeddings
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family.value
        d["head"] = self.head.value
        d["param_shapes"] = [[n, list(s)] for n, s in self.param_shapes]
        d["layer_windows"] = list(self.layer_windows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["family"] = Family(d["family"])
        d["head"] = Head(d["head"])
        d["param_shapes"] = tuple((n, tuple(s)) for n, s in d["param_shapes"])
        d["layer_windows"] = tuple(d.get("layer_windows", ()))
        return cls(**d)
