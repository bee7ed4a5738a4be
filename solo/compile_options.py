"""Per-jit XLA compiler options, shared by training (train/) and decoding (agent/): which XLA:CPU
library (YNNPACK) fusions each workload uses.

jaxlib 0.10 routes CPU dots, elementwise ops and reductions into YNNPACK library fusions by
default. For the train step they run the big 2-D GEMMs well but the attention's batched GEMMs
slowly, and as synchronous thunks they keep XLA from overlapping the weight-gradient GEMMs with
the rest of the backward: the train and eval steps turn them all off. The decode loop (batched
matvecs) keeps them for dots only. The README's "Throughput and MFU" section has the figures
(benchmarks/train_throughput.py --xla-defaults and benchmarks/decode_throughput.py measure them).
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
    return compiler_options("train", config.train.xla_defaults)
