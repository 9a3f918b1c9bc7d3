"""Presets, user config files and ``--set`` overrides, merged into one raw config dict.

Layering (later wins): the preset shipped in ``harness/presets/<name>.toml`` < ``--config FILE``
< ``--set key=value``. ``[[overrides]]`` lists concatenate, whether they come from the file or
from ``--set overrides=[...]``. A ``--set`` of a task or estimator parameter also wins over every
per-variant value and every matching ``[[overrides]]`` entry: ``set_layer`` hands those values to
``harness.matrix``, which applies them last. Keys are checked against what the plugins declare
later, in ``harness.matrix``; this module only knows the top-level shape.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from harness.errors import ConfigError

__all__ = ["TOP_LEVEL", "load_config", "parse_set", "preset_names", "set_layer"]

#: The only top-level tables a config may hold.
TOP_LEVEL = ("matrix", "tasks", "estimators", "overrides", "diagnostics", "tuning")


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("harness.presets").iterdir()
        if p.name.endswith(".toml")
    )


def _read_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    text = resources.files("harness.presets").joinpath(f"{name}.toml").read_text()
    return tomllib.loads(text)


def _read_file(path: Path) -> dict[str, Any]:
    name = repr(str(path))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name} is a folder; give a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config file {name} is not readable (permission denied)") from None
    except OSError as e:
        raise ConfigError(f"config file {name} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {name} is not UTF-8 text (byte {e.start}); TOML is UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {name} is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """Deep-merge tables; lists and scalars replace; top-level ``overrides`` lists concatenate."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if top and key == "overrides" and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = [*out[key], *copy.deepcopy(value)]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """``tasks.identity.steps=100`` -> (["tasks", "identity", "steps"], 100); TOML values, else text."""
    key, sep, raw = item.partition("=")
    path = [p.strip() for p in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. tasks.identity.steps=100"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return path, value


def _apply_set(config: dict[str, Any], item: str) -> None:
    path, value = parse_set(item)
    node: Any = config
    for part in path[:-1]:
        node = node.get(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a table")
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    merged = _merge(config, nested)  # a table merges into a table, as a config file's does
    config.clear()
    config.update(merged)


def set_layer(sets: list[str] | tuple[str, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """The task and estimator parameters given with ``--set``: ``{"tasks": {name: {key: value}},
    "estimators": {...}}``. ``harness.matrix`` applies them after variants and overrides, so that
    ``--set`` wins over every preset and config value. ``variants`` is structure, not a value."""
    layer: dict[str, Any] = {}
    for item in sets:
        _apply_set(layer, item)
    forced: dict[str, dict[str, dict[str, Any]]] = {"tasks": {}, "estimators": {}}
    for scope, sections in forced.items():
        tables = layer.get(scope)
        if not isinstance(tables, dict):
            continue  # not a table: harness.matrix names the problem
        for name, section in tables.items():
            if isinstance(section, dict):
                sections[name] = {k: v for k, v in section.items() if k != "variants"}
    return forced


def load_config(
    preset: str, config_file: Path | None = None, sets: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """The raw merged config; unknown top-level tables are an error here, the rest in ``matrix``."""
    config = _read_preset(preset)
    if config_file is not None:
        config = _merge(config, _read_file(config_file))
    for item in sets:
        _apply_set(config, item)
    unknown = sorted(set(config) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"unknown config table {unknown[0]!r}; allowed: {', '.join(TOP_LEVEL)}")
    return config
