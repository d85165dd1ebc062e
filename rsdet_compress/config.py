"""Flat YAML configs mapped onto typed dataclasses; unknown keys are rejected (ultralytics style)."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text

T = TypeVar("T")


def load_config(path: str | Path, cls: type[T], /, **overrides: Any) -> T:
    """Read a flat YAML into dataclass ``cls``; explicit ``overrides`` (not None) win.

    An unknown key is an error naming the file and the key, with the allowed keys.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(read_text(path, "config file")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a flat mapping of key: value")
    return make_config(cls, data, str(path), **overrides)


def make_config(cls: type[T], values: dict, source: str = "config", /, **overrides: Any) -> T:
    """Build dataclass ``cls`` from ``data`` + non-None ``overrides``, rejecting unknown keys."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    merged = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in merged]
    if missing:
        raise UserError(f"{source}: missing required setting(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    for key, value in merged.items():
        if key not in hints:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and _matches("", hints[key]) \
                and not _matches(value, hints[key]):
            merged[key] = value = str(value)  # `device: 0` is a name written as a number
        if not _matches(value, hints[key]):
            raise UserError(f"{source}: {key}: expected {_describe(hints[key])}, got {value!r}")
    try:
        return cls(**merged)
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None


def _matches(value: Any, tp: Any) -> bool:
    """Whether a YAML/CLI value fits a dataclass field type (``tile: abc`` for an int must not
    reach the code as a string). Ints pass for floats (``warmup_epochs: 2``); bools never pass
    for numbers (YAML ``yes`` is a bool)."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):  # YAML gives lists, the CLI tuples: either container will do
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a type we do not check (Literal, Callable...): the dataclass decides


def _describe(tp: Any) -> str:
    """A field type in words for the error line: 'int', 'float or None', 'list of str'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "None"
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{len(args)} values ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))
