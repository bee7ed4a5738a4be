"""Masked-LM cross-entropy at the selected positions (masking: `data.masking.mask_tokens`)."""

from __future__ import annotations

from solo.objectives.base import (
    Batch,
    Metrics,
    Objective,
    Options,
    perplexity,
    token_ce,
    weight_sum,
)


def loss(outputs: Batch, batch: Batch, options: Options) -> Metrics:
    """CE of `mlm_logits` [B,L,V] vs `mlm_targets`, weighted by `mlm_weights` (1 at selected)."""
    return token_ce(
        outputs["mlm_logits"],
        batch["mlm_targets"],
        batch["mlm_weights"],
        float(options["z_loss"]),
    )


OBJECTIVE = Objective(
    name="mlm",
    heads=("mlm",),
    batch_keys=("tokens", "mlm_targets", "mlm_weights"),
    loss=loss,
    options=("z_loss",),
    count=weight_sum("mlm_weights"),
    derived=perplexity,
)
