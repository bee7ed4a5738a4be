"""Next-sentence prediction: 2-way softmax CE on the pooled first token."""

from __future__ import annotations

import jax.numpy as jnp

from solo.objectives.base import (
    Batch,
    Metrics,
    Objective,
    Options,
    cross_entropy,
    pair,
    row_weights,
)


def loss(outputs: Batch, batch: Batch, options: Options) -> Metrics:
    """CE of `nsp_logits` [B,2] vs `nsp_labels` [B] (1 = B follows A), weighted per row by
    `nsp_weights` (0 on eval padding rows; all ones when absent)."""
    logits_B2 = outputs["nsp_logits"].astype(jnp.float32)
    labels_B = batch["nsp_labels"]
    w_B = row_weights(batch, "nsp_weights", labels_B.shape[0])
    ce_B, _ = cross_entropy(logits_B2, labels_B)
    correct_B = (jnp.argmax(logits_B2, axis=-1) == labels_B).astype(jnp.float32)
    count = jnp.sum(w_B)
    return {"loss": pair(jnp.sum(w_B * ce_B), count),
            "accuracy": pair(jnp.sum(w_B * correct_B), count)}


OBJECTIVE = Objective(
    name="nsp",
    heads=("nsp",),
    batch_keys=("tokens", "nsp_labels"),
    loss=loss,
    count=lambda batch: jnp.sum(row_weights(batch, "nsp_weights", batch["nsp_labels"].shape[0])),
)
