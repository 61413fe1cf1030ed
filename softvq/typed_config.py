"""Dataclass configs built from YAML, JSON and command-line values with every field checked.

:func:`strict_fields` builds a (nested) config dataclass from a mapping, refusing unknown keys and
values of the wrong type by their dotted key; :func:`check_field_types` checks one built in Python.
The tokenizer's, the training's, the objective's and the generators' configs all go through them,
so every config error reads the same way.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal


class UnknownNameError(KeyError, ValueError):
    """An unknown preset or size name. A KeyError for lookups; a ValueError too, so the command
    line reports it in one line like any other bad value."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError would quote the message


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type. A TypeError for Python callers; a ValueError too, so the
    command line's one-line error handling catches it with the range errors."""


def strict_fields(cls: type, values: Any, path: str = "", what: str = "config") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, recursing into nested dataclasses and checking
    every value against its annotation; errors name the dotted key and what it accepts.

    Unknown keys are a ValueError naming them and the valid ones; a value of the wrong type is a
    :class:`ConfigTypeError`. Whole numbers given as floats (``8.0``, as YAML may write them)
    become ints."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ConfigTypeError(f"config section {path or '<root>'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {what} key {', '.join(prefix + k for k in unknown)}; valid keys"
            f"{' under ' + path if path else ''}: {', '.join(sorted(known))}"
        )
    return cls(**{key: typed_value(hints[key], value, prefix + key) for key, value in values.items()})


def check_field_types(obj: Any, path: str = "") -> None:
    """Check (and normalise, as :func:`strict_fields` does) every field of a dataclass instance
    built in Python, nested dataclasses included."""
    hints = typing.get_type_hints(type(obj))
    prefix = f"{path}." if path else ""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_field_types(value, prefix + f.name)
        else:
            setattr(obj, f.name, typed_value(hints[f.name], value, prefix + f.name))


def typed_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against the annotation ``hint``; nested dataclasses are built from mappings."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return typed_value(arg, value, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ConfigTypeError(errors[0] if errors else f"{key} cannot be null")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return strict_fields(hint, value, key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [typed_value(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigTypeError(f"{key} must be a mapping, got {value!r}")
        if len(args) == 2:
            return {k: typed_value(args[1], v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if hint in _SCALARS:
        accepts, what = _SCALARS[hint]
        if not accepts(value):
            raise ConfigTypeError(f"{key} must be {what}, got {value!r}")
        return hint(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # YAML's true is not 1


# Scalar field type -> (does a YAML / command-line / Python value fit it, how the error describes it).
_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: _is_number(v) and float(v).is_integer(), "an integer"),
    # inf / nan would pass every range check (nan compares false) and surface as non-finite losses
    float: (lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def check_ranges(rows: Iterable[tuple[str, Any, bool, str]]) -> None:
    """Refuse the first ``(key, value, holds, what)`` row whose condition does not hold, as
    "key must be what, got value": one table of ranges per config, read top to bottom."""
    for key, value, holds, what in rows:
        if not holds:
            raise ValueError(f"{key} must be {what}, got {repr(value) if isinstance(value, str) else value}")
