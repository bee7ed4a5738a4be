"""Platform defaults: the one place where CPU and accelerator settings differ.

`model.dtype` and `model.remat` accept "auto", resolved here from `jax.default_backend()` when
the config is built (config.json then holds the resolved value, so a run restores as it
trained on any platform):

    cpu   float32 compute, no remat
    gpu   bfloat16 compute, no remat (H100/H200 memory holds GPT-2-class activations; set
          model.remat for bigger models)
    tpu   bfloat16 compute, remat 'dots_no_batch' (MaxText's default policy class: keep weight
          matmul outputs, recompute the rest; TPU HBM is smaller)

`model.scan_layers` is not among them: it decides the param tree's layout (one stacked
'layers' or layers_0..N-1), and a checkpoint must restore wherever it is read. Accelerator
experiments set it True (compile time flat in depth); XLA:CPU runs ~12% faster unrolled.

Params stay float32 (`model.param_dtype`): the optimizer keeps float32 master weights, the
forward casts them to the compute dtype; logits and losses are float32 on every platform.
"""

from __future__ import annotations

import jax

PLATFORM_DEFAULTS: dict[str, dict[str, object]] = {
    "cpu": dict(dtype="float32", remat="none"),
    "gpu": dict(dtype="bfloat16", remat="none"),
    "tpu": dict(dtype="bfloat16", remat="dots_no_batch"),
}


def platform_default(key: str, backend: str | None = None) -> object:
    """The default of model.`key` on `backend` (default: this process's)."""
    backend = backend or jax.default_backend()
    return PLATFORM_DEFAULTS.get(backend, PLATFORM_DEFAULTS["gpu"])[key]


def has_host_offload() -> bool:
    """Whether this backend's devices have pinned host memory (remat 'offload')."""
    try:
        kinds = jax.devices()[0].addressable_memories()
        return any(m.kind == "pinned_host" for m in kinds)
    except Exception:  # noqa: BLE001 - no memories API on this backend: no offload
        return False
