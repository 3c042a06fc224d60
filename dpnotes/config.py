"""Settings of every command: a dataclass filled from a YAML file, then `a.b=value` overrides.

    config = load(TrainConfig, "train/configs/demo_smollm2.yaml", ["privacy.steps=12"])

Strict at every level: a key the dataclass lacks, a value of the wrong type or a missing required
key is a `ConfigError` (a UserError: one line at the terminal) that names where the value came
from (the file, or the command line) and the dotted key, e.g.
`train/configs/x.yaml: unknown key 'privacy.epsilon'; known: privacy.target_epsilon, ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dpnotes.console import add_console_flags
from dpnotes.errors import UserError

COMMAND_LINE = "command line"
INFINITY = ("inf", "+inf", "infinity", ".inf", "∞")


class ConfigError(UserError):
    """A settings problem: a missing or unreadable file, an unknown or missing key, a wrong type."""


# ---- reading ---------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict:
    """The mapping of a YAML config file ({} for an empty one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got a {type(values).__name__}")
    return values


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`a.b=value` strings as one nested mapping; values are read as YAML (`[1, 2]`, `.inf`, `null`)."""
    nested: dict = {}
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"{COMMAND_LINE}: {item!r} is not of the form key.sub=value")
        target = nested
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:  # e.g. a path with a colon: the text itself
            target[leaf] = raw
    return nested


def merge(base: dict, *updates: dict) -> dict:
    """`base` with each update applied in turn; mappings are merged key by key, anything else replaced."""
    merged = dict(base)
    for update in updates:
        for key, value in update.items():
            old = merged.get(key)
            merged[key] = merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return merged


def dotted_keys(values: dict, prefix: str = "") -> set[str]:
    """Every key of a nested mapping, spelled a.b.c (parents included)."""
    keys = set()
    for key, value in values.items():
        keys.add(prefix + str(key))
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys


# ---- building ------------------------------------------------------------------------------------
class Origin:
    """Where the value of a dotted key came from: `overrider` (the command line) for an overridden
    key, else `source` (the file)."""

    def __init__(self, source: str, overridden: set[str] = frozenset(), overrider: str = COMMAND_LINE):
        self.source, self.overridden, self.overrider = source, overridden, overrider

    def of(self, key: str) -> str:
        return self.overrider if key in self.overridden else self.source


def build(cls: type, values: dict, origin: Origin | str = "config", prefix: str = ""):
    """An instance of the dataclass `cls` from a nested mapping, strict about keys and types."""
    origin = Origin(origin) if isinstance(origin, str) else origin
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            known = ", ".join(prefix + name for name in names)
            raise ConfigError(f"{origin.of(prefix + str(key))}: unknown key '{prefix}{key}'; known: {known}")
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values and f.default is f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{origin.source}: missing key '{prefix}{f.name}'")
    return cls(**{key: _coerce(value, hints[key], prefix + key, origin) for key, value in values.items()})


def _coerce(value: Any, annotation: Any, key: str, origin: Origin) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{origin.of(key)}: '{key}' must be {expected}, got {value!r}")

    origin_type, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None:
        if annotation is Any or type(None) in args:
            return None
        raise wrong("set (null is not allowed)")
    if origin_type in (typing.Union, types.UnionType):
        return _coerce(value, next(a for a in args if a is not type(None)), key, origin)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise wrong("a mapping")
        return build(annotation, value, origin, key + ".")
    if origin_type is typing.Literal:
        if value not in args:
            raise wrong("one of " + ", ".join(map(repr, args)))
        return value
    if annotation is list or origin_type is list:
        if not isinstance(value, list):
            raise wrong("a list")
        return [_coerce(item, args[0], f"{key}[{i}]", origin) for i, item in enumerate(value)] if args else value
    if annotation is dict or origin_type is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping")
        return {k: _coerce(v, args[1], f"{key}.{k}", origin) for k, v in value.items()} if args else value
    return _coerce_scalar(value, annotation, wrong)


def _coerce_scalar(value: Any, annotation: Any, wrong: Callable[[str], ConfigError]) -> Any:
    if annotation is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if annotation is float:
        if isinstance(value, str) and value.strip().lower() in INFINITY:
            return math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise wrong("a number")
        try:
            return float(value)  # YAML reads 1e-3 (no dot) as text
        except ValueError:
            raise wrong("a number") from None
    if annotation is str:
        if isinstance(value, (dict, list, bool)):
            raise wrong("a text")
        return str(value)  # a number where text is expected (a name like 2024): its text
    return value


def read_with_overrides(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[dict, Origin]:
    """The values of the YAML file at `path` (None: none) with `a.b=value` overrides applied, and
    where each came from."""
    values = read_yaml(path) if path else {}
    changes = parse_overrides(overrides)
    return merge(values, changes), Origin(str(path) if path else COMMAND_LINE, dotted_keys(changes))


def load(cls: type, path: str | Path | None, overrides: Sequence[str] = ()):
    """`cls` from the YAML file at `path` (None: the defaults) with `a.b=value` overrides applied."""
    return build(cls, *read_with_overrides(path, overrides))


def as_dict(config) -> dict:
    """The config as plain JSON/YAML values (∞ stays a float)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# ---- command lines -------------------------------------------------------------------------------
def yaml_text(value: Any) -> str:
    """A value as it is written in a config file or an override (`.inf`, `null`, `[a, b]`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False).removesuffix("...\n").strip()


def describe(cls: type, defaults: Any = None, prefix: str = "") -> list[str]:
    """One `key = default` line per setting of `cls` (nested dataclasses spelled a.b)."""
    lines = []
    for f in dataclasses.fields(cls):
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            lines.append(f"  {prefix}{f.name}  (required)")
            continue
        if dataclasses.is_dataclass(value):
            lines += describe(type(value), value, f"{prefix}{f.name}.")
        else:
            lines.append(f"  {prefix}{f.name} = {yaml_text(value)}")
    return lines


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, default_config: str | Path | None = None) -> None:
    """`--config FILE`, `a.b=value` overrides, --debug/--verbose, and the keys of `cls` in --help."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    default = f" (default: {default_config})" if default_config else ""
    parser.add_argument("--config", default=str(default_config) if default_config else None,
                        help=f"YAML file of the settings below{default}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings over the file's")
    add_console_flags(parser)
    parser.epilog = "settings (YAML keys, or key.sub=value) and their defaults:\n" + "\n".join(describe(cls))


def command_parser(cls: type, description: str | None, default_config: str | Path | None = None,
                   prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, cls, default_config)
    return parser
