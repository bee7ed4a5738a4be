"""Teacher-forced decoder cross-entropy for encoder-decoder models.

The loss is causal_lm's (decoder `logits` vs `targets`, weighted by `weights`; option `z_loss`);
only the name and the batch it needs differ.
"""

from __future__ import annotations

import dataclasses

from solo.objectives import causal_lm

OBJECTIVE = dataclasses.replace(
    causal_lm.OBJECTIVE,
    name="seq2seq",
    batch_keys=("src_tokens", "tokens", "targets", "weights"),
)
