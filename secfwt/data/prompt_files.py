"""Lists of prompts read from files: a user's own prompt file, and AdvBench's behaviours.

One reader serves every option that takes a user's prompt file (the safety evaluation's
``--custom-suite``, the refusal-margin score's ``--prompts`` and ``safety_gate.prompts``), so the
formats and the errors are the same; each caller names its own option or field in them. What
counts as a duplicate prompt is the caller's to decide.
"""

from __future__ import annotations

import json
from pathlib import Path

from secfwt.data.packages import PYRIT
from secfwt.errors import ConfigError, DataError

#: The formats :func:`read_prompt_file` reads, as its errors describe them.
FORMATS = (
    "a .txt file (one prompt per line) or a .jsonl file (one JSON object with a 'prompt' per line)"
)
#: AdvBench's behaviours in the pinned pyrit copy
ADVBENCH_SIZE = 520


def read_prompt_file(path: str | Path, *, where: str, alternatives: str = "") -> list[str]:
    """The non-blank prompts of a ``.txt`` or ``.jsonl`` file, stripped, in file order.

    ``where`` starts every error with the caller's option and value (``"--prompts = 'x.txt'"``);
    ``alternatives`` is what else the option accepts, offered before the file formats (e.g.
    ``"'packaged:advbench-gate' or "``). A missing file or another suffix is a
    :class:`ConfigError`, a malformed line a :class:`DataError`.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}: no such file {file}; give {alternatives}{FORMATS}")
    if file.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{where}: the file must end in .txt or .jsonl; give {FORMATS}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: {file} is not UTF-8 ({exc}); re-save it as UTF-8") from None
    if file.suffix == ".txt":
        return [line.strip() for line in lines if line.strip()]
    prompts = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prompt = str(json.loads(line)["prompt"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(
                f"{where}: {file} line {i} is not a JSON object with a 'prompt': {exc}"
            ) from None
        if prompt:
            prompts.append(prompt)
    return prompts


def advbench_prompts() -> list[str]:
    """AdvBench's 520 behaviours (Zou et al. 2023, arXiv:2307.15043) in the pinned pyrit copy's
    order."""
    import yaml

    file = PYRIT.file("datasets", "seed_datasets", "local", "adv_bench.prompt")
    try:
        seeds = [str(s["value"]) for s in yaml.safe_load(file.read_text("utf-8"))["seeds"]]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise DataError(f"{file}: expected a YAML document with seeds[].value: {exc}") from exc
    if len(seeds) < ADVBENCH_SIZE:
        raise DataError(f"{file}: {len(seeds)} prompts, expected {ADVBENCH_SIZE} (pyrit)")
    return seeds
