"""Peak dense FLOP/s per device and compute dtype: the MFU denominator of benchmarks/.

Accelerators from their vendors' data sheets (dense, no sparsity). `float32` means what a float32
matmul runs at under JAX's default precision: TF32 tensor cores on NVIDIA Ampere and later,
one-pass bfloat16 on the TPU MXU (so there it equals the bfloat16 peak).

CPUs have no table entry: their peak is computed and declared, cores x clock x FLOPs a cycle
(2 FMA units x the vector width x 2: 64 float32 FLOPs a cycle with AVX-512, 32 with AVX2+FMA,
8 with SSE only), with the clock from /proc/cpuinfo (a VM reports the nominal one). bfloat16 on
XLA:CPU computes in float32 vector units, so both dtypes share that figure (AMX is not used).
`SOLO_PEAK_FLOPS` (FLOP/s per device) overrides everything.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax

# device_kind substring (matched longest first) -> {dtype: dense FLOP/s per device}
PEAKS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e's device_kind
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "H100": {"bfloat16": 989e12, "float32": 494.5e12},  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float32": 417.5e12},
    "H200": {"bfloat16": 989e12, "float32": 494.5e12},  # SXM ("NVIDIA H200"); GH200 alike
    "H200 NVL": {"bfloat16": 835e12, "float32": 417.5e12},  # data sheets give 2x, with sparsity
    "B200": {"bfloat16": 2250e12, "float32": 1100e12},
}


def _cpuinfo() -> tuple[float, int]:
    """(clock in Hz, float32 FLOPs a cycle a core) from /proc/cpuinfo; (nan, 0) elsewhere."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return math.nan, 0
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", text)]
    flags = set(re.findall(r"^flags\s*:(.*)$", text, re.M)[0].split()) if "flags" in text else set()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    return (max(mhz) * 1e6 if mhz else math.nan), per_cycle


def cpu_peak(num_cpu_devices: int = 1) -> tuple[float, str]:
    """(FLOP/s per jax CPU device, how it was derived): the host's cores share the devices."""
    hz, per_cycle = _cpuinfo()
    cores = os.cpu_count() or 1
    peak = cores * hz * per_cycle / max(num_cpu_devices, 1)
    how = (f"{cores} cores x {hz / 1e9:.2f} GHz x {per_cycle} FLOPs/cycle"
           + (f" / {num_cpu_devices} devices" if num_cpu_devices > 1 else ""))
    return peak, how


def peak_flops(dtype: str = "bfloat16", device: Any = None) -> tuple[float, str]:
    """(peak dense FLOP/s of one device for matmuls in `dtype`, where the figure comes from);
    NaN for an accelerator the table lacks."""
    env = os.environ.get("SOLO_PEAK_FLOPS")
    if env:
        return float(env), "SOLO_PEAK_FLOPS"
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return cpu_peak(len(jax.devices("cpu")))
    kind = str(getattr(device, "device_kind", ""))
    for name in sorted(PEAKS, key=len, reverse=True):
        if name.lower() in kind.lower():
            table = PEAKS[name]  # float16 runs at the bfloat16 rate on every listed device
            return table.get(str(dtype), table["bfloat16"]), f"{name} {dtype} data sheet"
    return math.nan, f"no table entry for {kind!r} (set SOLO_PEAK_FLOPS)"


__all__ = ["PEAKS", "peak_flops", "cpu_peak"]
