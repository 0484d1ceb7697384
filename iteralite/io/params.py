"""params.yaml sections parsed into config dataclasses, with errors that name the key.

Every stage reads its section through `load_section`, so an unknown key, a wrong type or an
out-of-range value stops the stage before any work, with the key and the allowed values named.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import stat
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from iteralite.io.errors import ParamsError

T = TypeVar("T")


# The top-level sections params.yaml may have; `pipeline.sections.SECTIONS` maps each to the class
# that parses it (a test keeps the two equal). Kept here so reading a file needs no config class.
SECTION_NAMES = ("data", "tokenizer", "model", "train", "eval", "calibrate", "int4", "qat", "prune", "finetune",
                 "student", "mixed_precision", "fuse", "benchmark")
MAX_PARAMS_BYTES = 1 << 20  # the repository's params.yaml is ~7 KB; a 10 MB one costs every stage ~30 s


class _ParamsLoader(yaml.SafeLoader):
    """safe_load without aliases: `*name` (and so a "billion laughs" alias bomb) is refused."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: YAML aliases (*{self.peek_event().anchor}) are not "
                                 "supported in params; write the value out")
        return super().compose_node(parent, index)


def _check_unique_keys(node: yaml.Node, where: str, path: Path) -> None:
    """A ParamsError naming the first key that appears twice in one mapping (YAML loaders keep the
    last silently)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{where}[{i}]", path)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key, value in node.value:
        name = str(key.value)
        full = f"{where}.{name}" if where else name
        if name in seen:
            raise ParamsError(f"params: {path}: '{full}' is given twice (lines {seen[name]} and "
                              f"{key.start_mark.line + 1}); keep one")
        seen[name] = key.start_mark.line + 1
        _check_unique_keys(value, full, path)


def read_params(path: str | Path = "params.yaml") -> dict:
    """The params file as a mapping of known sections. Refused with one line: a missing, oversized
    or non-UTF-8 file, invalid YAML, YAML aliases, a key given twice at any level, and an unknown
    top-level section (named, with the closest known one)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    except OSError as e:
        raise ParamsError(f"{path}: cannot read the params file: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ParamsError(f"{path}: not a regular file (pass the params file, e.g. params.yaml)")
    if st.st_size > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: {st.st_size:,} bytes; a params file may hold at most "
                          f"{MAX_PARAMS_BYTES:,} bytes (1 MiB)")
    try:
        text = path.read_bytes()[:MAX_PARAMS_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise ParamsError(f"{path}: cannot read the params file: {e.strerror}") from None
    loader = None
    try:
        loader = _ParamsLoader(text)  # its reader already refuses control characters (NUL, DEL)
        node = loader.get_single_node()
        if node is not None:
            _check_unique_keys(node, "", path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {_clip(' '.join(str(e).split()))}") from None
    except RecursionError:
        raise ParamsError(f"{path}: values nested too deeply to be params (a section holds plain "
                          f"values and lists)") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    for name in data:
        if name not in SECTION_NAMES:
            close = difflib.get_close_matches(str(name), SECTION_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ParamsError(f"params: {path}: unknown section '{name}'{hint}; known sections: "
                              f"{', '.join(SECTION_NAMES)}")
    return data


def _clip(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters (a message stays one short line whatever the value)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value: Any) -> str:
    """How a wrong value is named in a message: "the string '0.1'", "the int 3", "None"."""
    if value is None:
        return "None"
    try:
        shown = _clip(repr(value))
    except RecursionError:
        shown = "(nested too deeply to show)"
    if isinstance(value, (list, tuple)):
        return f"a list {shown}"
    if isinstance(value, dict):
        return f"a mapping {shown}"
    kind = {str: "string", bool: "boolean"}.get(type(value), type(value).__name__)
    return f"the {kind} {shown}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _item_noun(tp: Any) -> str:
    """'numbers' for float, 'integers' for int, ...: what a list's items must be."""
    return {float: "numbers", int: "integers", str: "strings", bool: "booleans"}.get(tp) or _type_name(tp)


class _Mismatch(Exception):
    """`value` is not of the expected type; the caller words the message (it knows the key)."""


def _to_float(value: Any) -> float:
    """int, float, or a string that parses as a float -> float. YAML 1.1 (PyYAML) reads `3e-3` (no
    dot) as the string '3e-3', so a numeric string is taken as the number it spells."""
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _convert(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (floats from ints and numeric strings), or _Mismatch. Lists are checked
    item by item by `_check_value`, which names the offending item."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # An exact match first, so '8' stays a string in list[int | str]; then conversions.
        for a in args:
            if a is not float and _exact(value, a):
                return value
        for a in args:
            try:
                return _convert(value, a)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        return [_convert(v, args[0] if args else Any) for v in value]
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if tp is float:
        return _to_float(value)
    if not isinstance(tp, type):  # a typing construct params never use: not checked here
        return value
    if _exact(value, tp):
        return value
    raise _Mismatch


def _exact(value: Any, tp: Any) -> bool:
    """`value` is already of the plain type `tp` (a bool is not an int)."""
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return isinstance(value, tp)
    return False


def _check_finite(value: Any, key: str) -> None:
    """Every float a field holds (itself or its list items) must be finite: `.inf` and `.nan` are
    valid YAML but never a valid setting."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"params: '{key}' must be a finite number, got {_clip(repr(value))}")
    if isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, float) and not math.isfinite(v):
                raise ParamsError(f"params: '{key}' items must be finite numbers; item {i} is {v}")


def _check_value(value: Any, tp: Any, key: str, meta: typing.Mapping = types.MappingProxyType({})) -> Any:
    """`value` converted to the field type `tp`, or a ParamsError naming `key` (and, for a list,
    the first item of a wrong type). `meta`: the field's metadata; "items" names a list's items in
    messages; "as_written": True refuses numeric strings as items (their text names outputs)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(rest) < len(typing.get_args(tp)):
            return None
        if len(rest) == 1:  # `X | None`: a value is checked (and worded) as an X
            return _check_value(value, rest[0], key, meta)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            what = f"params: '{key}' must be a list of {meta.get('items') or _item_noun(inner)}"
            if isinstance(value, (str, int, float)):  # e.g. `dvc exp run -S key=0.3` writes a scalar
                example = f"[{value}]"
                raise ParamsError(f"{what}, e.g. {example} (with dvc exp run: -S '{key}={example}'); "
                                  f"got {_describe(value)}")
            raise ParamsError(f"{what}, got {_describe(value)}")
        out = []
        for i, v in enumerate(value):
            if meta.get("as_written") and isinstance(v, str):
                raise ParamsError(
                    f"params: '{key}' items must be {_item_noun(inner)}; item {i} is {_describe(v)} (each one "
                    "names its DVC outputs as written, so it must be a plain YAML number such as 0.1, "
                    "not quoted and without an exponent)")
            try:
                out.append(_convert(v, inner))
            except _Mismatch:
                raise ParamsError(f"params: '{key}' items must be {_item_noun(inner)}; item {i} is "
                                  f"{_describe(v)}") from None
        _check_finite(out, key)
        return out
    try:
        out = _convert(value, tp)
    except _Mismatch:
        hint = ""
        if tp is int and isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                hint = f" (a string: YAML reads {value} as text; write {int(f)})"
        raise ParamsError(f"params: '{key}' must be {_type_name(tp)}, got {_clip(repr(value))}{hint}") from None
    _check_finite(out, key)
    return out


def from_dict(cls: type[T], raw: dict | None, section: str) -> T:
    """Build dataclass `cls` from `raw`, failing on unknown keys and wrong types.

    Missing keys take the dataclass defaults. Floats accept ints and numeric strings (YAML 1.1
    reads `3e-3` as a string; so do list items, unless the field's metadata says "as_written")
    and must be finite; a list error names its first item of a wrong type.
    After construction the dataclass's own `validate()` (if any) checks ranges and raises
    ParamsError.
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
    kwargs = {name: _check_value(value, hints[name], f"{section}.{name}", fields[name].metadata)
              for name, value in raw.items()}
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
