"""LoRA (Hu et al. 2021): low-rank adapters on chosen kernels, the base params frozen.

With `lora.rank` r > 0 the param tree gains `params["lora"][path] = {"a": [in, r], "b": [r, out]}`
for every kernel whose path ("decoder/layers_3/attn/q") matches one of `lora.targets` (regexes).
Every forward pass (training, eval, inference) sees the merged kernels
W + (alpha / r) * (A @ B) reshaped to W's shape; A starts random (variance 1/in) and B at zero,
so training starts from the base model exactly. Only the adapters get optimizer updates (the
base params are never touched: bit for bit what they were); `merge` folds them in for export.
A kernel's `in` is its first axis and `out` the rest, except attention's output projection
`o` [heads, head width, D], whose `out` is its last axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from solo.config import ConfigError

KEY = "lora"


def _kernels(params: dict, prefix: str = "") -> dict[str, Any]:
    """path -> leaf of every kernel (a matrix-like param) outside the adapters."""
    out = {}
    for k, v in params.items():
        if k == KEY:
            continue
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_kernels(v, path + "/"))
        elif len(getattr(v, "shape", ())) >= 2 or (isinstance(v, nn.Partitioned)
                                                    and len(v.value.shape) >= 2):
            out[path] = v
    return out


def _in_out(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if path.endswith("attn/o"):
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def targets(params: dict, lcfg: Any) -> dict[str, tuple[int, ...]]:
    """path -> shape of the kernels the adapters go on; a ConfigError if none matches."""
    kernels = {p: tuple(getattr(v, "value", v).shape) for p, v in _kernels(params).items()}
    chosen = {p: s for p, s in kernels.items()
              if any(re.search(t, p) for t in lcfg.targets)}
    if not chosen:
        raise ConfigError(f"lora.targets {list(lcfg.targets)} match no kernel; kernels: "
                          f"{', '.join(sorted(kernels))}")
    if any(p.split("/")[1:2] == ["layers"] for p in chosen):
        raise ConfigError("LoRA needs model.scan_layers=False (adapters per unrolled layer)")
    return chosen


def add(params: dict, lcfg: Any, key: jax.Array, boxed: bool = False) -> dict:
    """params with freshly initialised adapters (replicated logical axes if `boxed`); params
    as they are when LoRA is off (rank 0)."""
    if lcfg.rank <= 0:
        return params
    adapters = {}
    for i, (path, shape) in enumerate(sorted(targets(params, lcfg).items())):
        d_in, d_out = _in_out(path, shape)
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, lcfg.rank), jnp.float32)
        a = a / math.sqrt(d_in)
        b = jnp.zeros((lcfg.rank, d_out), jnp.float32)
        if boxed:
            a, b = nn.Partitioned(a, (None, None)), nn.Partitioned(b, (None, None))
        adapters[path] = {"a": a, "b": b}
    return {**params, KEY: adapters}


def merge(params: dict, lcfg: Any) -> dict:
    """The model's params with every adapter folded into its kernel (no KEY entry)."""
    if KEY not in params:
        return params
    scale = lcfg.alpha / lcfg.rank
    out = {k: v for k, v in params.items() if k != KEY}

    def put(tree: dict, parts: list[str], delta) -> dict:
        tree = dict(tree)
        if len(parts) == 1:
            w = tree[parts[0]]
            tree[parts[0]] = (w + delta.reshape(w.shape).astype(w.dtype))
        else:
            tree[parts[0]] = put(tree[parts[0]], parts[1:], delta)
        return tree

    for path, ab in params[KEY].items():
        out = put(out, path.split("/"), scale * (ab["a"] @ ab["b"]))
    return out


def apply_fn(apply: Callable, lcfg: Any) -> Callable:
    """`model.apply` on merged params (variables {'params': ...} or the bare tree)."""
    if lcfg.rank <= 0:
        return apply

    def merged(variables, *args, **kwargs):
        params = variables["params"] if "params" in variables else variables
        return apply({"params": merge(params, lcfg)}, *args, **kwargs)

    return merged


def freeze_base(tx: optax.GradientTransformation, params: Any) -> optax.GradientTransformation:
    """`tx` for the adapters, nothing (no state, zero updates) for everything else. `params`
    (arrays or shapes) fixes the labels: a static tree, as optax.tree_map_params needs."""
    labels = {k: jax.tree.map(lambda _, name=("adapter" if k == KEY else "frozen"): name, v)
              for k, v in params.items()}
    return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, labels)


def trainable_count(params: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(params.get(KEY, {})))
