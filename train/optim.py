"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

Schedule (step s, peak lr, W warmup, T = optim.decay_steps or train.steps, r = min_lr_ratio):
    s < W:  lr * (s + 1) / W          (the very first update already moves; 0 only if W huge)
    else:   lr * (r + (1 - r) * 0.5 * (1 + cos(pi * min(s - W, T - W) / (T - W))))
so lr ends at r * lr at step T and stays there.

Weight decay applies only to matmul weights. A leaf is decayed iff
  * it is not under the `embedder` module (token / position / token-type tables: decaying them
    shrinks rare-token rows toward 0, the usual GPT/T5 practice is to exclude them),
  * its name does not end in `bias` or `scale` (attention's q/k/v biases are [H, K]: rank 2, yet
    biases, which nanoGPT and HF leave undecayed), and
  * its rank, not counting the leading scan axis of a scanned stack (path has `layers`), is >= 2.
The rank test catches any other vector or scalar.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    peak = float(optim_cfg.lr)
    warmup = max(int(optim_cfg.warmup_steps), 0)
    decay = int(optim_cfg.decay_steps) or int(total_steps)
    ratio = float(optim_cfg.min_lr_ratio)
    span = max(decay - warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum((s + 1.0) / max(warmup, 1), 1.0)
        t = jnp.clip(s - warmup, 0.0, span) / span
        cos = peak * (ratio + (1.0 - ratio) * 0.5 * (1.0 + jnp.cos(math.pi * t)))
        return jnp.where(s < warmup, warm, cos)

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params: Any) -> Any:
    """Bool tree: True where weight decay applies (see module docstring)."""

    def keep(path, x) -> bool:
        names = _path_names(path)
        rank = jnp.ndim(x) - (1 if "layers" in names else 0)
        return ("embedder" not in names and not names[-1].endswith(("bias", "scale"))
                and rank >= 2)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                               optax.Schedule]:
    """(tx, lr schedule): clip_by_global_norm (if clip_norm > 0) then AdamW with the mask."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if float(optim_cfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim_cfg.b1),
            b2=float(optim_cfg.b2),
            eps=float(optim_cfg.eps),
            weight_decay=float(optim_cfg.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
