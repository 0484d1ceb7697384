"""params.yaml sections parsed into config dataclasses, with errors that name the key.

Every stage reads its section through `load_section`, so an unknown key, a wrong type or an
out-of-range value stops the stage before any work, with the key and the allowed values named.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from iteralite.io.errors import ParamsError

T = TypeVar("T")


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the repository root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type[T], raw: dict | None, section: str) -> T:
    """Build dataclass `cls` from `raw`, failing on unknown keys and wrong types.

    Missing keys take the dataclass defaults. After construction the dataclass's own
    `validate()` (if any) checks ranges and raises ParamsError.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"params: section '{section}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ParamsError(
                f"params: unknown key '{section}.{key}'{hint}; allowed keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if not _type_ok(value, tp):
            raise ParamsError(
                f"params: '{section}.{name}' must be {_type_name(tp)}, got {value!r}"
            )
        if tp is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(section)
    return obj


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    return from_dict(cls, read_params(path).get(section), section)


def check(cond: bool, section: str, key: str, msg: str) -> None:
    """Raise a ParamsError naming `section.key` unless `cond` holds."""
    if not cond:
        raise ParamsError(f"params: '{section}.{key}' {msg}")
