"""The tuning loops' backend in MPC: secret-shared parameters, losses and prompts.

:mod:`secfwt.tuning.loops` runs the same loops on this backend and on the plaintext one
(:class:`secfwt.tuning.reference.PlainBackend`); here public directions enter the shares
as they are (a public x secret product is local), the clip is a secure comparison, DP-ZO's
private coins are each owner's OS randomness shared as secrets, and candidate prompts are
scored by a secure forward whose logits only the data owner sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from secfwt.mpc.disclosure import Revealable
from secfwt.roles import Role
from secfwt.runtime.session import PartySession
from secfwt.tuning.causal_lm import CausalLMForward
from secfwt.tuning.dp_zo import PrivateRandomness
from secfwt.tuning.forward import CachedForward
from secfwt.tuning.loops import candidate_losses


@dataclasses.dataclass(frozen=True)
class SharedBackend:
    """ZO/DP-ZO backend of one party in an MPC session."""

    sess: PartySession
    forward: CachedForward | CausalLMForward
    coins: PrivateRandomness = dataclasses.field(default_factory=PrivateRandomness)

    def cast(self, u: torch.Tensor) -> torch.Tensor:
        return u  # public directions multiply the shares as they are

    def clip(self, x: Any, lo: float, hi: float) -> Any:
        from secfwt.mpc.nonlinear import clip

        return clip(x, lo, hi)

    def private_draws(
        self, *, rows: int, rate: float, count: int, std: float
    ) -> tuple[Any, list[Any]]:
        """The data owner's secret Poisson mask (rows,), then the model owner's and the data
        owner's secret Gaussian noise (count,) each: both parties share in this order."""
        sess = self.sess
        mine = sess.role is Role.DATA_OWNER
        mask = sess.share(
            self.coins.poisson_mask(rows, rate) if mine else None,
            owner=Role.DATA_OWNER,
            shape=(rows,),
            name="Poisson sample",
        )
        noises = [
            sess.share(
                self.coins.gaussian(count, std) if sess.role is r else None,
                owner=r,
                shape=(count,),
                name=f"DP noise of the {r.value}",
            )
            for r in (Role.MODEL_OWNER, Role.DATA_OWNER)
        ]
        return mask, noises


@dataclasses.dataclass(frozen=True)
class SharedPromptScorer:
    """CMA-ES scorer of one party: the data owner shares its candidate prompts, the secure
    forward computes their logits on the minibatch, only the data owner receives them and
    computes the losses locally (``labels``, the data owner's, never leave it)."""

    sess: PartySession
    forward: CachedForward
    population: int
    prompt_shape: tuple[int, int]  # (P, H)
    labels: torch.Tensor | None  # (N,) long on the data owner, None elsewhere

    def candidate_losses(
        self, candidates: torch.Tensor | None, idx: list[int], *, iteration: int
    ) -> torch.Tensor | None:
        pop, b = self.population, len(idx)
        per_row = None if candidates is None else candidates.repeat_interleave(b, dim=0)
        prompts = self.sess.share(  # (pop * b, P, H)
            per_row,
            owner=Role.DATA_OWNER,
            shape=(pop * b, *self.prompt_shape),
            name="candidate prompts",
        )
        rows = [i for _ in range(pop) for i in idx]  # row k*b + i: candidate k, example i
        logits = self.forward.logits({}, rows, prompt=prompts)
        out = self.sess.discloser.reveal(
            logits,
            value=Revealable.TRAIN_OUTPUTS,
            to=[Role.DATA_OWNER],
            note=f"iteration {iteration}: {pop} candidates x {b} examples",
        )
        if out is None or self.labels is None:
            return None
        return candidate_losses(out, self.labels[torch.tensor(idx)], population=pop)
