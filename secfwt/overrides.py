"""Typed values for frozen-dataclass contracts: from TOML files and from ``--set PATH=VALUE``.

One binder serves every command that takes ``--set`` (``simulate``, ``dp-baseline``,
``dp-compare`` on a job; ``bench`` on its plan), so the syntax and the errors are the same:

* ``PATH`` is the field's dotted path from the root of the contract: ``SECTION.KEY`` for a job
  (``zo.steps``), ``KEY`` for the flat bench plan (``fot_seq_len``). A path of the wrong depth is
  malformed; an unknown section or field is refused with the valid choices.
* ``VALUE`` is a TOML value (``512``, ``1e-3``, ``true``, ``"text"``, ``["a", "b"]``); text that
  is not valid TOML is taken as a string, so bare words need no quotes (``model.attention=rfa``).
  For a list field, a comma-separated VALUE is the list (``attention_seq_lens=64,128``). An empty
  VALUE is malformed (write ``KEY=""`` for an empty string).
* The value is coerced to the field's type with the same rules as a job file (:func:`coerce`):
  no silent int/bool/str conversions; enums by value.

:func:`read_toml_text` and :func:`loads_toml` are how every TOML file or text is read (job
files, ``party.toml``, a daemon's proposals): a missing or non-UTF-8 file, a syntax error or a
nesting too deep for the parser is a :class:`ConfigError` in one line.

Depends only on :mod:`secfwt.errors` and :mod:`secfwt.roles`, so any layer may use it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, TypeVar

from secfwt.errors import ConfigError
from secfwt.roles import Role

T = TypeVar("T")

#: A range check run after coercion: ``(path, value) -> None`` when fine, else the problem
#: ("must be positive"), reported after the item.
RangeCheck = Callable[[str, Any], "str | None"]


def read_toml_text(path: Path, *, what: str) -> str:
    """The text of the TOML file ``path`` (a ``what``: "job file", "party config", ...)."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path}: not UTF-8 (byte {exc.start}); TOML files are UTF-8 text"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc.strerror}") from None


def loads_toml(text: str, *, where: str) -> dict[str, Any]:
    """The TOML document ``text``; ConfigError naming ``where`` when it is not valid TOML.

    ``tomllib`` recurses once per level of nested arrays or inline tables, so ``x = [[[...]]]``
    a thousand deep (2 KB) ends in RecursionError, not TOMLDecodeError: caught here, in one line.
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(
            f"{where}: arrays or inline tables nested too deeply for the TOML parser; a job or "
            "party file needs only a few levels"
        ) from None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (as TOML parsed it) as type ``hint``; ConfigError naming ``where`` otherwise."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = _choices(hint)
        if isinstance(value, str):
            norm = value.strip().lower().replace("-", "_")
            for m, name in zip(hint, choices, strict=True):
                if name == norm:
                    return m
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if typing.get_origin(item) is tuple:  # key -> value pairs: a TOML table, in file order
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a table {{pattern = value, ...}}")
            key_t, value_t = typing.get_args(item)
            return tuple(
                (coerce(k, key_t, where), coerce(v, value_t, f"{where}.{k}"))
                for k, v in value.items()
            )
        if isinstance(value, str) and item is Role:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Role:
        try:
            return Role.parse(str(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # TOML 1.0 integers; tomllib does not check
            raise ConfigError(f"{where}: {value} is outside TOML's 64-bit integer range")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML allows nan and inf; no setting of secfwt means them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):  # optional keys: TOML has no null, so a value is given
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return coerce(value, inner, where)
    raise ConfigError(f"{where}: unsupported type {hint}")


def _choices(hint: type[enum.Enum]) -> list[str]:
    """An enum's values as files spell them: lower case (a provider's value is CrypTen's "TTP")."""
    return [str(m.value).lower() for m in hint]


