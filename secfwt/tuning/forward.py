"""Forward passes from a cached frozen prefix, on either backend (plaintext or MPC).

When only upper layers (and the head) train, everything below the first trainable value is
computed once per example and kept (as shares in MPC); each tuning step then costs only the
upper part (in MPC the frozen layers are the bulk of the cost of a step). The same class runs
the plaintext reference of a job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch

from secfwt.config import JobConfig
from secfwt.models.attention import RFASettings
from secfwt.models.encoder import SOFT_PROMPT, EncoderModel, ForwardSettings
from secfwt.models.ops import Ops
from secfwt.models.spec import ModelSpec
from secfwt.tuning.guard import Guard, guarded
from secfwt.tuning.spsa import Perturbed


def forward_settings(cfg: JobConfig, *, seed: int) -> ForwardSettings:
    """The job's forward (attention, RFA features, pooling); ``seed`` fixes the public RFA draws."""
    m = cfg.model
    rfa = RFASettings(num_features=m.rfa_features, sigma=m.rfa_sigma, seed=seed)
    return ForwardSettings(attention=m.attention, rfa=rfa, pooling=m.pooling)


def prefix(
    model: EncoderModel,
    word: Any,
    mask: Any,
    pool_w: Any,
    *,
    cut: int,
    attention_cached: bool = False,
) -> Any:
    """The frozen computation below layer ``cut`` for one chunk of sequences: (N, T, H); with
    ``attention_cached`` (:meth:`~secfwt.tuning.trainable.TrainableSet.attention_frozen`) also
    layer ``cut``'s attention half, (N, T, H), or (N, 1, H) when ``cut`` is the last layer and
    the head reads only the first position (:meth:`EncoderModel.top_layers`); with ``cut`` past
    the last layer the pooled features (N, H)."""
    if cut == 0 and not attention_cached:
        return word  # embeddings are recomputed per step (a prompt may enter before them)
    if cut == model.spec.num_layers:  # only the head trains: cache pooled features (N, H)
        return model.pool(model.top_layers(model.embed(word), mask), pool_w)
    h = model.layers(model.embed(word), mask, stop=cut)
    if attention_cached:
        return model.attention(h, mask, cut, query_rows=model.query_rows(cut))
    return h


