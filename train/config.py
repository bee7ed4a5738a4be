"""`OptimConfig` and `TrainConfig`: the frozen, validated `config.optim` and `config.train`
sections (keys and defaults: experiments/base.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from solo.config import ConfigError, from_section

PARALLEL = ("jit", "pmap")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float
    warmup_steps: int
    decay_steps: int  # 0: train.steps
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    clip_norm: float  # 0: no clipping
    grad_accum: int

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum={self.grad_accum} must be >= 1")
        if self.lr < 0 or self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.lr, warmup_steps and decay_steps must be >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int  # -1: all devices the other axes leave
    fsdp: int
    tensor: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    log_every: int
    eval_every: int
    eval_batches: int  # 0: the whole validation split
    eval_at_start: bool
    ckpt_every: int
    keep: int
    keep_best: bool
    max_skipped_steps: int  # 0: a non-finite step stops the run; N: skip up to N of them
    parallel: str
    xla_defaults: bool
    mesh: MeshConfig
    init_from: str
    init_experiment: str
    init_import: str
    init_model: bool
    compilation_cache_dir: str  # '' = no persistent compilation cache
    profile_steps: str  # "START:STOP": jax.profiler trace of those steps; '' = none

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """(first, last) step traced, both included; None when not profiling."""
        if not self.profile_steps:
            return None
        start, _, stop = self.profile_steps.partition(":")
        return int(start), int(stop or start)

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"train.steps={self.steps} must be >= 1")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"train.parallel={self.parallel!r}; valid: 'jit', 'pmap'")
        for name in ("log_every", "eval_every", "eval_batches", "ckpt_every",
                     "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0")
        if self.profile_steps:
            start, _, stop = self.profile_steps.partition(":")
            if not (start.isdigit() and (stop or start).isdigit()
                    and 1 <= int(start) <= int(stop or start)):
                raise ConfigError(f"train.profile_steps={self.profile_steps!r}: give "
                                  "'START:STOP' steps, 1 <= START <= STOP (e.g. '10:12')")

    @classmethod
    def from_config(cls, section: Any) -> TrainConfig:
        return from_section(cls, section, "train")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int  # 0: off (full fine-tuning)
    alpha: float  # the adapters' scale is alpha / rank
    targets: tuple[str, ...]  # regexes over kernel paths, e.g. "attn/q$", "mlp/wi"

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0:
            raise ConfigError("lora.rank must be >= 0 and lora.alpha > 0")
        if self.rank and not self.targets:
            raise ConfigError("lora.targets is empty: name the kernels the adapters go on")