def apply_overrides(
    target: T,
    items: Iterable[str],
    *,
    noun: str,
    example: str,
    command: str = "",
    fixed: Collection[str] = (),
    check: RangeCheck | None = None,
) -> T:
    """``target`` (a frozen dataclass) with each ``PATH=VALUE`` of ``items`` applied.

    ``noun`` names the contract in errors ("job", "plan"); ``example`` is a valid item shown
    when one is malformed; ``command`` prefixes ``--set`` in errors ("bench"); ``fixed`` are
    top-level fields that cannot be set. When every settable top-level field is itself a
    dataclass, paths are ``SECTION.KEY``, else ``KEY``. Later items win over earlier ones.
    """
    flag = f"{command} --set".strip()
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]  # type: ignore[arg-type]
    top = {name: hints[name] for name in names if name not in fixed}
    sectioned = all(dataclasses.is_dataclass(h) for h in top.values())
    pattern = "SECTION.KEY=VALUE" if sectioned else "KEY=VALUE"
    changes: dict[tuple[str, ...], Any] = {}
    for item in items:
        key, sep, raw = (part.strip() for part in item.partition("="))
        path = tuple(key.split("."))
        if not sep or not raw or len(path) != (2 if sectioned else 1) or not all(path):
            raise ConfigError(f"{flag} {item!r}: expected {pattern}, e.g. --set {example}")
        if path[0] not in top:
            choices = ", ".join(sorted(top))
            if sectioned:
                raise ConfigError(
                    f"{flag} {key}: unknown section [{path[0]}]; choose from: {choices}"
                )
            raise ConfigError(f"{flag} {key}: not a field of the {noun}; choose from: {choices}")
        owner: Any = getattr(target, path[0]) if sectioned else target
        if sectioned:
            fields = [f.name for f in dataclasses.fields(owner)]
            if path[1] not in fields:
                raise ConfigError(
                    f"{flag} {key}: unknown key {path[1]!r} in [{path[0]}]; "
                    f"valid keys: {', '.join(fields)}"
                )
            hint = typing.get_type_hints(type(owner))[path[1]]
        else:
            hint = top[path[0]]
        current = getattr(owner, path[-1])
        scope = f"[{path[0]}] {path[1]}: " if sectioned else ""
        value = _literal(raw)
        if typing.get_origin(hint) is tuple and isinstance(value, str):
            value = [_literal(part.strip()) for part in value.split(",")]
        elif typing.get_origin(hint) is tuple and not isinstance(value, (list, dict)):
            value = [value]  # one item: attention_seq_lens=64
        try:
            value = coerce(value, hint, f"{flag} {key}")
        except ConfigError:
            reason = _reason(value, hint, key, current)
            raise ConfigError(f"{flag} {key}={raw}: {scope}{reason}") from None
        problem = check(key, value) if check else None
        if problem:
            raise ConfigError(f"{flag} {key}={raw}: {problem}")
        changes[path] = value
    return _replace(target, changes)


def _literal(text: str) -> Any:
    """A TOML value, or the text itself when it is not one (bare words need no quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def _kind(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _kind(inner)
    if typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        named = {int: "integers", float: "numbers", str: "strings"}
        return f"comma-separated {named.get(item, _kind(item) + ' values')}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {', '.join(_choices(hint))}"
    if hint is bool:
        return "true or false"
    return getattr(hint, "__name__", str(hint))


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.value).lower()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _reason(value: Any, hint: Any, key: str, current: Any) -> str:
    """Why ``value`` does not fit ``hint``: the enum's choices, or the kind and an example."""
    inner = hint
    if isinstance(hint, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        return f"{value!r} is not one of {_choices(inner)}"
    example = f", e.g. {key}={_shown(current)}" if current not in (None, "", ()) else ""
    return f"expected {_kind(hint)}{example}"


def _replace(target: T, changes: dict[tuple[str, ...], Any]) -> T:
    if not changes:
        return target
    flat = {path[0]: v for path, v in changes.items() if len(path) == 1}
    sections: dict[str, dict[str, Any]] = {}
    for path, v in changes.items():
        if len(path) == 2:
            sections.setdefault(path[0], {})[path[1]] = v
    for name, values in sections.items():
        flat[name] = dataclasses.replace(getattr(target, name), **values)
    return dataclasses.replace(target, **flat)  # type: ignore[type-var]
