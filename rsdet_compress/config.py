"""Flat YAML configs mapped onto typed dataclasses; unknown keys are rejected (ultralytics style)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rsdet_compress.errors import UserError

T = TypeVar("T")


def load_config(path: str | Path, cls: type[T], /, **overrides: Any) -> T:
    """Read a flat YAML into dataclass ``cls``; explicit ``overrides`` (not None) win.

    An unknown key is an error naming the file and the key, with the allowed keys.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
    try:
        return cls(**merged)
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None
