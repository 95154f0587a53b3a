"""Turn YAML recipes and ``key.sub=value`` overrides into typed dataclasses.

Validation is strict because a typo in a recipe should fail before any compute
is spent: an unknown key names the closest valid key, a wrong type names the
expected type, and both say which file the key came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from posttrain.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a dict, with a user-facing error on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist.", hint="Run `posttrain recipes` to list the shipped recipes.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe file {str(path)!r} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe file {str(path)!r} is not UTF-8 text (byte {err.start + 1}: {err.reason}); "
                          "re-save it as UTF-8.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted override set (keys are checked later)."""
    result = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against type ``tp``; return it converted (dataclass, float from int)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where} in {source} must be {_type_name(tp)}, got {value!r}.{hint}")
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, where, source)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where} in {source} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where} in {source} must be null, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} in {source} must be a mapping of keys, got {value!r}.")
        return from_dict(tp, value, source=source, prefix=where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} in {source} must be {_type_name(tp)}, got {value!r}.")
        (inner,) = get_args(tp) or (Any,)
        return [_convert(v, inner, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} in {source} must be a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where} in {source} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "the recipe", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else (
                "Valid keys here: " + ", ".join(sorted(fields)) + "."
            )
            raise ConfigError(f"unknown key {where!r} in {source}.", hint=hint)
        kwargs[key] = _convert(value, hints[key], where, source)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or 'the recipe'} in {source} is incomplete: {err}.") from None
    for name in fields:  # sections left at their defaults are checked too (e.g. a missing model.path)
        value = getattr(obj, name)
        if name not in data and dataclasses.is_dataclass(value) and hasattr(value, "validate"):
            value.validate(source)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(source)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree to plain dict (for saving the resolved recipe next to a run)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, schema: type[T] | None = None) -> T:
    """Read a recipe, apply overrides and validate it against its trainer's schema.

    The schema is looked up from the recipe's ``trainer`` key unless given.
    """
    data = apply_overrides(read_yaml(path), list(overrides or []))
    source = str(path)
    if schema is None:
        from posttrain.trainers import recipe_schema

        schema = recipe_schema(data.get("trainer"), source)
    return from_dict(schema, data, source=source)


def field_docs(cls: type) -> dict[str, str]:
    """The ``help`` metadata of each field, for generated docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

