"""Instruction-tuning losses of a causal LM from a cached frozen prefix, on either backend.

Layout. Rows are left-padded to T tokens, so every row's reply and end-of-turn token end at
position T - 1. The loss of a row is the mean cross-entropy of its reply tokens (Ouyang et al.,
2022, and every SFT recipe since: the prompt is context, not target), counted only in the job's
public response window: the logits at positions ``T - 1 - R .. T - 2`` predict the tokens at
``T - R .. T - 1``, and a secret 0/1 weight per window position says which of them are reply
tokens. Logits and the log-sum-exp over the vocabulary are then (B, R, V), not (B, T, V), and
no row's prompt or reply length is revealed (only R is public).

Positions. Both backends use the public positions ``0 .. T - 1`` for every row (what the MPC
forward must use with a secret key mask). Rotary scores depend only on the difference of two
positions (Su et al., RoFormer, 2021, Sec. 3.4.2) and a left-padded row's tokens are contiguous,
so every unmasked score equals the one transformers computes with ``cumsum(mask) - 1`` positions
(as ``generate`` does); padded keys are masked. The plaintext reference therefore computes the
function a Hugging Face model computes on the same rows.

Soft prompt. A prompt of P vectors enters each row right before its text, as PEFT's prompt
tuning (Lester et al., 2021) prepends it to the input of an unpadded row: the data owner lays
rows out ``pads, P slots, text`` (T positions in all), and before layer ``zo.prompt_layer`` the
slots' states are replaced by the prompt (``h (1 - slot) + S prompt`` with the secret slot mask
and its (N, T, P) placement S: where the slots are, i.e. each row's length, stays secret).
Layers below that layer mask the slots as keys, so the text's states there are those of the
row without a prompt.

Target logits. The logit of target token y at a final hidden state x is ``<x, E[y]>`` for the LM
head's table E (tied: the word embeddings). The rows ``E[y]`` (N, R, H) are looked up once per
example (by the data owner from a disclosed table, or in MPC from one-hot rows) and kept with
the cache, so a loss never forms (N, R, V) one-hot rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from secfwt.models.decoder import DecoderModel
from secfwt.models.ops import Ops
from secfwt.models.spec import ModelSpec
from secfwt.models.transformer import SOFT_PROMPT, ForwardSettings
from secfwt.tuning.guard import Guard, guarded

#: Token rows of (., V) logits per log-sum-exp call. A row of V = 49,152 costs ~15 MB of
#: traffic and its share of the call's working memory; 64 rows keep a party's peak near 1 GB
#: (measured: 96 rows, 1.5 GB resident, 1.4 GB sent by the model owner, 11 s on 2 loaded cores).
LOSS_CHUNK_TOKENS = 64
#: Fractional bits the final hidden states give up before the LM head's product in MPC
#: (:meth:`~secfwt.models.ops.Ops.weight_matmul`): a step's V logits per response position are
#: millions of truncations, each failing with probability |logit| 2^32 / 2^64; 4 bits make that
#: 16 times rarer (on the example job, from about 0.5% to 0.04% of steps) for a resolution of
#: 2^-12 on the states (a per-token loss error of ~1e-4).
HEAD_HEADROOM_BITS = 4


def public_positions(n: int, t: int) -> torch.Tensor:
    """Positions (N, T) ``0 .. T - 1`` of every row (see the module doc: exact for left padding)."""
    return torch.arange(t).expand(n, t)


def window_slice(t: int, window: int) -> slice:
    """The target positions ``T - 1 - R .. T - 2`` of a response window of R positions."""
    return slice(t - 1 - window, t - 1)


@dataclasses.dataclass(frozen=True)
class PromptSlots:
    """Where a soft prompt (P, H) enters the rows (module doc)."""

    slots: Any  # (N, T) 1 on each row's P slot positions (secret in MPC)
    selection: Any  # (N, T, P) selection @ prompt puts prompt vector i on slot i
    layer: int  # the prompt replaces the slots' states before this layer


def causal_prefix(
    model: DecoderModel,
    word: Any,
    mask: Any,
    *,
    cut: int,
    window: int,
    slots: Any | None = None,
) -> Any:
    """The frozen computation below layer ``cut`` for one chunk of rows (N, T, H) -> cache.

    ``cut == num_layers`` (only the final norm trains): the residual stream is final, so only
    the window's states (N, R, H) are kept. ``slots`` (N, T): soft-prompt positions, masked as
    keys below the prompt's layer (``cut`` is at most that layer).
    """
    if cut == 0:
        return word
    n, t = word.shape[0], word.shape[1]
    keys = mask if slots is None else mask - slots
    h = model.layers(word, keys, stop=cut, positions=public_positions(n, t))
    return h[:, window_slice(t, window)] if cut == model.spec.num_layers else h


@dataclasses.dataclass(frozen=True)
class ResponseTargets:
    """Per row: the LM head's rows of the window's target tokens and the reply weights."""

    rows: Any  # (N, R, H) E[y] for each target token (secret in MPC)
    weights: Any  # (N, R) 1 where the target is a reply token (secret in MPC)


class CausalLMForward:
    """Response losses for rows of the cache, with given trainable values (the ZO loops'
    :class:`~secfwt.tuning.loops.Losses`)."""

    def __init__(
        self,
        *,
        ops: Ops,
        spec: ModelSpec,
        frozen: dict[str, Any],
        settings: ForwardSettings,
        cache: Any,
        mask: Any,
        targets: ResponseTargets,
        cut: int,
        window: int,
        prompt: PromptSlots | None = None,
        guard: Guard | None = None,
        loss_guard: Guard | None = None,
    ) -> None:
        self.ops, self.spec, self.frozen, self.settings = ops, spec, frozen, settings
        self.cache, self.mask, self.targets = cache, mask, targets
        self.cut, self.window, self.prompt, self.guard = cut, window, prompt, guard
        self.loss_guard = loss_guard  # the per-row losses' range check (none in plaintext)

    def on_rows(
        self,
        *,
        cache: Any,
        mask: Any,
        targets: ResponseTargets,
        window: int,
        guard: Guard | None,
        loss_guard: Guard | None,
    ) -> CausalLMForward:
        """The same model, frozen values and cut over other rows with their own cached prefix
        (the safety gate's score rows), without a soft prompt."""
        return CausalLMForward(
            ops=self.ops,
            spec=self.spec,
            frozen=self.frozen,
            settings=self.settings,
            cache=cache,
            mask=mask,
            targets=targets,
            cut=self.cut,
            window=window,
            guard=guard,
            loss_guard=loss_guard,
        )

    def window_states(self, theta: Mapping[str, Any], idx: list[int]) -> Any:
        """Hidden states (B, R, H) of the window for the rows ``idx``, before the final norm
        (the upper layers' rows through :attr:`guard`)."""
        if self.cut == self.spec.num_layers:
            return self.cache[torch.tensor(idx)]
        model = DecoderModel(self.spec, {**self.frozen, **theta}, self.ops, self.settings)

        def upper(rows: list[int]) -> Any:  # the window's states (b, R, H) of idx[rows]
            ix = torch.tensor([idx[i] for i in rows])
            h = self.cache[ix]
            n, t = h.shape[0], h.shape[1]
            pos, mask, p = public_positions(n, t), self.mask[ix], self.prompt
            if p is not None:
                slots = p.slots[ix]  # (b, T)
                h = model.layers(h, mask - slots, start=self.cut, stop=p.layer, positions=pos)
                keep = (slots * -1.0 + 1.0).unsqueeze(-1)  # (b, T, 1): 0 on the slots
                h = h * keep + p.selection[ix].matmul(theta[SOFT_PROMPT])  # (b, T, H)
                h = model.layers(h, mask, start=p.layer, positions=pos)
            else:
                h = model.layers(h, mask, start=self.cut, positions=pos)
            return h[:, window_slice(t, self.window)]

        return guarded(self.guard, upper, len(idx))

    def example_losses(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> Any:
        """Per-row response loss (k, B) of k parameter sets on the rows ``idx``.

        The final norm, LM head and log-sum-exp of all kB rows run as one batch through
        :attr:`loss_guard`: a truncation failure there (the norm's mean square of large hidden
        states is the likeliest place) would otherwise reach a ZO step's projected gradient
        unseen and blow the parameters up."""
        k, b = len(thetas), len(idx)
        states = [self.window_states(theta, idx) for theta in thetas]  # k x (B, R, H)
        models = [
            DecoderModel(self.spec, {**self.frozen, **theta}, self.ops, self.settings)
            for theta in thetas
        ]
        rows = torch.tensor(idx * k)

        def compute(sel: list[int]) -> Any:  # losses (len(sel),) of flat rows sel (sorted)
            parts = []
            for j in range(k):
                mine = [i - j * b for i in sel if j * b <= i < (j + 1) * b]
                if mine:
                    parts.append(models[j].final_norm(states[j][torch.tensor(mine)]))
            x = parts[0] if len(parts) == 1 else self.ops.cat(parts, dim=0)  # (len(sel), R, H)
            return self._row_losses(x, rows[torch.tensor(sel)])

        return guarded(self.loss_guard, compute, k * b).reshape(k, b)

    def losses(self, thetas: Sequence[Mapping[str, Any]], idx: list[int]) -> list[Any]:
        """Mean response loss of each of k parameter sets on the rows ``idx``."""
        per = self.example_losses(thetas, idx).mean(1)  # (k,)
        return [per[i] for i in range(len(thetas))]

    def loss_sum(self, theta: Mapping[str, Any], idx: list[int], *, batch: int) -> Any:
        """Sum of the response losses of the rows ``idx`` (forward passes of ``batch`` rows)."""
        total = None
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            got = self.example_losses([theta], part).sum()
            total = got if total is None else total + got
        return total

    def _row_losses(self, x: Any, rows: torch.Tensor) -> Any:
        """Response loss (M,) of final-normed window states x (M, R, H) of the cache rows
        ``rows``; the LM head (frozen: see :mod:`secfwt.tuning.trainable`) and the log-sum-exp
        run on chunks of rows."""
        model = DecoderModel(self.spec, self.frozen, self.ops, self.settings)
        m, r, h = x.shape
        chunks = math.ceil(m / max(1, LOSS_CHUNK_TOKENS // r))
        per = math.ceil(m / chunks)  # equal chunks: the head's product keeps one shape
        out = []
        for s in range(0, m, per):
            xs, ix = x[s : s + per], rows[s : s + per]
            logits = model.lm_logits(xs, headroom_bits=HEAD_HEADROOM_BITS)  # (c, R, V)
            # <x, E[y]> per position: one (1, H) x (H, 1) product each, summed before truncation
            target = xs.unsqueeze(-2).matmul(self.targets.rows[ix].unsqueeze(-1))  # (c, R, 1, 1)
            out.append(
                self.ops.target_token_nll(
                    logits, target.reshape(len(ix), r), self.targets.weights[ix]
                )
            )
        return out[0] if len(out) == 1 else self.ops.cat(out, dim=0)
