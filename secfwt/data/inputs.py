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


@dataclasses.dataclass(frozen=True)
class InstructionInputs:
    """The data owner's instruction rows for a causal-LM job (train rows first, then held-out).

    Rows are left-padded to T tokens, so every reply ends at position T - 1 and its targets lie
    in the last ``R`` target positions ``T - 1 - R .. T - 2`` (the job's public response
    window): ``target_ids[:, j]`` is the token the logits at position ``T - 1 - R + j`` predict
    and ``target_weights[:, j]`` is 1 where that token is part of the reply (or its end-of-turn
    token). Only ``n_train`` and the shapes are public; the tensors leave the data owner only as
    secret shares (the weights, and so every row's reply length, included).
    """

    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) 0/1 (soft-prompt slots count as tokens)
    target_ids: torch.Tensor  # (N, R) long
    target_weights: torch.Tensor  # (N, R) 0/1, every row counts at least one token
    n_train: int
    #: (N, T) 0/1: the P positions right before each row's text where a soft prompt of P
    #: vectors goes (rows are ``pads, P slots, text``); None without a soft prompt
    prompt_slots: torch.Tensor | None = None

    @property
    def window(self) -> int:
        return int(self.target_ids.shape[1])


def slot_selection(slots: torch.Tensor, length: int) -> torch.Tensor:
    """(N, T, P) 0/1 matrix that places a prompt (P, H) on each row's P slots (N, T):
    ``selection @ prompt`` is prompt vector i at the row's i-th slot, zero elsewhere."""
    n, t = slots.shape
    order = (slots.cumsum(-1) - 1).clamp(min=0)  # (N, T): index of each slot among its row's
    picked = torch.nn.functional.one_hot(order, length) * slots.unsqueeze(-1)
    return picked.to(torch.float32)
