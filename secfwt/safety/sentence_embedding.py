"""Sentence embeddings from the packaged all-MiniLM-L6-v2, as sentence-transformers computes them.

all-MiniLM-L6-v2 (Reimers & Gurevych 2019, Sentence-BERT, arXiv:1908.10084; model card:
mean pooling, then L2 normalisation) is a 22.7 M-parameter BERT that ships offline as
``packaged:all-minilm-l6-v2``. sentence-transformers itself is not a dependency (it would pull
its own stack), and its recipe is two lines: the attention-masked mean of the last hidden states,
scaled to unit length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

EMBEDDER_MODEL = "packaged:all-minilm-l6-v2"


class SentenceEmbedder:
    """Unit-length sentence vectors (384 dimensions for MiniLM) of short texts."""

    def __init__(
        self, model: str = EMBEDDER_MODEL, *, max_length: int = 128, device: str = "cpu"
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        from secfwt.models.checkpoint import resolve_model_path

        folder = resolve_model_path(model)
        self.name = model
        self.max_length = max_length  # tokens; a refusal shows in a reply's first sentences
        self.device = torch.device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self._model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device)
        self._model.eval()

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """``(N, dim)`` float32 on the CPU, each row of unit L2 norm."""
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self._tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**enc).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)
            out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        if not out:
            return torch.zeros((0, self.dim))
        return torch.cat(out)
