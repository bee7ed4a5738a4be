"""Per-process runtime options of a run: the persistent compilation cache and profiler traces.

`train.compilation_cache_dir`: XLA executables are cached there (local or gs://, shared by every
process of a run and across runs), so a relaunch, a resume or another process with the same
program skips compilation (minutes for large models on accelerators). Compilations shorter than
jax's `jax_persistent_cache_min_compile_time_secs` (1 s by default) are not cached.

`train.profile_steps="START:STOP"`: process 0 traces steps START..STOP (both included) with
`jax.profiler` into WORKDIR/profile (plugins/profile/<time>/*.xplane.pb): open it with
`tensorboard --logdir WORKDIR/profile` (the tensorboard-plugin-profile package) or Perfetto.
One host's trace is what MaxText keeps by default too: the other hosts run the same program.
"""

from __future__ import annotations

import os
import sys

import jax

from solo import multihost
from solo.files import join

PROFILE_DIR = "profile"


def set_compilation_cache(directory: str) -> None:
    """Points jax's persistent compilation cache at `directory` ('' = leave it as it is). jax
    reads the setting once, at its first compilation: the cache is reset so that a change made
    later in a process (a notebook, a sweep) takes effect too. The cache is trusted code: never
    share a directory others can write to."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    directory = os.fspath(directory)
    if directory and jax.config.jax_compilation_cache_dir != directory:
        cc.set_cache_dir(directory)
        cc.reset_cache()


class Profiler:
    """Starts a jax.profiler trace before step `first` and stops it after step `last`."""

    def __init__(self, steps: tuple[int, int] | None, workdir: str):
        self.first, self.last = steps or (0, -1)
        self.enabled = steps is not None and multihost.is_primary()
        self.logdir = join(workdir, PROFILE_DIR)
        self.active = False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """`outputs`: what step `step` computed (waited for, so the trace holds the step)."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.stop()
            print(f"profiled steps {self.first}-{self.last}: tensorboard --logdir "
                  f"{self.logdir}", file=sys.stderr)

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
