"""Helpers the tests share: configs built from experiments/base.py, the one home of defaults."""

from __future__ import annotations

from solo.config import RunConfig
from solo.data.config import DataConfig
from solo.experiments.base import get_config
from solo.model import ModelConfig


def model_config(**overrides) -> ModelConfig:
    """base.py's model section with `overrides` (give vocab_size: base's 0 means 'tokenizer's')."""
    return ModelConfig.from_config(get_config().model, **overrides)


def data_config(config=None, **overrides) -> DataConfig:
    """The typed data section of `config` (default: base.py's), with `overrides` replaced."""
    return DataConfig.from_config(config or get_config()).replace(**overrides)


def run_config(config=None) -> RunConfig:
    return RunConfig.from_config(config or get_config())
