"""Settings declared once: a dataclass field with its help, choices and range.

A variant's own settings (and the common ones in :class:`~ppl_cluster.config.FitConfig`) are
dataclass fields made with :func:`setting`. Everything else is derived from that declaration:
validation (:func:`check`, a :class:`~ppl_cluster.errors.ConfigError` naming the setting), the
``fit`` flags (:func:`add_flags`), ``Clusterer`` keywords, ``config.json`` and the resume
comparison (the dataclass as a dict).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

from .errors import ConfigError

_LISTS = (list, tuple)


def setting(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
            minimum: float | None = None, above: float | None = None,
            maximum: float | None = None, group: str | None = None) -> Any:
    """A dataclass field declaring one setting.

    ``choices``: allowed values (of each element, for a list); ``minimum``/``maximum``: the
    smallest/largest allowed value (inclusive), ``above``: exclusive lower bound (numbers are
    always finite); ``group``: the common settings a variant must opt into (see
    ``Variant.uses``) to get them as flags.
    """
    meta = {"help": help, "choices": choices, "minimum": minimum, "above": above,
            "maximum": maximum, "group": group}
    if isinstance(default, _LISTS):
        return dataclasses.field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _kind(cls: type, name: str) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of field ``name``."""
    tp = typing.get_type_hints(cls)[name]
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) in _LISTS:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def declared(cls: type) -> dict[str, dataclasses.Field]:
    """The settings of dataclass ``cls`` (fields made with :func:`setting`), by name."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def _describe(kind: type, meta: dict[str, Any]) -> str:
    if meta["choices"]:
        return " or ".join(map(str, meta["choices"]))
    what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
    bounds = [f"{sign} {v:g}" if isinstance(v, float) else f"{sign} {v}"
              for sign, v in ((">=", meta["minimum"]), (">", meta["above"]),
                              ("<=", meta.get("maximum"))) if v is not None]
    return " ".join([what, " and ".join(bounds)]) if bounds else what


def _one(value: Any, kind: type, meta: dict[str, Any]) -> Any:
    """``value`` as ``kind`` if it is one within range, else raise ValueError."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    ok = ok and (meta["choices"] is None or value in meta["choices"])
    ok = ok and (meta["minimum"] is None or value >= meta["minimum"])
    ok = ok and (meta["above"] is None or value > meta["above"])
    ok = ok and (meta.get("maximum") is None or value <= meta["maximum"])
    if not ok:
        raise ValueError
    return value


def check(obj: Any) -> None:
    """Validate (and normalise, e.g. int to float) every declared setting of ``obj`` in place."""
    for name, f in declared(type(obj)).items():
        kind, is_list, optional = _kind(type(obj), name)
        value = getattr(obj, name)
        if value is None and optional:
            continue
        try:
            if is_list:
                if not isinstance(value, _LISTS) or not value:
                    raise ValueError
                value = [_one(v, kind, f.metadata) for v in value]
            else:
                value = _one(value, kind, f.metadata)
        except ValueError:
            what = _describe(kind, f.metadata)
            what = f"a list of {what.removeprefix('an ').removeprefix('a ')}" if is_list else what
            raise ConfigError(f"{name} must be {what}, got {value!r}", setting=name) from None
        setattr(obj, name, value)


def build(cls: type, values: dict[str, Any], owner: str) -> Any:
    """``cls(**values)`` validated; an unknown key raises ConfigError naming ``owner``."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"{name} is not a setting of {owner}", setting=name)
    obj = cls(**values)
    check(obj)
    return obj


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_of(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        items = [v.strip() for v in text.split(",") if v.strip()]
        try:
            return [kind(v) for v in items] if items else _fail(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}") from None
    return parse


def _fail(text: str) -> list[Any]:
    raise ValueError(text)


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, names: list[str] | None = None,
              defaults: dict[str, Any] | None = None, hidden: bool = False) -> None:
    """One flag per declared setting of ``cls`` (or those in ``names``), each defaulting to None
    so that what the user gave can be told from what the variant sets. ``defaults``: the values
    shown in the help (the variant's, which may differ from the declaration's); ``hidden``:
    accepted but left out of --help."""
    shown = defaults or {}
    for name, f in declared(cls).items():
        if names is not None and name not in names:
            continue
        kind, is_list, _ = _kind(cls, name)
        meta = f.metadata
        default = shown.get(name, f.default if f.default is not dataclasses.MISSING
                            else f.default_factory())  # type: ignore[misc]
        text = meta["help"]
        if default is not None:
            text += f" (default {','.join(map(str, default)) if is_list else default})"
        kwargs: dict[str, Any] = {"default": None, "dest": name,
                                  "help": argparse.SUPPRESS if hidden else text}
        if kind is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kwargs["type"] = _list_of(kind)
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = kind
            if meta["choices"]:
                kwargs["choices"] = list(meta["choices"])
        parser.add_argument(flag(name), **kwargs)


def key_value(text: str) -> tuple[str, Any]:
    """A flag's KEY=VALUE, with VALUE read as an integer, a number, true/false, or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: Any = raw.strip()
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return key.strip(), value
