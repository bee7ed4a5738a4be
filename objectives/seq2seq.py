"""Teacher-forced decoder cross-entropy for encoder-decoder models."""

from __future__ import annotations

from objectives.base import (
    Batch,
    Metrics,
    Objective,
    Options,
    perplexity,
    token_ce,
    weight_sum,
)


def loss(outputs: Batch, batch: Batch, options: Options) -> Metrics:
    """CE of decoder `logits` [B,L,V] vs `targets`, weighted by `weights`; option `z_loss`."""
    return token_ce(
        outputs["logits"], batch["targets"], batch["weights"], float(options.get("z_loss", 0.0))
    )


OBJECTIVE = Objective(
    name="seq2seq",
    heads=("lm",),
    batch_keys=("src_tokens", "tokens", "targets", "weights"),
    loss=loss,
    count=weight_sum("weights"),
    derived=perplexity,
)
