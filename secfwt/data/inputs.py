"""The data owner's prepared private inputs: tokenized rows, labels and the public counts."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class DataOwnerInputs:
    """The data owner's private inputs, already tokenized (train rows first, then eval rows).

    Only ``n_train``, ``num_labels`` and the shape of ``input_ids`` are ever made public; the
    tensors leave the data owner's process only as secret shares.
    """

    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) 0/1
    labels: torch.Tensor  # (N,) long
    n_train: int
    num_labels: int
