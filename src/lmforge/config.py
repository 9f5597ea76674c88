"""Configs: dataclasses, YAML recipes, `key=value` overrides, validation with clear messages.

A run's config is a (possibly nested) dataclass. It is built from, in order:
  1. the dataclass defaults,
  2. a YAML recipe file (optional; errors name the file and line),
  3. `key=value` overrides from the command line (dotted keys reach nested sections).
Every value is checked against the field's type; a dataclass may add range checks in
`__post_init__` by raising ConfigError(field=...).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from lmforge.errors import ConfigError


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a YAML mapping; also return {dotted.key: line number} so errors can point at lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("recipe file not found", file=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a YAML recipe file", file=str(path)) from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError("not a text file (invalid UTF-8): a recipe is YAML", file=str(path), line=line) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML: {problem}", file=str(path), line=line) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError("a recipe must be a mapping of key: value", file=str(path), line=1)
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
    walk(node, "")
    return data, lines


def parse_overrides(items: list[str]) -> dict:
    """['a.b=3', 'name=x'] -> {'a': {'b': 3}, 'name': 'x'} (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            if raw.lstrip().startswith(("{", "[")):  # meant as a mapping / list: say what is wrong with it
                problem = getattr(e, "problem", None) or "invalid YAML"
                raise ConfigError(f"invalid YAML value {raw!r}: {problem}", field=key) from None
            value = raw  # plain text that happens not to be YAML (e.g. a regex): the string itself
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"override '{item}' conflicts with another override", field=key)
        d[parts[-1]] = value
    return out


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check/convert `value` to type `tp`; raise ConfigError naming the field."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, field)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(errors[0] if len(errors) == 1 else f"{value!r} matches none of {tp}", field=field)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{value!r} is not one of {', '.join(map(str, choices))}", field=field)
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", field=field)
        (inner, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, field) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", field=field)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"expected a section (mapping), got {value!r}", field=field)
        return build(tp, value, prefix=field + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"expected true/false, got {value!r}", field=field)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {value!r}", field=field)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))  # accept 1e6, 10_000
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"expected an integer, got {value!r}", field=field)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", field=field)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '3e-4' as a string
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", field=field)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"expected a string, got {value!r}", field=field)
    return value


def build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a dict, checking keys and types."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown key{hint}", field=prefix + k)
        kwargs[k] = _coerce(value, hints[k], prefix + k)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.field and prefix and not e.field.startswith(prefix):
            e.field = prefix + e.field
        raise


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls, recipe: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults <- recipe YAML <- key=value overrides, validated. Errors name file:line and field."""
    data, lines = ({}, {}) if recipe is None else load_yaml(recipe)
    over = parse_overrides(overrides or [])
    try:
        return build(cls, _merge(data, over))
    except ConfigError as e:
        # point at the recipe line when the bad value came from the recipe, not an override
        if recipe is not None and e.file is None and e.field is not None:
            key = e.field
            from_override = _lookup(over, key) is not _MISSING
            if not from_override:
                e.file = str(recipe)
                e.line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
        raise


_MISSING = object()


def _lookup(d: dict, dotted: str):
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return _MISSING
        d = d[p]
    return d


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
