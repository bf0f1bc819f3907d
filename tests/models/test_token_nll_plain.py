"""The plaintext response-token loss equals torch's cross_entropy with ignore_index.

Instruction tuning labels prompt and padding positions -100 (Hugging Face's convention); the
response mask given to :meth:`Ops.token_nll` is ``labels != -100``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from secfwt.models.ops import PlainOps

TOL = 1e-12  # float64 against float64


def _batch(v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(3, 7, v, generator=g, dtype=torch.float64) * 70 - 30  # [-30, 40]
    labels = torch.randint(0, v, (3, 7), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1, :5] = -100
    labels[1, 6] = -100  # padding
    labels[2, 0] = -100
    return logits, labels


@pytest.mark.parametrize("v", [50, 49_152])
def test_token_nll_equals_cross_entropy_with_ignore_index(v: int) -> None:
    logits, labels = _batch(v, seed=v)
    counted = labels != -100
    onehot = F.one_hot(labels.clamp(min=0), v).double() * counted.unsqueeze(-1)
    got = PlainOps().token_nll(logits, onehot, counted.double())  # (N,)
    for n in range(3):
        want = F.cross_entropy(logits[n], labels[n], ignore_index=-100)  # mean over counted
        assert abs(float(got[n] - want)) < TOL
    # the token-weighted batch mean of Hugging Face's causal-LM loss, from the per-sequence ones
    counts = counted.sum(-1).double()
    batch = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    assert abs(float((got * counts).sum() / counts.sum() - batch)) < TOL


def test_token_nll_refuses_a_row_without_counted_tokens() -> None:
    logits, labels = _batch(50, seed=1)
    weights = (labels != -100).double()
    weights[1] = 0
    onehot = F.one_hot(labels.clamp(min=0), 50).double()
    with pytest.raises(ValueError, match="every row must count at least one token"):
        PlainOps().token_nll(logits, onehot, weights)
