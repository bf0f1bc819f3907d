"""The plaintext twin of a secfwt job's classifier, as a torch module Opacus can train.

The MPC job computes :class:`secfwt.models.encoder.EncoderModel`: encoder, then the job's
pooling (``mean``: masked mean of the last hidden states; ``cls``: first token), then the
head (BERT: ``classifier`` linear, after the pooler's dense+tanh for ``cls`` pooling only;
RoBERTa: ``classifier.dense`` -> tanh -> ``classifier.out_proj``). This module is the same
function built from the Hugging Face encoder loaded with ``from_pretrained``, so Opacus's
per-layer grad samplers (Linear, Embedding, LayerNorm) compute per-example gradients of it.

Parameter names are the job's Hugging Face names ("bert.encoder.layer.0....", "classifier.weight"):
the encoder is registered under ``spec.prefix`` and the head under ``classifier``, so
``zo.trainable`` patterns select the same tensors as in the MPC job.

Differences from ``*ForSequenceClassification.forward`` that make it equal the MPC job:

- dropout probabilities are 0 (the MPC forward has no dropout; training and evaluation
  are then the same function);
- ``position_ids`` are passed per example (B, L), numbered like the MPC job
  (``spec.position_offset + 0..L-1``); Opacus needs the batch dimension (a (1, L) buffer gives
  one per-sample gradient for the whole batch), and RoBERTa's padding-aware
  numbering only differs at padded positions, which nothing reads;
- ``token_type_ids`` are zeros (B, L): single-segment inputs, as in the MPC job.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from secfwt.errors import ConfigError
from secfwt.models.checkpoint import family_of, load_config
from secfwt.models.spec import Family, Head, ModelSpec, Pooling
from secfwt.tuning.forward import mean_pool_weights


class _PoolerSlot(nn.Module):
    """Holds BERT's pooler parameters under their names (``bert.pooler.dense.*``) but computes
    nothing inside the encoder's forward: :meth:`DPClassifier.head` applies dense+tanh itself,
    once, and only for ``cls`` pooling (a second, unused call would leave Opacus an activation
    without a backward)."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor) -> None:
        return None


class DPClassifier(nn.Module):
    """Encoder + the job's pooling + head;
    ``forward(input_ids, attention_mask) -> logits (B, C)``."""

    def __init__(
        self, *, encoder: nn.Module, head: nn.Module, spec: ModelSpec, pooling: Pooling
    ) -> None:
        super().__init__()
        self.spec = spec
        self.pooling = pooling
        self.encoder_name = spec.family.value  # "bert" / "roberta": the job's state-dict prefix
        self.add_module(self.encoder_name, encoder)
        self.classifier = head

    @property
    def encoder(self) -> nn.Module:
        return self.get_submodule(self.encoder_name)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output (B, H), before any head parameter (``EncoderModel.pool``)."""
        b, t = input_ids.shape
        positions = (
            (self.spec.position_offset + torch.arange(t, device=input_ids.device))
            .unsqueeze(0)
            .repeat(b, 1)
        )  # (B, L)
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            token_type_ids=torch.zeros_like(input_ids),
        )
        h = out.last_hidden_state  # (B, L, H)
        if self.pooling is Pooling.MEAN:
            weights = mean_pool_weights(attention_mask).to(h.dtype)  # (B, L)
            return (h * weights.unsqueeze(-1)).sum(1)
        return h[:, 0]

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from pooled features (B, H), as ``EncoderModel.classify``."""
        if self.spec.family is Family.ROBERTA:
            dense, out_proj = (
                self.get_submodule("classifier.dense"),
                self.get_submodule("classifier.out_proj"),
            )
            return out_proj(torch.tanh(dense(pooled)))
        if self.pooling is Pooling.CLS:
            pooled = torch.tanh(self.get_submodule(f"{self.encoder_name}.pooler.dense")(pooled))
        return self.classifier(pooled)

    def head_only(self) -> bool:
        """True when nothing below the pooled features trains, so features can be computed once."""
        below = [
            n
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith(("classifier.", self.spec.prefix + "pooler."))
        ]
        return not below

    def unused_parameters(self) -> tuple[str, ...]:
        """Names of parameters that do not affect the logits (BERT's pooler under mean pooling).

        Opacus cannot compute per-sample gradients for them (no backward reaches them), and a
        DP-SGD step would only add noise to them, so they stay frozen at their initial values.
        """
        if self.spec.family is Family.BERT and self.pooling is Pooling.MEAN:
            return tuple(
                n for n, _ in self.named_parameters() if n.startswith(self.spec.prefix + "pooler.")
            )
        return ()


def load_classifier(
    model_dir: Path, *, spec: ModelSpec, values: dict[str, torch.Tensor], pooling: Pooling
) -> DPClassifier:
    """``from_pretrained`` the checkpoint with dropout off, then load the job's values.

    ``values`` are the MPC job's starting parameters (checkpoint state plus its initial
    trainable values), so the baseline and the job start from the same function.
    """
    import transformers as tf

    if spec.head is not Head.SEQUENCE_CLASSIFICATION:
        raise ConfigError(
            f"model.head = {spec.head.value!r}: dp-baseline trains a 'sequence_classification' head"
        )
    family = family_of(load_config(model_dir))
    cls = (
        tf.BertForSequenceClassification
        if family is Family.BERT
        else tf.RobertaForSequenceClassification
    )
    hf = cls.from_pretrained(
        model_dir,
        local_files_only=True,
        attn_implementation="eager",
        num_labels=spec.num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    encoder = getattr(hf, family.value)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = _PoolerSlot(encoder.pooler.dense)
    model = DPClassifier(encoder=encoder, head=hf.classifier, spec=spec, pooling=pooling)
    names = {n for n, _ in model.named_parameters()}
    if names != {n for n, _ in spec.param_shapes}:
        raise ConfigError(
            f"model.path: {model_dir} loads with parameters that differ from the job's model "
            "spec; is it the same checkpoint?"
        )
    missing = names - set(values)
    if missing:
        raise ConfigError(f"internal: no starting value for {sorted(missing)[:3]}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n])
    return model.float()


def mark_trainable(model: DPClassifier, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """requires_grad on exactly ``names`` (minus unused ones); returns (trained, left frozen)."""
    wanted = set(names)
    unused = set(model.unused_parameters())
    trained, frozen = [], []
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted and n not in unused)
        if p.requires_grad:
            trained.append(n)
        elif n in wanted:
            frozen.append(n)
    if not trained:
        raise ConfigError(
            f"zo.trainable: every selected parameter ({', '.join(sorted(wanted)[:4])}) is unused "
            "by this model's forward; select parameters the logits depend on"
        )
    return trained, frozen


class HeadView(nn.Module):
    """``model.head`` as a module of its own: what Opacus wraps when only the head trains
    (the frozen encoder's pooled features are then computed once, as the MPC job caches them)."""

    def __init__(self, model: DPClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.head(pooled)


def pooled_features(
    model: DPClassifier, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch: int
) -> torch.Tensor:
    """Frozen features (N, H) of every row, in chunks of ``batch`` rows."""
    with torch.no_grad():
        return torch.cat(
            [
                model.features(input_ids[s : s + batch], attention_mask[s : s + batch])
                for s in range(0, input_ids.shape[0], batch)
            ]
        )
