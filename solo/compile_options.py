"""Per-jit XLA compiler options: which XLA:CPU library (YNNPACK) fusions each workload uses.

jaxlib 0.10 routes CPU dots, elementwise ops and reductions into YNNPACK library fusions by
default. Measured on a 2-core AMD EPYC, float32 (benchmarks/):
- train step (nanoGPT size): YNNPACK runs the big 2-D GEMMs faster (~210 vs 160-205 GFLOP/s),
  but the attention's batched [256x256x64] GEMMs at ~85 vs ~150 GFLOP/s, and its fusions are
  synchronous thunks that XLA cannot overlap with other work; all off: the step is ~10% faster
  (2140 -> 1890-1950 ms).
- decode loop (matvecs, batch 1-8), A/B in one process: YNNPACK for dots only is a little
  better than the default (batch 1: 518 vs 499 tok/s, batch 8: 1398 vs 1386); all off loses
  8% at batch 8.
The option goes per `jax.jit` (`compiler_options`; pmap steps get it through
`train.step.PmapWithOptions`), so it never leaks into other computations, and it is dropped (one
warning) on a jaxlib that does not know it, rather than failing.
"""

from __future__ import annotations

import functools
import logging

import jax

_KEY = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS = {"train": "", "decode": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
log = logging.getLogger("solo.compile")


@functools.cache
def _supported(value: str) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options={_KEY: value}).lower(1.0).compile()
        return True
    except Exception as e:  # noqa: BLE001 - any rejection means: use XLA's defaults
        log.warning("XLA option %s=%r unsupported by this jaxlib (%s); using XLA defaults", _KEY,
                    value, str(e).splitlines()[0][:120])
        return False


def compiler_options(workload: str, xla_defaults: bool = False,
                     backend: str | None = None) -> dict | None:
    """`jax.jit(..., compiler_options=...)` for a workload in YNN_FUSIONS: None (XLA defaults)
    off CPU, with xla_defaults=True, or when this jaxlib lacks the option."""
    value = YNN_FUSIONS[workload]
    if xla_defaults or (backend or jax.default_backend()) != "cpu" or not _supported(value):
        return None
    return {_KEY: value}


def train_options(config) -> dict | None:
    """The train/eval steps' options for a run config (`train.xla_defaults` honoured)."""
    return compiler_options("train", bool(config.train.get("xla_defaults", False)))
