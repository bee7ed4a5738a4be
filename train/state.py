"""TrainState: everything a step reads and writes, one pytree (checkpointed as a whole).

Randomness for step s is `fold_in(rng, s)`, never a split carried forward, so a run resumed at step
s draws exactly the dropout masks the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] PRNG key (plain array: checkpointable)

    def step_rng(self) -> jax.Array:
        return jax.random.fold_in(self.rng, self.step)
