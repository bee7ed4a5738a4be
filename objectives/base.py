"""The `Objective` record and the token-weighted math the objectives share.

Every metric is a `(sum, count)` pair of float32 scalars: pairs add exactly across microbatches,
devices and eval batches, so a mean is only formed at the very end (`summarize`), which keeps eval
loss independent of batch size. Shapes: B batch, L length, V vocab, E embed dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Metric = tuple[Array, Array]  # (sum, count), float32 scalars
Metrics = dict[str, Metric]
Batch = Mapping[str, Array]  # also model outputs
Options = Mapping[str, Any]  # an objective's config entry as a plain dict (+ axis_name)
LossFn = Callable[[Batch, Batch, Options], Metrics]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss over model outputs + batch.

    `views` are batch-key suffixes the model runs on ("" = the batch itself, "_b" = the second
    view of a pair); outputs of view v come back with v appended to their names.
    `options` names the objective's config options besides `weight` (their defaults live in
    experiments/base.py, `config.objectives.<name>`); `loss` receives them, plus `axis_name`
    (the pmap axis, or None).
    `loss(outputs, batch, options)` returns unprefixed metrics including "loss" (and optionally
    "z_loss", an auxiliary term added to the total with the same denominator). `count(batch)` is
    the param-free denominator of "loss". `derived` maps this objective's summarised float metrics
    to extra ones (e.g. perplexity). `batch_coupled` objectives (InfoNCE) get gradient caching
    under gradient accumulation (train.step), so their loss always sees the whole batch.
    """

    name: str
    heads: tuple[str, ...]
    batch_keys: tuple[str, ...]
    loss: LossFn
    count: Callable[[Mapping[str, Array]], Array]
    views: tuple[str, ...] = ("",)
    options: tuple[str, ...] = ()
    derived: Callable[[Mapping[str, float]], dict[str, float]] | None = None
    # the loss couples rows (in-batch negatives): gradient accumulation must see the whole batch
    batch_coupled: bool = False


def pair(total: Array, count: Array) -> Metric:
    return jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)


def safe_div(total: Array, den: Array) -> Array:
    """total / den, 0 where den == 0 (no NaN in the untaken branch, so gradients stay finite)."""
    den = jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, total / jnp.where(den > 0, den, 1.0), 0.0)


def cross_entropy(logits_NV: Array, targets_N: Array) -> tuple[Array, Array]:
    """Per-row softmax CE in float32, plus logsumexp (reused by z-loss)."""
    logits_NV = logits_NV.astype(jnp.float32)
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    idx_N1 = targets_N[..., None].astype(jnp.int32)
    picked_N = jnp.take_along_axis(logits_NV, idx_N1, axis=-1)[..., 0]
    return lse_N - picked_N, lse_N


def token_ce(
    logits_BLV: Array, targets_BL: Array, weights_BL: Array, z_loss: float = 0.0
) -> Metrics:
    """Token-weighted CE and accuracy; optional z-loss = z_loss * lse^2 over the same tokens."""
    w = weights_BL.astype(jnp.float32)
    ce, lse = cross_entropy(logits_BLV, targets_BL)
    correct = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    count = jnp.sum(w)
    metrics = {"loss": pair(jnp.sum(w * ce), count), "accuracy": pair(jnp.sum(w * correct), count)}
    if z_loss:
        metrics["z_loss"] = pair(z_loss * jnp.sum(w * jnp.square(lse)), count)
    return metrics


def chunked_token_ce(hidden_BNCD: Array, kernel_DV: Array, bias_V: Array, targets_BL: Array,
                     weights_BL: Array, z_loss: float = 0.0) -> Metrics:
    """`token_ce` of logits = hidden @ kernel made one chunk of C positions at a time
    (model.logits_chunk): a scan over the N chunks whose body is rematerialised, so the backward
    recomputes each chunk's [B,C,V] float32 logits instead of keeping all of them. bias_V
    (float32: 0, or -1e30 on the vocabulary's padding ids) is added as the model adds it. Same
    metrics as token_ce (the sums in another order)."""
    b, n, c, d = hidden_BNCD.shape
    length = targets_BL.shape[1]
    pad = ((0, 0), (0, n * c - length))
    t_NBC = jnp.pad(targets_BL.astype(jnp.int32), pad).reshape(b, n, c).swapaxes(0, 1)
    w_NBC = jnp.pad(weights_BL.astype(jnp.float32), pad).reshape(b, n, c).swapaxes(0, 1)
    x_NBCD = hidden_BNCD.swapaxes(0, 1)

    @jax.checkpoint
    def chunk(x_BCD, t_BC, w_BC):
        logits_BCV = jnp.einsum("BCD,DV->BCV", x_BCD.astype(kernel_DV.dtype), kernel_DV,
                                preferred_element_type=jnp.float32)
        logits_BCV = logits_BCV + bias_V
        ce, lse = cross_entropy(logits_BCV, t_BC)
        correct = (jnp.argmax(logits_BCV, axis=-1) == t_BC).astype(jnp.float32)
        return jnp.stack([jnp.sum(w_BC * ce), jnp.sum(w_BC * correct),
                          jnp.sum(w_BC * jnp.square(lse))])

    def body(acc, xs):
        return acc + chunk(*xs), None

    sums, _ = jax.lax.scan(body, jnp.zeros((3,), jnp.float32), (x_NBCD, t_NBC, w_NBC))
    count = jnp.sum(weights_BL.astype(jnp.float32))
    metrics = {"loss": pair(sums[0], count), "accuracy": pair(sums[1], count)}
    if z_loss:
        metrics["z_loss"] = pair(z_loss * sums[2], count)
    return metrics


def lm_ce(outputs: Batch, batch: Batch, z_loss: float = 0.0) -> Metrics:
    """Token CE of the 'lm' head's outputs: whole `logits`, or chunked (`lm_hidden` and
    `lm_kernel` and `lm_bias`, model.logits_chunk > 0)."""
    if "logits" in outputs:
        return token_ce(outputs["logits"], batch["targets"], batch["weights"], z_loss)
    return chunked_token_ce(outputs["lm_hidden"], outputs["lm_kernel"], outputs["lm_bias"],
                            batch["targets"], batch["weights"], z_loss)


def row_weights(batch: Mapping[str, Array], key: str, rows: int) -> Array:
    """Per-row weights [B] float32: batch[key] if present (0 marks padding rows), else ones."""
    if key in batch:
        return jnp.asarray(batch[key], jnp.float32)
    return jnp.ones((rows,), jnp.float32)


def weight_sum(key: str) -> Callable[[Mapping[str, Array]], Array]:
    return lambda batch: jnp.sum(jnp.asarray(batch[key], jnp.float32))


def perplexity(m: Mapping[str, float]) -> dict[str, float]:
    loss = m["loss"]
    return {"perplexity": math.exp(loss) if loss < 700 else math.inf}
