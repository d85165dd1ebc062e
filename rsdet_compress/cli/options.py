"""Command-line flags generated from the config dataclasses: one source of names, types, defaults and help.

``add_config_args(parser, TrainConfig)`` adds ``--field-name`` for every field
of the dataclass:

* the type comes from the annotation (``int | None`` -> ``int``); ``bool``
  gives ``--flag/--no-flag``; a list or tuple is one comma-separated value
  (``--split 0.8,0.1,0.1``); a ``dict`` field has no flag;
* the default is ``None``, so a flag that is not given leaves the value to the
  config file or the dataclass default (the one place defaults live), and
  :func:`rsdet_compress.config.make_config` drops it;
* the help is the field's ``#:`` comment above it (or its trailing ``#``
  comment, or ``field(metadata={"help": ...})``), read from the class source;
* ``choices`` name a registry (a callable returning the names) shown in the
  help. They are read only when the help is printed: the registries live
  beside torch and ultralytics, which a command that does not need them must
  not import. Bad values are refused by the library itself, with its one-line
  ``error:`` naming the choices.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any

from rsdet_compress.cli import comma_list

_FIELD = re.compile(r"^(\w+)\s*:[^=]+?(?:=.*?)?(?:\s+#\s*(?P<tail>.*))?$")
_TYPE_WORDS = {int: "integers", float: "numbers", str: "names"}


class ChoicesHelp(str):
    """A help text whose ``%(choices)s`` is filled from a registry only when argparse formats the help."""

    choices: Callable[[], Iterable[str]]

    def __new__(cls, text: str, choices: Callable[[], Iterable[str]]) -> ChoicesHelp:
        obj = super().__new__(cls, text)
        obj.choices = choices
        return obj

    def __mod__(self, params: Any) -> str:
        return str.__mod__(str(self), {**params, "choices": ", ".join(map(str, self.choices()))})


@cache
def field_help(cls: type) -> dict[str, str]:
    """Field name -> its documentation comment in ``cls``'s source (``#:`` lines above it, else the trailing
    ``# ...`` on its line), base dataclasses' fields included; ``field(metadata={"help": ...})`` wins."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_own_field_help(base))
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            out[f.name] = f.metadata["help"]
    return out


def _own_field_help(cls: type) -> dict[str, str]:
    """The comments of the fields written in ``cls``'s own class body."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):
        lines = []
    out: dict[str, str] = {}
    pending: list[str] = []
    for raw in lines[1:]:  # past "class X:"
        line = raw.strip()
        if not raw.startswith((" ", "\t")) or line.startswith(("def ", "@")):
            if line.startswith(("def ", "@")):
                break
            continue
        if line.startswith("#:"):
            pending.append(line[2:].strip())
            continue
        m = _FIELD.match(line)
        if m and not line.startswith("#"):
            text = " ".join(pending) or (m.group("tail") or "").strip()
            if text:
                out[m.group(1)] = text
        if not line.startswith("#"):
            pending = []
    return out


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flag_name(field: str, rename: Mapping[str, str] | None = None) -> str:
    """``--field-name`` (or the renamed flag) of a config field."""
    return "--" + (rename or {}).get(field, field).replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = (),
                    choices: Mapping[str, Callable[[], Iterable[str]]] | None = None,
                    rename: Mapping[str, str] | None = None, texts: Mapping[str, str] | None = None,
                    extra: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add ``--field-name`` for every field of dataclass ``cls`` (see the module docstring).

    ``skip``: fields without a flag; ``choices``: field -> callable returning the allowed names (help only);
    ``rename``: field -> flag name when the flag is older than the field (``batches`` -> ``--batch``);
    ``texts``: field -> help text where the command line needs other words than the field's comment;
    ``extra``: field -> argparse keywords that replace the generated ones (``action="append"``...).
    """
    hints = typing.get_type_hints(cls)
    comments = field_help(cls)
    skip, choices, texts, extra = set(skip), choices or {}, texts or {}, extra or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _unwrap(hints[f.name])
        origin = typing.get_origin(tp)
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        if rename and f.name in rename and tp is not bool:
            kw["metavar"] = rename[f.name].upper()
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            item = next((a for a in typing.get_args(tp) if a is not Ellipsis), str)
            kw["type"] = comma_list(item, _TYPE_WORDS.get(item, "values"))
        elif tp is dict or origin is dict:
            if f.name not in extra:
                continue  # a mapping has no flag: it comes from the config file
        elif tp in (int, float):
            kw["type"] = tp
        text = texts.get(f.name, comments.get(f.name, "")).replace("%", "%%")
        if f.name in choices:
            kw["metavar"] = "NAME"
            text = ChoicesHelp(f"{text.rstrip('.')} (one of: %(choices)s)" if text else "one of: %(choices)s",
                               choices[f.name])
        kw["help"] = text or None
        kw.update(extra.get(f.name, {}))
        parser.add_argument(flag_name(f.name, rename), **kw)
