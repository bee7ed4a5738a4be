"""`DataConfig`: the frozen, validated `config.data` section (keys, defaults: experiments/base.py).

Built once per run by `DataConfig.from_config(config)` (the whole ConfigDict: data.shuffle_seed
-1 resolves to the run's seed), then handed to the pipeline, the sources and the tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from solo.config import ConfigError, from_section
from solo.data.tasks import get_task

SPLIT_MODES = ("random", "tail")
TXT_SPLITS = ("file", "blank_lines")
PACKINGS = ("first_fit", "fill")
NSP_NEGATIVES = ("other_doc", "same_doc")
TOKENIZER_KINDS = ("bpe", "unigram", "char")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    kind: str
    vocab_size: int
    sample_size: int
    path: str

    def __post_init__(self):
        if self.kind not in TOKENIZER_KINDS:
            raise ConfigError(f"data.tokenizer.kind={self.kind!r}; valid: {TOKENIZER_KINDS}")
        if self.vocab_size < 0 or self.sample_size < 1:
            raise ConfigError("data.tokenizer.vocab_size must be >= 0 and sample_size >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str
    task: str
    seq_len: int
    src_seq_len: int
    batch_size: int
    eval_batch_size: int
    shuffle_seed: int  # resolved: never -1 once built by from_config
    num_workers: int
    prefetch: int
    val_fraction: float
    split_mode: str
    txt_split: str
    text_field: str
    prompt_field: str
    response_field: str
    data_dir: str
    mlm_rate: float
    nsp: bool
    nsp_negatives: str
    pack: str
    tokenizer: TokenizerConfig
    world: Mapping[str, Any]  # World.generate's keyword arguments (solo.data.world)

    def __post_init__(self):
        get_task(self.task)  # one error for an unknown task, listing the known ones
        for name, valid in (("split_mode", SPLIT_MODES), ("txt_split", TXT_SPLITS),
                            ("pack", PACKINGS), ("nsp_negatives", NSP_NEGATIVES)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"data.{name}={getattr(self, name)!r}; valid: "
                                  f"{', '.join(valid)}")
        for name in ("seq_len", "src_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.eval_batch_size < 0 or self.num_workers < 0 or self.prefetch < 0:
            raise ConfigError("data.eval_batch_size, num_workers and prefetch must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0.0 < self.mlm_rate < 1.0:
            raise ConfigError(f"data.mlm_rate={self.mlm_rate} must be in (0, 1)")
        from solo.data.world import World

        try:
            World.config_options(self.world)
        except ValueError as e:
            raise ConfigError(f"data.world: {e}") from None

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """From a run's ConfigDict: its data section, with shuffle_seed -1 -> config.seed."""
        d = from_section(cls, config.data, "data")
        if d.shuffle_seed < 0:
            d = dataclasses.replace(d, shuffle_seed=int(config.seed))
        return d

    @property
    def eval_batch(self) -> int:
        """Global eval batch size (eval_batch_size 0: batch_size)."""
        return self.eval_batch_size or self.batch_size

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)
