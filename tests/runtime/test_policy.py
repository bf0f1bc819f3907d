"""A model owner's [safety_policy] table: read with the job file's typed-section rules (unknown
keys and wrong types refused, naming the item), plus the policy's own checks."""

from __future__ import annotations

import pytest

from secfwt.errors import ConfigError
from secfwt.runtime.policy import SafetyPolicy, SwatRequirement, load_policy, parse_policy

GOOD = {
    "prompts": "packaged:advbench-gate",
    "count": 8,
    "max_drop": 0.5,
    "swat": {
        "warmup_modules": ["*.q_proj"],
        "min_warmup_fraction": 0.1,
        "lr_multipliers": {"*.q_proj": 0.5},
    },
}


def test_a_policy_file_is_read_into_its_dataclasses(tmp_path):
    file = tmp_path / "party.toml"
    file.write_text(
        '[safety_policy]\nprompts = "packaged:advbench-gate"\ncount = 8\nmax_drop = 0.5\n'
        '[safety_policy.swat]\nwarmup_modules = ["*.q_proj"]\nmin_warmup_fraction = 0.1\n'
        'lr_multipliers = { "*.q_proj" = 0.5 }\n'
    )
    want = SafetyPolicy(
        prompts="packaged:advbench-gate",
        count=8,
        max_drop=0.5,
        swat=SwatRequirement(("*.q_proj",), 0.1, (("*.q_proj", 0.5),)),
    )
    assert load_policy(file) == want == parse_policy(GOOD, where="p")


def _with(**changes):
    table = {**GOOD, **changes}
    return {k: v for k, v in table.items() if v is not None}


def _swat(**changes):
    return _with(swat={**GOOD["swat"], **changes})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([1], r"p: \[safety_policy\] must be a table"),
        (
            _with(promts="x"),
            r"p: \[safety_policy\]: unknown key 'promts'; valid keys: prompts, count, max_drop",
        ),
        (_with(count="8"), r"p: \[safety_policy\] count: expected an integer, got '8'"),
        (_with(safe_delta=1), r"p: \[safety_policy\] safe_delta: expected true or false"),
        (_with(prompts=None), "p: safety_policy.prompts: name the harmful prompts"),
        (_with(max_drop=None), "p: safety_policy.max_drop: a policy needs a threshold"),
        (_with(count=0), "p: safety_policy.count = 0: must be >= 1"),
        (_with(swat=[1]), r"p: \[safety_policy.swat\]: must be a table"),
        (
            _swat(warmup=["*.q_proj"]),
            r"p: \[safety_policy.swat\]: unknown key 'warmup'; valid keys: warmup_modules, "
            "min_warmup_fraction, lr_multipliers",
        ),
        (
            _swat(lr_multipliers={"*.q_proj": "half"}),
            r"p: \[safety_policy.swat\] lr_multipliers.\*.q_proj: expected a number",
        ),
        (_swat(min_warmup_fraction=1.0), "safety_policy.swat.min_warmup_fraction = 1.0: must be"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_item(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_policy(table, where="p")
