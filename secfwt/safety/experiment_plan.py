"""Which models the safety experiment tunes and evaluates (:mod:`.experiment`), by name: the
stage folders and the report (:mod:`.experiment_report`) both use these names."""

from __future__ import annotations

import dataclasses

SCENARIOS = ("benign", "malicious")
METHODS = ("backprop", "zo")
DEFENSES = ("none", "swat", "safe-delta", "both")


@dataclasses.dataclass(frozen=True)
class RunId:
    scenario: str
    method: str
    swat: bool

    @property
    def name(self) -> str:
        return f"{self.scenario}-{self.method}" + ("-swat" if self.swat else "")

    def model_name(self, safe_delta: bool) -> str:
        return self.name + ("-safedelta" if safe_delta else "")


def model_ids() -> list[tuple[str, str, str]]:
    """(model name, scenario-method, defense) of every tuned model, in report order."""
    out = []
    for scenario in SCENARIOS:
        for method in METHODS:
            for defense in DEFENSES:
                run = RunId(scenario, method, defense in ("swat", "both"))
                safe = defense in ("safe-delta", "both")
                out.append((run.model_name(safe), f"{scenario}-{method}", defense))
    return out
