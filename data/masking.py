"""BERT-style token masking as a pure numpy transform (no jax: runs inside grain workers)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    special_ids: Iterable[int],
    mask_id: int,
    rate: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    segment_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Select each non-special, non-padding token with probability `rate`; of those, replace
    `mask_frac` by `mask_id`, `random_frac` by a uniform random non-special id, keep the rest.

    Works on any shape. Padding is any special id (PAD is one) and, if given, segment_ids == 0.
    Returns (inputs int32, mlm_targets int32 = original token at selected positions else 0,
    mlm_weights float32 = 1 at selected positions).
    """
    tokens = np.asarray(tokens)
    special = np.asarray(sorted(set(special_ids)), dtype=np.int64)
    candidate = ~np.isin(tokens, special)
    if segment_ids is not None:
        candidate &= np.asarray(segment_ids) != 0
    selected = candidate & (rng.random(tokens.shape) < rate)
    u = rng.random(tokens.shape)
    to_mask = selected & (u < mask_frac)
    to_random = selected & (u >= mask_frac) & (u < mask_frac + random_frac)
    normal_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special)
    random_ids = normal_ids[rng.integers(0, len(normal_ids), size=tokens.shape)]
    inputs = np.where(to_mask, mask_id, np.where(to_random, random_ids, tokens)).astype(np.int32)
    mlm_targets = np.where(selected, tokens, 0).astype(np.int32)
    return inputs, mlm_targets, selected.astype(np.float32)
