"""Sampling methods: small frozen dataclasses, each a pure `method(logits_BV, key) -> tokens_B`.

Registered as pytrees so that a method's *kind* is static (part of the jit cache key) and its
*values* (temperature, k, p) are traced: a new temperature or top-p never recompiles.
`Compose(Temperature(t), TopK(k), TopP(p))` applies the transforms in order (HF's order), then
samples; `Sampling(temperature, top_k, top_p)` builds that from OpenAI/HF-style knobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

_NEG = -1e30


def _pytree(data: Sequence[str]):
    def wrap(cls):
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=[])
    return wrap


def _categorical(logits_BV: jax.Array, key: jax.Array) -> jax.Array:
    """One independent draw per row: row b uses fold_in(key, b) (batch-size independent)."""
    keys_B = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits_BV.shape[0]))
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


@_pytree([])
@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax; no sort, no randomness (the fast path)."""

    def transform(self, logits_BV: jax.Array) -> jax.Array:
        return logits_BV

    def __call__(self, logits_BV: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@_pytree(["temperature"])
@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature); temperature > 0 (use Greedy for 0)."""

    temperature: float = 1.0

    def transform(self, logits_BV: jax.Array) -> jax.Array:
        return logits_BV / jnp.asarray(self.temperature, jnp.float32)

    def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
        return _categorical(self.transform(logits_BV), key)


@_pytree(["k"])
@dataclasses.dataclass(frozen=True)
class TopK:
    """Keep the k largest logits (k traced, via a sort; ties at the k-th value are all kept)."""

    k: int = 50

    def transform(self, logits_BV: jax.Array) -> jax.Array:
        v = logits_BV.shape[-1]
        k = jnp.clip(jnp.asarray(self.k, jnp.int32), 1, v)
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        kth_B1 = jnp.take_along_axis(sorted_BV, jnp.broadcast_to(k - 1, (logits_BV.shape[0], 1)),
                                     axis=-1)
        return jnp.where(logits_BV >= kth_B1, logits_BV, _NEG)

    def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
        return _categorical(self.transform(logits_BV), key)


@_pytree(["p"])
@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus: keep the most probable tokens until their mass reaches p, *including* the token
    that crosses p (so at least one token always survives)."""

    p: float = 0.9

    def transform(self, logits_BV: jax.Array) -> jax.Array:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # exclusive cumsum
        keep_BV = mass_before_BV < jnp.asarray(self.p, jnp.float32)
        keep_BV = keep_BV.at[:, 0].set(True)
        # smallest kept logit is the threshold (sorted descending, keep is a prefix)
        n_keep_B1 = keep_BV.sum(-1, keepdims=True)
        thresh_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
        return jnp.where(logits_BV >= thresh_B1, logits_BV, _NEG)

    def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
        return _categorical(self.transform(logits_BV), key)


@dataclasses.dataclass(frozen=True)
class Compose:
    """Apply the transforms in order (e.g. Temperature, TopK, TopP as HF does), then sample.
    A Greedy anywhere makes the whole composition an argmax."""

    methods: tuple = ()

    def __init__(self, *methods):
        if len(methods) == 1 and isinstance(methods[0], (tuple, list)):
            methods = tuple(methods[0])
        object.__setattr__(self, "methods", tuple(methods))

    def transform(self, logits_BV: jax.Array) -> jax.Array:
        for m in self.methods:
            logits_BV = m.transform(logits_BV)
        return logits_BV

    def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
        if any(isinstance(m, Greedy) for m in self.methods):
            return Greedy()(self.transform(logits_BV))
        return _categorical(self.transform(logits_BV), key)


# Compose takes *methods; its children are the methods (kinds static, values traced).
jax.tree_util.register_pytree_node(Compose, lambda c: (c.methods, None),
                                   lambda _, ch: Compose(*ch))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Convenience (OpenAI / HF style knobs): temperature 0 = greedy; top_k 0 and top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def method(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling {self}: need temperature >= 0, top_k >= 0, "
                             "0 < top_p <= 1")
        if self.temperature == 0:
            return Greedy()
        parts = [Temperature(float(self.temperature))]
        if self.top_k > 0:
            parts.append(TopK(int(self.top_k)))
        if self.top_p < 1:
            parts.append(TopP(float(self.top_p)))
        return parts[0] if len(parts) == 1 else Compose(*parts)

    def __call__(self, logits_BV, key):
        return self.method()(logits_BV, key)


def as_method(method) -> Any:
    """Sampling / None -> a jit-able method pytree."""
    if method is None:
        return Greedy()
    if isinstance(method, Sampling):
        return method.method()
    return method
