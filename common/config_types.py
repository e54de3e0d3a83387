"""Values from JSON checked against the annotations of config dataclasses: `check_types(cls, data, where=...)`.

One checker, driven by `typing.get_type_hints`, for every place a config arrives as untyped data: `--config
FILE` (common/config_cli.py) and the backend options of a teacher (teachers/backend_options.py). It never
guesses: JSON's `"false"` is a string, not a bool, and `3.5` is not an integer (see `check_types`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from common.errors import ConfigError


def check_types(cls: type, data: dict[str, Any], *, where: str, prefix: str = "") -> dict[str, Any]:
    """`data` (a JSON object of dataclass `cls`'s fields, nested configs as objects) checked against the
    fields' annotations, with JSON numbers and lists as the fields declare them (an integer in a float field
    becomes a float, a list in a tuple field a tuple), so a replayed config equals the one it names.

    JSON is loosely typed and Python's truthiness looser: `"false"` is a true value and `3.5` steps would run
    4, so nothing is converted that JSON does not already say. The rules, from `typing.get_type_hints`: a bool
    is a JSON boolean; an int a JSON integer (not a boolean, not 3.0); a float any JSON number; a str a
    string; `X | None` also null; lists and tuples element by element (a fixed tuple also by length);
    `Literal` one of its members; a nested config an object with only its own fields; `dict[str, V]` an
    object of V. ConfigError on the first violation: `where`, the dotted field path (`storage.output`,
    `optim.betas[1]`), the expected type and the value."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    return {name: _typed(hints[name], value, where=where, path=f"{prefix}{name}") for name, value in data.items()}


class _WrongType(Exception):
    """A value does not fit one alternative of a union (caught while the others are tried)."""


def _typed(tp: Any, value: Any, *, where: str, path: str) -> Any:
    """`value` checked against annotation `tp` (see check_types); ConfigError naming `path` otherwise."""
    try:
        return _fit(tp, value, where=where, path=path)
    except _WrongType:
        raise ConfigError(f"{where}: field {path} must be {_describe(tp)}, got {_show(value)}") from None


def _fit(tp: Any, value: Any, *, where: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in args:
            try:
                return _fit(alt, value, where=where, path=path)
            except (_WrongType, ConfigError):  # this alternative does not fit; the union's message names all
                continue
        raise _WrongType
    if tp is typing.Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _WrongType
    if origin is typing.Literal:
        # compared with their types: True == 1 and 1.0 == 1 in Python, not in a config
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _WrongType
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _WrongType
        return check_types(tp, value, where=where, prefix=f"{path}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _WrongType
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _WrongType
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond float's range
                raise _WrongType from None
        raise _WrongType
    if tp is str:
        if isinstance(value, str):
            return value
        raise _WrongType
    container = origin or tp
    if container in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        if container is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: fixed length
            if len(value) != len(args):
                raise _WrongType
            kinds = args
        else:
            kinds = (args[0] if args else typing.Any,) * len(value)
        items = [_typed(k, v, where=where, path=f"{path}[{i}]") for i, (k, v) in enumerate(zip(kinds, value, strict=True))]
        return tuple(items) if container is tuple else items
    if container is dict:
        if not isinstance(value, dict):
            raise _WrongType
        inner = args[1] if len(args) == 2 else typing.Any  # JSON object keys are always strings
        return {k: _typed(inner, v, where=where, path=f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"config field {path}: no type check for the annotation {tp!r}")  # a new kind of field: a bug


def _describe(tp: Any) -> str:
    """The JSON a field of annotation `tp` takes, in words (`a list of 2 numbers or null`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = list(dict.fromkeys(_describe(a) for a in args))
        if "an object" in parts:  # typed option classes beside a plain dict: any object, checked by the owner
            parts = [p for p in parts if not p.startswith("an object (")]
        return " or ".join(parts)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"an object ({tp.__name__})"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    container = origin or tp
    if container in (list, tuple):
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return "a list [" + ", ".join(_describe(a) for a in args) + "]"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if container is dict:
        return "an object"
    return "anything" if tp is typing.Any or tp is object else getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    names = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    return names.get(tp) or f"values that are each {_describe(tp)}"


def _show(value: Any) -> str:
    """`value` as the JSON it came from, cut short so the error stays one line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
