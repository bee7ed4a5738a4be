"""Experiment configs: load one by name or path, apply `--config.a.b=value` overrides.

Errors here are the first line of defence: a missing file, a config that does not build, an
unknown key or a wrong type all fail before anything runs, naming the problem and the fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from solo.config import ConfigError, to_json  # noqa: F401  (re-exported)

EXPERIMENTS_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    names = (p.stem for p in EXPERIMENTS_DIR.glob("*.py"))
    return sorted(n for n in names if not n.startswith("_") and n != "base")


def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = EXPERIMENTS_DIR / f"{name_or_path}.py"
    if not path.is_file():
        near = difflib.get_close_matches(Path(name_or_path).stem, available(), n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise ConfigError(
            f"config file not found: {name_or_path}.{hint} Available: {', '.join(available())}"
        )
    return path


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ConfigDict:
    """Builds the config from an experiment file (path or name in experiments/), then overrides."""
    path = _resolve(name_or_path)
    spec = importlib.util.spec_from_file_location(f"solo_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config {path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any failure while building the config is the user's
        raise ConfigError(f"config {path} failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {path} defines no get_config(); every experiment must")
    try:
        config = module.get_config()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"config {path}: get_config() failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"config {path}: get_config() must return an ml_collections.ConfigDict")
    return apply_overrides(config, overrides)


def flat_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        name = f"{prefix}{k}"
        keys += flat_keys(v, name + ".") if isinstance(v, ConfigDict) else [name]
    return keys


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool (true/false), got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"--config.{key}: cannot parse {text!r} as {type(current).__name__}"
        ) from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(
            f"--config.{key}: expected {type(current).__name__}, "
            f"got {type(value).__name__} ({text!r})"
        )
    return value


def apply_overrides(config: ConfigDict, overrides: list[str] | tuple[str, ...]) -> ConfigDict:
    """Applies `--config.a.b=value` (or `a.b=value`) strings in order."""
    keys = flat_keys(config)
    for item in overrides:
        body = item.removeprefix("--").removeprefix("config.")
        if "=" not in body:
            raise ConfigError(f"override {item!r} must look like --config.a.b=value")
        key, text = body.split("=", 1)
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = _parse_value(text, node[leaf], key)
    return config


def from_json(text: str) -> ConfigDict:
    return ConfigDict(json.loads(text))
