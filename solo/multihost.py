"""Multi-host runs: `jax.distributed` start-up, the primary process, and barriers.

One process per host (or per GPU under SLURM) runs the same `solo train`; `initialize(dist)` joins
them before any device is used. Then every process sees all devices (`jax.devices()`), builds the
same mesh and runs the same jitted step, feeding only its own rows (data/pipeline.py) and its own
devices. Files every process would otherwise write (config.json, the tokenizer, metrics, renames)
are written by the primary process (`is_primary()`, process 0) alone; the others wait for it at a
`barrier` where they then read what it wrote. Orbax coordinates checkpoint saves itself (every
process calls save). The workdir must be one filesystem all processes see (NFS, or gs://).

`dist.initialize`: 'auto' starts jax.distributed when dist.coordinator_address is set, or when
jax's own cluster detection finds a cluster of more than one process (a multi-host TPU slice,
SLURM with more than one task, Open MPI, or JAX_COORDINATOR_ADDRESS with num_processes from the
cluster); 'yes' always (jax detects what is not set); 'no' never (one process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import warnings
from typing import Any

import jax

from solo.config import ConfigError, from_section

log = logging.getLogger(__name__)
MODES = ("auto", "yes", "no")


class MultihostError(ValueError):
    """Processes that cannot form a run; the one-line message names the setting to fix."""


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """`config.dist` (defaults: experiments/base.py)."""

    initialize: str  # auto | yes | no
    coordinator_address: str  # host:port of process 0 ('' = from the cluster environment)
    num_processes: int  # 0 = from the cluster environment
    process_id: int  # -1 = from the cluster environment
    timeout_s: int  # how long every process waits for all of them to arrive

    def __post_init__(self):
        if self.initialize not in MODES:
            raise ConfigError(f"dist.initialize={self.initialize!r}; valid: {', '.join(MODES)}")
        if self.timeout_s < 1:
            raise ConfigError(f"dist.timeout_s={self.timeout_s} must be >= 1")
        explicit = (bool(self.coordinator_address), self.num_processes > 0,
                    self.process_id >= 0)
        if any(explicit) and not all(explicit):
            raise ConfigError("dist.coordinator_address, dist.num_processes and dist.process_id "
                              "go together: set all three (or none, to take them from the "
                              "cluster environment)")
        if all(explicit) and not self.process_id < self.num_processes:
            raise ConfigError(f"dist.process_id={self.process_id} must be < "
                              f"dist.num_processes={self.num_processes}")

    @classmethod
    def from_config(cls, section: Any) -> DistConfig:
        return from_section(cls, section, "dist")

    @property
    def explicit(self) -> bool:
        return bool(self.coordinator_address)


def detected_cluster() -> str | None:
    """The cluster environment jax.distributed.initialize() would bootstrap from, if it holds
    more than one process; None otherwise (a laptop, one SLURM task, a single TPU host)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    try:  # jax's own detection (private module, hence guarded): exactly what initialize() uses
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return None
    for env in ClusterEnv._cluster_types:
        if env.opt_in_only_method:  # mpi4py: only when asked for by name
            continue
        try:
            with warnings.catch_warnings():  # e.g. Kubernetes without its client package
                warnings.simplefilter("ignore")
                if env.is_env_present() and env.get_process_count() > 1:
                    return env.name or env.__name__
        except Exception:  # noqa: BLE001 - an environment that cannot tell is not ours
            continue
    return None


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def initialize(dist: DistConfig) -> bool:
    """Joins the run's processes (once per process; later calls are no-ops). Returns whether
    jax.distributed is running. Peers that never arrive end the process with a one-line error
    naming the coordinator after dist.timeout_s (jax itself would abort with a stack dump)."""
    if is_initialized():
        return True
    cluster = None
    if dist.initialize == "no" or (dist.initialize == "auto" and not dist.explicit
                                   and not (cluster := detected_cluster())):
        return False
    if _backend_started():
        raise MultihostError(
            "jax.distributed must start before any device is used, but this process already "
            "used jax devices; start the run in a fresh process (dist.initialize='no' runs "
            "single-process)")
    where = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or cluster
    who = (f"process {dist.process_id} of {dist.num_processes}" if dist.explicit
           else f"a process of the {cluster or 'detected'} cluster")
    print(f"jax.distributed: {who} joining the coordinator at {where} (waits up to "
          f"dist.timeout_s={dist.timeout_s} s for every process)", file=sys.stderr, flush=True)

    def too_late() -> None:  # jax's own timeout aborts the process with a native stack dump
        print(f"solo: error: jax.distributed: not every process reached the coordinator at "
              f"{where} within dist.timeout_s={dist.timeout_s} s ({who}); start every process "
              "with the same dist.coordinator_address and dist.num_processes, check that the "
              "address is reachable from every host, or raise dist.timeout_s",
              file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(dist.timeout_s, too_late)
    watchdog.daemon = True
    watchdog.start()
    try:
        kwargs = dict(initialization_timeout=dist.timeout_s + 60)  # ours fires first
        if dist.explicit:
            kwargs.update(coordinator_address=dist.coordinator_address,
                          num_processes=dist.num_processes, process_id=dist.process_id)
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise MultihostError(f"jax.distributed.initialize ({who}, coordinator {where}): "
                             f"{' '.join(str(e).split())[:300]}") from None
    finally:
        watchdog.cancel()
    log.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _backend_started() -> bool:
    """Whether this process already created a jax backend (devices in use)."""
    with contextlib.suppress(Exception):
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    return False


def is_primary() -> bool:
    """Process 0: the one that writes the run's shared files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"solo:{name}")


def all_agree(ok: bool) -> bool:
    """True where every process says `ok` (an all-gather; `ok` itself with one process): how
    processes take a decision together that each could otherwise take its own way."""
    if jax.process_count() == 1:
        return bool(ok)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([int(bool(ok))], np.int32))))
