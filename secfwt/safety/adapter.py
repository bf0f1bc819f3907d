"""A PEFT adapter folder applied to the model under evaluation, checked before it is trusted.

``--adapter DIR`` is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``. peft itself loads state dicts non-strictly (a tensor without a
place in the model is skipped with a warning), so an adapter made for another model could be
evaluated as if it were this one. Before loading, every tensor of the file is matched by name and
shape against the adapter peft builds on this model from the same config; any difference is a
:class:`ModelError` naming the config field or the tensor. The adapter is then merged into the
weights (``merge_and_unload``), so generation runs at the base model's speed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secfwt.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def apply_adapter(
    model: PreTrainedModel, adapter_dir: str | Path, *, model_names: Iterable[str]
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """``model`` with the adapter in ``adapter_dir`` merged in, and a description of it.

    ``model_names``: every name the evaluated model goes by (the command-line name, its folder);
    the adapter's ``base_model_name_or_path`` must be one of them when it is set.
    """
    from peft import (
        PeftConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(adapter_dir).expanduser()
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file():
        raise ModelError(
            f"--adapter: {folder} has no {CONFIG_FILE}; pass a PEFT adapter folder (what "
            "PeftModel.save_pretrained writes)"
        )
    if not weights_file.is_file():
        raise ModelError(
            f"--adapter: {folder} has no {WEIGHTS_FILE}; save the adapter with "
            "PeftModel.save_pretrained(..., safe_serialization=True) (pickled .bin files are "
            "not loaded)"
        )
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise ModelError(f"--adapter: cannot read {config_file}: {exc}") from exc
    check_base(config.base_model_name_or_path, model_names, config_file)
    task = getattr(config, "task_type", None)
    if task not in (None, "CAUSAL_LM"):
        raise ModelError(
            f"--adapter: {config_file} task_type = {task!r}; the safety evaluation needs a "
            "'CAUSAL_LM' adapter"
        )
    config.inference_mode = True
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, KeyError) as exc:  # e.g. target_modules not found in the base model
        raise ModelError(
            f"--adapter: {config_file} does not fit this model (target_modules = "
            f"{getattr(config, 'target_modules', None)!r}): {exc}"
        ) from exc
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    with safe_open(str(weights_file), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    _check_tensors(expected, found, weights_file)
    set_peft_model_state_dict(peft_model, load_file(str(weights_file)))
    merged = peft_model.merge_and_unload()
    info = {
        "path": str(folder),
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "base_model_name_or_path": config.base_model_name_or_path,
        "tensors": len(found),
        "parameters": sum(_numel(s) for s in found.values()),
    }
    log.info("merged adapter %s (%d tensors)", folder, len(found))
    return merged, info


def check_base(base: str | None, model_names: Iterable[str], config_file: Path) -> None:
    """ModelError unless the adapter's ``base_model_name_or_path`` is one of ``model_names``."""
    names = {str(n) for n in model_names if n}
    names |= {str(Path(n).expanduser().resolve()) for n in list(names) if ":" not in n}
    if not base:
        log.warning("%s names no base_model_name_or_path; checking shapes only", config_file)
        return
    candidates = {base} | ({str(Path(base).expanduser().resolve())} if ":" not in base else set())
    if not candidates & names:
        shown = ", ".join(sorted(n for n in names if n))
        raise ModelError(
            f"--adapter: {config_file} base_model_name_or_path = {base!r}, but the model "
            f"evaluated is {shown}; evaluate the adapter on its base model, or, if that is a copy "
            "of this one, set base_model_name_or_path to this model's path"
        )


def _check_tensors(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], file: Path
) -> None:
    for key in sorted(found):
        if key not in expected:
            raise ModelError(
                f"--adapter: tensor {key!r} of {file} has no place in this model (the adapter "
                "was made for a model with other modules or more layers)"
            )
        if found[key] != expected[key]:
            raise ModelError(
                f"--adapter: tensor {key!r} of {file} has shape {list(found[key])}, this model "
                f"needs {list(expected[key])} (the adapter was made for a model of another size)"
            )
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelError(
            f"--adapter: {file} lacks {len(missing)} tensors the adapter config implies, e.g. "
            f"{missing[0]!r}; the adapter file and its {CONFIG_FILE} do not belong together"
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
