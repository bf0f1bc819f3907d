"""Public description of a model: what both owners agree on before a job (never the weights)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Family(enum.Enum):
    BERT = "bert"
    ROBERTA = "roberta"


class Head(enum.Enum):
    """Which Hugging Face head sits on the encoder."""

    BASE = "base"  # BertModel / RobertaModel: last hidden states
    MASKED_LM = "masked_lm"  # *ForMaskedLM: vocabulary logits per position
    SEQUENCE_CLASSIFICATION = "sequence_classification"  # *ForSequenceClassification


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
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str
    num_labels: int
    #: parameter name (Hugging Face state-dict name) -> shape, in a fixed order
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def prefix(self) -> str:
        """State-dict prefix of the encoder ("bert." / "roberta." under a head, "" for base)."""
        return "" if self.head is Head.BASE else f"{self.family.value}."

    @property
    def word_embeddings(self) -> str:
        """State-dict name of the word-embedding table (V, H)."""
        return self.prefix + "embeddings.word_embeddings.weight"

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from padding_idx + 1 (Hugging Face
        ``create_position_ids_from_input_ids``); BERT from 0."""
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
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family.value
        d["head"] = self.head.value
        d["param_shapes"] = [[n, list(s)] for n, s in self.param_shapes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["family"] = Family(d["family"])
        d["head"] = Head(d["head"])
        d["param_shapes"] = tuple((n, tuple(s)) for n, s in d["param_shapes"])
        return cls(**d)
