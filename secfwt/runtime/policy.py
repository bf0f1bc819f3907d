"""A model owner's safety policy: the gate and the defences every job on its model must carry.

The model owner never sees the data its model is tuned on, so it states up front what a job must
do to be run at all: score the tuned model on its harmful prompts inside MPC and withhold the
result below a threshold (``[safety_gate]``, :mod:`secfwt.runtime.gate`), train with its SWAT
schedule (``[safety]``: the warm-up modules and learning-rate multipliers its own probe chose,
:mod:`secfwt.tuning.swat`), and, where available, apply Safe Delta before release. A daemon
checks every proposal against the policy in its ``party.toml``; ``secfwt simulate --policy``
does the same with the policy file given. A job may be stricter than the policy, never laxer.
The job's safety sections are bound into its disclosure terms' digest
(:func:`secfwt.config.safety_policy_digest`), so both owners accept the exact policy that runs.

TOML (in ``party.toml`` or a file of its own)::

    [safety_policy]
    prompts = "packaged:advbench-gate"   # the gate's prompts the job must score
    count = 8                            # at least this many of them
    max_drop = 0.5                       # a job's safety_gate.max_drop must be at most this
    # min_score = 1.0                    # and its safety_gate.min_score at least this
    [safety_policy.swat]                 # optional: the SWAT schedule jobs must train with
    warmup_modules = ["*.q_proj"]
    min_warmup_fraction = 0.1            # safety.warmup_steps >= this * zo.steps
    lr_multipliers = { "*.q_proj" = 0.5 }  # each a maximum for the job's multiplier
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from secfwt.config import JobConfig, build_section, section_values
from secfwt.errors import ConfigError, PolicyError
from secfwt.overrides import loads_toml, read_toml_text


@dataclasses.dataclass(frozen=True)
class SwatRequirement:
    warmup_modules: tuple[str, ...] = ()
    min_warmup_fraction: float = 0.0
    lr_multipliers: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class SafetyPolicy:
    prompts: str
    count: int = 8
    max_drop: float | None = None
    min_score: float | None = None
    safe_delta: bool = False
    swat: SwatRequirement | None = None

    def digest(self) -> str:
        return hashlib.sha256(
            json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        ).hexdigest()


def parse_policy(table: Any, *, where: str) -> SafetyPolicy:
    """A ``[safety_policy]`` table, checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [safety_policy] must be a table")
    table = dict(table)
    swat_table = table.pop("swat", None)
    values = section_values(SafetyPolicy, table, f"{where}: [safety_policy]")
    if "prompts" not in values or not values["prompts"]:
        raise ConfigError(
            f"{where}: safety_policy.prompts: name the harmful prompts every job's safety gate "
            "must score, e.g. prompts = 'packaged:advbench-gate'"
        )
    swat = None
    if swat_table is not None:
        swat = build_section(SwatRequirement, swat_table, f"{where}: [safety_policy.swat]")
        if not 0 <= swat.min_warmup_fraction < 1:
            raise ConfigError(
                f"{where}: safety_policy.swat.min_warmup_fraction = {swat.min_warmup_fraction}: "
                "must be in [0, 1)"
            )
    policy = SafetyPolicy(**values, swat=swat)
    if policy.max_drop is None and policy.min_score is None:
        raise ConfigError(
            f"{where}: safety_policy.max_drop: a policy needs a threshold; set max_drop (how far "
            "a job's safety score may fall during tuning) and/or min_score"
        )
    if policy.count < 1:
        raise ConfigError(f"{where}: safety_policy.count = {policy.count}: must be >= 1")
    return policy


def load_policy(path: str | Path) -> SafetyPolicy:
    """The ``[safety_policy]`` table of a TOML file (a ``party.toml`` or a policy file)."""
    p = Path(path)
    raw = loads_toml(read_toml_text(p, what="policy file"), where=str(p))
    if "safety_policy" not in raw:
        raise ConfigError(f"{p}: no [safety_policy] table; see docs/safety.md for its keys")
    return parse_policy(raw["safety_policy"], where=str(p))


def check_policy(cfg: JobConfig, policy: SafetyPolicy) -> None:
    """Refuse a job that lacks what ``policy`` requires, naming the first missing item."""
    g, want = cfg.safety_gate, policy

    def refuse(item: str, msg: str) -> None:
        raise PolicyError(
            f"{cfg.source}: {item}: the model owner's safety policy {policy.digest()[:12]} "
            f"requires {msg}"
        )

    if not g.enabled:
        refuse(
            "safety_gate",
            f"a safety gate: add [safety_gate] with prompts = {want.prompts!r}, count >= "
            f"{want.count}"
            + ("" if want.max_drop is None else f", max_drop <= {want.max_drop}")
            + ("" if want.min_score is None else f", min_score >= {want.min_score}"),
        )
    if g.prompts != want.prompts:
        refuse("safety_gate.prompts", f"prompts = {want.prompts!r}, not {g.prompts!r}")
    if g.count < want.count:
        refuse("safety_gate.count", f"at least {want.count} prompts, not {g.count}")
    if want.max_drop is not None and (g.max_drop is None or g.max_drop > want.max_drop):
        refuse("safety_gate.max_drop", f"max_drop <= {want.max_drop}, not {g.max_drop}")
    if want.min_score is not None and (g.min_score is None or g.min_score < want.min_score):
        refuse("safety_gate.min_score", f"min_score >= {want.min_score}, not {g.min_score}")
    if want.safe_delta and not g.safe_delta:
        refuse("safety_gate.safe_delta", "Safe Delta before release (safe_delta = true)")
    if want.swat is None:
        return
    s, sw = cfg.safety, want.swat
    if sorted(s.warmup_modules) != sorted(sw.warmup_modules):
        refuse(
            "safety.warmup_modules",
            f"the SWAT warm-up modules {list(sw.warmup_modules)}, not {list(s.warmup_modules)}",
        )
    need = math.ceil(sw.min_warmup_fraction * cfg.zo.steps)
    if s.warmup_steps < need:
        refuse(
            "safety.warmup_steps",
            f"a warm-up of at least {need} steps ({sw.min_warmup_fraction} of zo.steps = "
            f"{cfg.zo.steps}), not {s.warmup_steps}",
        )
    got = dict(s.lr_multipliers)
    for pattern, most in sw.lr_multipliers:
        if pattern not in got or got[pattern] > most:
            refuse(
                f"safety.lr_multipliers.{pattern}",
                f"a learning-rate multiplier <= {most} for {pattern!r}, not {got.get(pattern)}",
            )
