"""SecFwT / Black-Box Tuning: CMA-ES over a low-dimensional z, kept by the data owner.

Black-Box Tuning (Sun et al., ICML 2022) optimises a soft prompt p = A z + p0 through a fixed
random projection A (d -> P*H) with CMA-ES (Hansen 2016; the maintained ``cma`` library), using
only forward passes. SecFwT (Luo et al., arXiv 2506.15307) runs those forward passes in MPC: the
data owner holds z and A, secret-shares its candidate prompts, receives the model outputs for
its own batch, and computes loss and update locally. Nothing here runs in MPC.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CMASettings:
    intrinsic_dim: int
    prompt_length: int
    hidden_size: int
    population: int
    sigma0: float
    seed: int


class PromptSearch:
    """The data owner's local optimiser state: z, A and CMA-ES."""

    def __init__(self, settings: CMASettings, *, embedding_std: float) -> None:
        import warnings

        with warnings.catch_warnings():
            # cma offers plotting when matplotlib is installed; secfwt never plots from here.
            warnings.filterwarnings(
                "ignore", message="Could not import matplotlib", category=UserWarning
            )
            import cma

        self.s = settings
        g = torch.Generator().manual_seed(settings.seed)
        d, out = settings.intrinsic_dim, settings.prompt_length * settings.hidden_size
        # BBT draws A from N(0, sigma) with sigma tied to the embedding scale so that prompts of
        # |z| ~ sqrt(d) land at the scale of real token embeddings.
        self.a = torch.randn(out, d, generator=g, dtype=torch.float64) * (
            embedding_std / math.sqrt(d)
        )
        self.es = cma.CMAEvolutionStrategy(
            np.zeros(d),
            settings.sigma0,
            {"popsize": settings.population, "seed": settings.seed + 1, "verbose": -9},
        )
        self._asked: list[np.ndarray] = []

    def ask(self) -> torch.Tensor:
        """Candidate prompts (population, P, H) for this iteration."""
        self._asked = self.es.ask()
        return torch.stack([self.prompt_of(z) for z in self._asked])

    def tell(self, losses: list[float]) -> None:
        self.es.tell(self._asked, list(losses))

    def state(self) -> dict[str, object]:
        """What a checkpoint needs to continue the search: the CMA-ES object and numpy's global
        generator (``cma`` samples with ``np.random.randn``). A and the settings are rebuilt
        from the seed. Only between iterations (nothing asked and not yet told)."""
        return {"es": self.es, "numpy_rng": np.random.get_state()}

    def restore(self, state: dict[str, object]) -> None:
        """Continue from :meth:`state` (of a search with the same settings)."""
        es: Any = state["es"]  # a cma.CMAEvolutionStrategy
        if int(es.N) != self.s.intrinsic_dim or int(es.popsize) != self.s.population:
            raise ValueError(
                f"CMA-ES state of dimension {es.N} / population {es.popsize}; this search has "
                f"{self.s.intrinsic_dim} / {self.s.population}"
            )
        self.es = es
        rng: Any = state["numpy_rng"]
        np.random.set_state(rng)
        self._asked = []

    def prompt_of(self, z: np.ndarray) -> torch.Tensor:
        p = self.a @ torch.as_tensor(np.asarray(z), dtype=torch.float64)
        return p.view(self.s.prompt_length, self.s.hidden_size).to(torch.float32)

    @property
    def best_prompt(self) -> torch.Tensor:
        z = self.es.result.xbest if self.es.result.xbest is not None else self.es.mean
        return self.prompt_of(z)

    @property
    def mean_prompt(self) -> torch.Tensor:
        return self.prompt_of(self.es.mean)
