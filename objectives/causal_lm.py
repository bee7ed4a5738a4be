"""Next-token cross-entropy (pretraining and SFT: `weights` carries the padding/prompt mask)."""

from __future__ import annotations

from solo.objectives.base import (
    Batch,
    Metrics,
    Objective,
    Options,
    lm_ce,
    perplexity,
    weight_sum,
)


def loss(outputs: Batch, batch: Batch, options: Options) -> Metrics:
    """CE of `logits` [B,L,V] (or, under model.logits_chunk, of `lm_hidden` @ `lm_kernel`,
    chunk by chunk) vs `targets` [B,L], weighted by `weights`; option `z_loss` (coeff)."""
    return lm_ce(outputs, batch, float(options["z_loss"]))


OBJECTIVE = Objective(
    name="causal_lm",
    heads=("lm",),
    batch_keys=("tokens", "targets", "weights"),
    loss=loss,
    options=("z_loss",),
    count=weight_sum("weights"),
    derived=perplexity,
)
