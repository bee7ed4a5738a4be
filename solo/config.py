"""The run's config, typed: frozen records built once from the ConfigDict of an experiment.

An experiment is an `ml_collections.ConfigDict` (experiments/base.py holds every key with its
default; files and `--config.*` overrides change values). Consumers never read it with a default
of their own: `RunConfig.from_config` builds one frozen, validated record per section
(`ModelConfig`, `DataConfig`, `OptimConfig`, `TrainConfig`, `AgentConfig`) and the objectives'
options, each taking exactly its section's keys (a missing or unknown key is an error naming it),
so experiments/base.py stays the one home of every default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

Section = Mapping[str, Any]


class ConfigError(ValueError):
    """A config that cannot be used; the message says why and what to do."""


def _plain(section: Any) -> dict[str, Any]:
    if hasattr(section, "to_dict"):
        return section.to_dict()
    if isinstance(section, Mapping):
        return dict(section)
    raise ConfigError(f"expected a config section (ConfigDict or dict), got {section!r}")


def _convert(value: Any, kind: Any, path: str) -> Any:
    """A JSON/ConfigDict value as the field's type (nested records, tuples, floats from ints)."""
    if dataclasses.is_dataclass(kind):
        return from_section(kind, value, path)
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return tuple(value)
    if origin in (Mapping, dict):
        return FrozenDict(_plain(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        raise ConfigError(f"{path} must be {kind.__name__}, got {value!r}")
    return value


def from_section(cls: type, section: Any, path: str, **resolved: Any):
    """`cls` (a frozen dataclass) from a config section with exactly its fields.

    `resolved` are fields the caller computes rather than reads (they must not be in the
    section). Errors name the key and the fix; `cls.__post_init__` validates values."""
    values = _plain(section)
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in resolved]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        near = difflib.get_close_matches(unknown[0], fields, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigError(f"unknown config key {path}.{unknown[0]}{hint}; valid keys of {path}: "
                          f"{', '.join(fields)}")
    missing = [f for f in fields if f not in values]
    if missing:
        raise ConfigError(f"config lacks {path}.{missing[0]}; every key and its default live in "
                          "experiments/base.py (a config.json written by an older solo: add the "
                          "key with its default)")
    kwargs = {f: _convert(values[f], hints[f], f"{path}.{f}") for f in fields}
    try:
        return cls(**kwargs, **resolved)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every section of a run, typed (see the module docstring).

    model.vocab_size 0 means "the tokenizer's" until a model is built. `json` is the ConfigDict
    the record was built from, serialized: what a workdir's config.json holds."""

    name: str
    seed: int
    model: Any  # solo.model.ModelConfig
    data: Any  # solo.data.config.DataConfig
    objectives: Mapping[str, Mapping[str, Any]]  # active objectives: name -> options (+ weight)
    optim: Any  # solo.train.config.OptimConfig
    train: Any  # solo.train.config.TrainConfig
    lora: Any  # solo.train.config.LoraConfig
    agent: Any  # solo.agent.config.AgentConfig
    dist: Any  # solo.multihost.DistConfig (how this launch joins other processes)
    json: str

    @classmethod
    def from_config(cls, config: Any) -> RunConfig:
        """From an experiment's ConfigDict (or a RunConfig, returned as it is)."""
        if isinstance(config, RunConfig):
            return config
        from solo.agent.config import AgentConfig
        from solo.data.config import DataConfig
        from solo.model.config import ModelConfig
        from solo.multihost import DistConfig
        from solo.objectives import active_objectives
        from solo.train.config import LoraConfig, OptimConfig, TrainConfig

        try:
            objectives = active_objectives(config.objectives)
        except ValueError as e:
            raise ConfigError(f"config.objectives: {e}") from None
        model = ModelConfig.from_config(config.model)
        plain = json.loads(to_json(config))
        for key in ("dtype", "remat"):  # "auto" resolved by platform (model/platform.py), saved so
            if plain.get("model", {}).get(key) == "auto":  # (restores as it trained)
                plain["model"][key] = getattr(model, key)
        return cls(name=str(config.name), seed=int(config.seed),
                   model=model,
                   data=DataConfig.from_config(config),
                   objectives=FrozenDict(objectives),
                   optim=from_section(OptimConfig, config.optim, "optim"),
                   train=TrainConfig.from_config(config.train),
                   lora=from_section(LoraConfig, config.lora, "lora"),
                   agent=from_section(AgentConfig, config.agent, "agent"),
                   dist=DistConfig.from_config(config.dist),
                   json=json.dumps(plain, indent=2, sort_keys=True, default=list))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.json)

    def replace(self, **changes) -> RunConfig:
        """A copy with sections replaced; `json` (what config.json gets) follows them."""
        plain = self.to_dict()
        for name, value in changes.items():
            if dataclasses.is_dataclass(value) and isinstance(plain.get(name), dict):
                _update_known(plain[name], dataclasses.asdict(value))
        return dataclasses.replace(self, **changes, json=json.dumps(plain, indent=2,
                                                                    sort_keys=True, default=list))


def _update_known(saved: dict, new: dict) -> None:
    """saved's keys take new's values (recursively); keys saved lacks stay out (derived ones)."""
    for k, v in new.items():
        if k not in saved:
            continue
        if isinstance(saved[k], dict) and isinstance(v, Mapping):
            _update_known(saved[k], dict(v))
        else:
            saved[k] = list(v) if isinstance(v, tuple) else v


def to_json(config: Any) -> str:
    plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(plain, indent=2, sort_keys=True, default=list)
