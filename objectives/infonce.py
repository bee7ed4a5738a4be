"""Symmetric InfoNCE over in-batch negatives between two views (`embedding`, `embedding_b`).

Under jit with globally sharded arrays the [B,B] similarity matrix is already global. Under pmap
(or shard_map) pass `axis_name`: the other view is all-gathered so negatives come from every
device, and row i of device d has its positive at column d * B_local + i. Metrics are then this
device's rows (sum, count): psum them (and the denominators) across the axis to get the global ones.
The all_gather transposes to a psum_scatter, so each device's gradient already includes the other
devices' losses through its embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from solo.objectives.base import (
    Array,
    Batch,
    Metrics,
    Objective,
    Options,
    cross_entropy,
    pair,
    row_weights,
)

NEG = -1e30  # logit of a padding key
MAX_SCALE = 100.0  # CLIP clips exp(logit_scale) here to keep training stable


def _normalize(x_BE: Array) -> Array:
    x_BE = x_BE.astype(jnp.float32)
    return x_BE * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_BE * x_BE, axis=-1, keepdims=True), 1e-12))


def _replicated(x_NE: Array) -> Array:
    """Keys must be whole on every device; explicit-sharding meshes need saying so (a no-op for
    Auto meshes, where XLA all-gathers by itself)."""
    spec = getattr(jax.typeof(x_NE).sharding, "spec", None)
    if spec is not None and any(p is not None for p in spec):
        return jax.sharding.reshard(x_NE, jax.sharding.PartitionSpec())
    return x_NE


def scale(outputs: Mapping[str, Array], options: Mapping[str, Any]) -> Array:
    """Logit scale: 1/temperature, or exp(learned `logit_scale`) clipped at 100."""
    if options["learn_temperature"]:
        return jnp.minimum(jnp.exp(outputs["logit_scale"].astype(jnp.float32)), MAX_SCALE)
    return jnp.float32(1.0 / float(options["temperature"]))


def loss(outputs: Batch, batch: Batch, options: Options) -> Metrics:
    """Per row: mean of the a->b and b->a CE over sim = a @ b.T * scale. Option `axis_name`.

    Rows with `pair_weights` 0 (eval padding) are neither counted nor used as negatives.
    Rows with the same `pair_groups` id >= 0 (paraphrase pairs of one fact) are positives of each
    other, not negatives: another row of the query's group is masked out of its candidates, so a
    near-duplicate neither pushes the embeddings apart nor counts as a retrieval miss.
    """
    a_BE = _normalize(outputs["embedding"])
    b_BE = _normalize(outputs["embedding_b"])
    s = scale(outputs, options)
    local = a_BE.shape[0]
    w_B = row_weights(batch, "pair_weights", local)
    g_B = jnp.asarray(batch["pair_groups"], jnp.int32) if "pair_groups" in batch else \
        jnp.full((local,), -1, jnp.int32)
    axis_name = options["axis_name"]
    if axis_name is None:
        a_all_NE, b_all_NE, w_all_N, g_all_N = _replicated(a_BE), _replicated(b_BE), w_B, g_B
        offset = 0
    else:
        a_all_NE = jax.lax.all_gather(a_BE, axis_name, tiled=True)
        b_all_NE = jax.lax.all_gather(b_BE, axis_name, tiled=True)
        w_all_N = jax.lax.all_gather(w_B, axis_name, tiled=True)
        g_all_N = jax.lax.all_gather(g_B, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * local
    labels_B = offset + jnp.arange(local, dtype=jnp.int32)
    own_BN = labels_B[:, None] == jnp.arange(g_all_N.shape[0])[None, :]
    same_group_BN = (g_B[:, None] == g_all_N[None, :]) & (g_B[:, None] >= 0) & ~own_BN
    key_ok_BN = (w_all_N > 0)[None, :] & ~same_group_BN
    # Padding keys get a very negative logit: exactly zero probability, no NaN.
    logits_ab_BN = jnp.where(key_ok_BN, s * (a_BE @ b_all_NE.T), NEG)  # query a, keys = every b
    logits_ba_BN = jnp.where(key_ok_BN, s * (b_BE @ a_all_NE.T), NEG)  # query b, keys = every a
    ce_ab, _ = cross_entropy(logits_ab_BN, labels_B)
    ce_ba, _ = cross_entropy(logits_ba_BN, labels_B)
    hit_ab = (jnp.argmax(logits_ab_BN, axis=-1) == labels_B).astype(jnp.float32)
    hit_ba = (jnp.argmax(logits_ba_BN, axis=-1) == labels_B).astype(jnp.float32)
    count = jnp.sum(w_B)
    return {
        "loss": pair(0.5 * jnp.sum(w_B * (ce_ab + ce_ba)), count),
        "accuracy": pair(0.5 * jnp.sum(w_B * (hit_ab + hit_ba)), count),
    }


OBJECTIVE = Objective(
    name="infonce",
    heads=("embed",),
    views=("", "_b"),
    batch_keys=("tokens", "tokens_b"),
    loss=loss,
    options=("temperature", "learn_temperature"),
    count=lambda batch: jnp.sum(row_weights(batch, "pair_weights", batch["tokens"].shape[0])),
    batch_coupled=True,
)