def mean_pool_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token weights mask / length (N, T) that turn a weighted sum into a masked mean."""
    mask = attention_mask.to(torch.float64)
    return mask / mask.sum(1, keepdim=True).clamp(min=1)


class CachedForward:
    """Logits, loss and accuracy for rows of the cache, with given trainable values.

    With a ``guard`` (the MPC job's range checks) every row of a forward is checked where its
    values end: the logits (and a step's per-example losses), so a truncation failure in the
    layers above the cut, the pooling, the classifier or the loss that blows a value up is
    found and that row computed again. With ``attention_cached`` the cache holds layer
    ``cut``'s attention output (see :func:`prefix`) and a forward starts at its feed-forward half.
    """

    def __init__(
        self,
        *,
        ops: Ops,
        public: Callable[[torch.Tensor], Any],
        spec: ModelSpec,
        frozen: dict[str, Any],
        settings: ForwardSettings,
        cache: Any,
        mask: Any,
        pool_w: Any,
        onehot: Any,
        cut: int,
        prompt_layer: int,
        guard: Guard | None = None,
        attention_cached: bool = False,
    ) -> None:
        self.ops, self.public, self.spec, self.frozen, self.settings = (
            ops,
            public,
            spec,
            frozen,
            settings,
        )
        self.cache, self.mask, self.pool_w, self.onehot = cache, mask, pool_w, onehot
        self.cut, self.prompt_layer, self.guard = cut, prompt_layer, guard
        self.attention_cached = attention_cached

    def logits(self, theta: Mapping[str, Any], idx: list[int], *, prompt: Any = None) -> Any:
        """Logits (B, C) of the rows ``idx``; ``prompt`` (P, H), or (B, P, H): one per row."""

        def compute(rows: list[int]) -> Any:  # (b, C) for idx[rows]
            own = prompt if prompt is None or len(prompt.shape) == 2 else prompt[torch.tensor(rows)]
            return self._logits(theta, [idx[i] for i in rows], prompt=own)

        return guarded(self.guard, compute, len(idx))

    def _logits(self, theta: Mapping[str, Any], idx: list[int], *, prompt: Any) -> Any:
        model = EncoderModel(self.spec, {**self.frozen, **theta}, self.ops, self.settings)
        ix = torch.tensor(idx)
        x = self.cache[ix]
        if self.cut == self.spec.num_layers:
            return model.classify(x)
        mask = self.mask[ix]
        pool_w = None if self.pool_w is None else self.pool_w[ix]
        prompt = theta.get(SOFT_PROMPT, prompt)
        if self.attention_cached:
            if prompt is not None:
                raise ValueError("a prompt enters at a layer boundary; the cache ends inside one")
            return model.output(model.top_from_attention(x, mask, self.cut), pool_w)
        if prompt is None:
            h = model.embed(x) if self.cut == 0 else x
            return model.output(model.top_layers(h, mask, start=self.cut), pool_w)
        p = prompt.shape[-2]
        ones, zeros = self.public(torch.ones(len(idx), p)), self.public(torch.zeros(len(idx), p))
        if self.cut == 0 and self.prompt_layer == 0:
            h, mask2 = model.insert_prompt(x, mask, prompt, ones)  # in word-embedding space
            h, start = model.embed(h), 0
        else:
            h = model.embed(x) if self.cut == 0 else x
            h = model.layers(h, mask, start=self.cut, stop=self.prompt_layer)
            h, mask2 = model.insert_prompt(h, mask, prompt, ones)
            start = self.prompt_layer
        if pool_w is not None:
            pool_w = self.ops.cat(
                [pool_w[:, :1], zeros, pool_w[:, 1:]], dim=1
            )  # prompts are not pooled
        return model.output(model.top_layers(h, mask2, start=start), pool_w)

    def loss(self, theta: Mapping[str, Any], idx: list[int]) -> Any:
        """Mean cross-entropy over the rows ``idx`` (secret in MPC)."""
        return self.example_losses([theta], idx).mean()

    def losses(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> list[Any]:
        """Mean cross-entropy for several parameter sets on the same rows, in one batched loss."""
        per = self.example_losses(thetas, idx).mean(1)  # (k,)
        return [per[i] for i in range(len(thetas))]

    def example_losses(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> Any:
        """Per-example cross-entropy (k, B) for k parameter sets on the rows ``idx``; under the
        guard each row's k losses are checked together with the logits' differences to the
        first class (k x (C - 1)): the loss depends on the logits only through those (it is
        shift-invariant, in MPC exactly so), so a failure that reaches a logit shows there
        without checking all C."""
        k = len(thetas)

        def compute(rows: list[int]) -> Any:  # (b, k, C): logit differences and loss per set
            part = [idx[i] for i in rows]
            logits = self._stacked_logits(thetas, part)  # (k, b, C)
            c = logits.shape[-1]
            y = self.onehot[torch.tensor(part * k)]
            nll = self.ops.log_softmax_nll(logits.reshape(k * len(part), c), y)  # (k * b,)
            spread = logits[..., 1:] - logits[..., :1]  # (k, b, C - 1)
            out = self.ops.cat([spread, nll.reshape(k, len(part), 1)], dim=-1)  # (k, b, C)
            return out.transpose(0, 1)

        return guarded(self.guard, compute, len(idx))[:, :, -1].transpose(0, 1)  # (k, B)

    def _stacked_logits(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> Any:
        """Logits (k, B, C) of k parameter sets on the rows ``idx``."""
        if self.cut == self.spec.num_layers:
            linear = self._offset_logits(thetas, idx)
            if linear is not None:
                return linear
            # Only the head trains: evaluate all k variants in one batched forward by stacking
            # their parameters, (k, out, in) weights against the cached (B, H) features.
            stacked = {n: self.ops.stack([t[n] for t in thetas], dim=0) for n in thetas[0]}
            model = EncoderModel(self.spec, {**self.frozen, **stacked}, self.ops, self.settings)
            return model.classify(self.cache[torch.tensor(idx)])
        return self.ops.stack([self._logits(theta, idx, prompt=None) for theta in thetas], dim=0)

    def _offset_logits(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> Any:
        """Logits (k, B, C) of the k sets when all are one base plus public offsets
        (:class:`~secfwt.tuning.spsa.Perturbed`, as an SPSA step makes them) in the weight and
        bias of the classifier's last linear layer only; else None.

        The logits are linear in those: ``z (W + D_k)^T + (b + d_k) = (z W^T + b) + (z D_k^T +
        d_k)`` for the layer's input ``z`` (B, H), so the base takes one secret product and
        each offset's part is secret times public, local in MPC, where a product with the k
        stacked secret sets opens all k of them (k x C x H values per party and step).
        """
        if not all(isinstance(t, Perturbed) for t in thetas):
            return None
        sets = cast(Sequence[Perturbed], thetas)
        base = sets[0].base
        if any(t.base is not base for t in sets):
            return None
        model = EncoderModel(self.spec, {**self.frozen, **base}, self.ops, self.settings)
        weight, bias = (f"{model.output_module}.{p}" for p in ("weight", "bias"))
        if weight not in base or not set(base) <= {weight, bias}:
            return None
        z = model.classifier_input(self.cache[torch.tensor(idx)])  # (B, H)
        logits = model.linear(z, model.output_module)  # (B, C)
        c, h = base[weight].shape
        w = torch.stack([torch.as_tensor(t.offset[weight]) for t in sets])  # (k, C, H)
        d = torch.stack(
            [torch.as_tensor(t.offset[bias]) if bias in base else torch.zeros(c) for t in sets]
        )  # (k, C)
        w, d = (v.to(z.dtype) if torch.is_tensor(z) else v for v in (w, d))
        k = len(sets)
        offsets = z.matmul(w.reshape(k * c, h).t()).reshape(len(idx), k, c).transpose(0, 1)
        return logits.unsqueeze(0) + offsets + d.unsqueeze(1)  # (k, B, C)

    def correct(self, logits: Any, idx: list[int]) -> Any:
        """Count of correct argmax predictions (ties -> lowest class, as torch.argmax)."""
        y = self.onehot[torch.tensor(idx)]
        if logits.shape[-1] == 2:
            pred1 = (logits[:, 1] - logits[:, 0]).gt(0) * 1.0  # (B,)
            return (y[:, 1] * pred1 + y[:, 0] * (1.0 - pred1)).sum()
        if self.ops.secure:
            return (logits.argmax(dim=-1, one_hot=True) * y).sum()
        return (torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]) * y).sum()

    def correct_count(
        self, theta: Mapping[str, Any], idx: list[int], *, batch: int, prompt: Any
    ) -> Any:
        total = None
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            c = self.correct(self.logits(theta, part, prompt=prompt), part)
            total = c if total is None else total + c
        return total


def batch_indices(*, seed: int, n_train: int, batch: int, step: int) -> list[int]:
    """Public minibatch schedule (row indices only, never content): a fresh permutation per
    epoch."""
    if batch >= n_train:
        g = torch.Generator().manual_seed(seed % (2**63))
        return torch.randperm(n_train, generator=g).tolist()
    per_epoch = n_train // batch
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed((seed + 7919 * epoch) % (2**63))
    return torch.randperm(n_train, generator=g).tolist()[k * batch : (k + 1) * batch]
