"""Typed configuration: dataclasses built from plain dicts, with errors that name the key.

Every component owns a config dataclass for its own slice; a recipe is a tree of them. ``build`` turns
a nested dict (YAML, overrides) into that tree and refuses anything it does not understand:

- an unknown key fails with its dotted name and the nearest valid key (``optim.lrr`` -> ``optim.lr``);
- a wrong type fails with the expected type (ints are accepted where floats are expected);
- a missing required value (a field without a default) fails with its dotted name.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

# decimal or scientific notation: YAML 1.1 (PyYAML) reads "3e-3" or "1e4" as strings, not floats
_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not match the typed config; the message names the key."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: null is not allowed, expected {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            near = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{key}: {value!r} is not one of {choices}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def build(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking every key and type (see module docstring)."""
    data = dict(data or {})
    # a field whose name is a Python keyword is spelled otherwise in recipes: metadata {"key": "from"} on ``from_``
    fields = {_key(f): f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.5)
        hint = f"; did you mean '{dotted(near[0])}'?" if near else f"; valid keys: {', '.join(sorted(fields))}"
        raise ConfigError(f"unknown key '{dotted(k)}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[f.name] = _convert(data[name], hints[f.name], dotted(name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required value '{dotted(name)}' ({_type_name(hints[f.name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=3e-4'`` -> (['optim', 'lr'], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


_NEUTRAL = "anyloom.fingerprint_neutral"


def added_field(default: Any, *, neutral: Any = dataclasses.MISSING) -> Any:
    """A dataclass field added to a config after run directories were written with it.

    While the field holds ``neutral`` (the behaviour before the field existed; its default unless given) it is
    left out of ``fingerprint``, so existing runs keep their fingerprints and are not retrained or refused
    because a new option appeared. ``neutral`` is fixed apart from the default on purpose: a later change of
    the default changes the fingerprint of every run that relies on it.
    """
    neutral = default if neutral is dataclasses.MISSING else neutral
    return dataclasses.field(default=default, metadata={_NEUTRAL: to_dict(neutral)})


def _key(f: dataclasses.Field) -> str:
    """A field's key in recipes and saved configs: its name, or the spelling its metadata gives (``from``)."""
    return f.metadata.get("key", f.name)


def _is_neutral(f: dataclasses.Field, view: Any) -> bool:
    """Whether ``f`` is an ``added_field`` whose value (as ``significant`` writes it) is its neutral one."""
    return _NEUTRAL in f.metadata and view == f.metadata[_NEUTRAL]


def significant(obj: Any) -> Any:
    """``to_dict(obj)`` without the added fields that hold their neutral value: what identifies a config (its
    fingerprint, or a folder named after it) without changing when a new option appears."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        views = {f: significant(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {_key(f): view for f, view in views.items() if not _is_neutral(f, view)}
    if isinstance(obj, (list, tuple)):
        return [significant(v) for v in obj]
    if isinstance(obj, dict):
        return {k: significant(v) for k, v in obj.items()}
    return obj


def config_diff(saved: dict[str, Any], current: Any) -> list[str]:
    """Dotted keys where ``saved`` (a config written earlier as ``to_dict``) and the dataclass ``current`` differ.
    An ``added_field`` that ``saved`` lacks counts as equal while ``current`` holds its neutral value."""
    here = {_key(f): f for f in dataclasses.fields(current)}
    out = []
    for key in sorted(set(saved) | set(here)):
        f = here.get(key)
        if f is None or key not in saved:
            if f is None or not _is_neutral(f, significant(getattr(current, f.name))):
                out.append(key)
            continue
        value = getattr(current, f.name)
        if dataclasses.is_dataclass(value) and isinstance(saved[key], dict):
            out += [f"{key}.{k}" for k in config_diff(saved[key], value)]
        elif to_dict(value) != saved[key]:
            out.append(key)
    return out


def fingerprint(obj: Any) -> str:
    """A short stable hash of a config (dataclass or plain data) for caches keyed on configuration; fields made
    with ``added_field`` count only when they leave their neutral value."""
    import hashlib
    import json

    blob = json.dumps(significant(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


__all__ = ["ConfigError", "build", "to_dict", "parse_override", "set_dotted", "deep_merge", "added_field",
           "config_diff", "fingerprint", "significant"]
