"""The train step compiled abstractly (no params allocated, no data): for reading its HLO and its
memory use on a mesh before anything runs (tests, benchmarks/, memory budgets).

    compiled = compile_train_step(config, vocab_size=1024)
    collective_counts(compiled.as_text())      # {'collective-permute': 0, 'all-reduce': 7, ...}
    compiled.memory_analysis()                 # per-device bytes (CPU/GPU/TPU)
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solo.compile_options import train_options
from solo.config import RunConfig
from solo.train import inference, parallel
from solo.train import step as step_lib
from solo.train.optim import make_optimizer

COLLECTIVES = ("collective-permute", "all-reduce", "all-gather", "reduce-scatter", "all-to-all")


def lower_train_step(config: Any, vocab_size: int, devices: list | None = None):
    """`jax.stages.Lowered` of the jit train step for `config` on its mesh over `devices`
    (default all): abstract params (sharded as training shards them) and an abstract batch of
    data.batch_size x data.seq_len tokens."""
    config = RunConfig.from_config(config)
    mesh = parallel.make_mesh(config.train.mesh, devices)
    model = inference.build_model(config, vocab_size)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    init_boxed, init_state = step_lib.init_state_fns(model, config, tx)
    key = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(init_boxed, key)
    psh = parallel.param_shardings(boxed, mesh)
    ssh = parallel.state_shardings(tx, nn.meta.unbox(boxed), psh, mesh)
    state = parallel.abstract_with_sharding(jax.eval_shape(init_state, key), ssh)
    b, n = config.data.batch_size, config.data.seq_len
    bsh = parallel.batch_sharding(mesh)
    spec = lambda dt: jax.ShapeDtypeStruct((b, n), dt, sharding=bsh)
    batch = dict(tokens=spec(jnp.int32), targets=spec(jnp.int32), weights=spec(jnp.float32),
                 segment_ids=spec(jnp.int32), positions=spec(jnp.int32))
    fn = jax.jit(step_lib.make_train_step(model, config, tx, schedule, mesh=mesh),
                 in_shardings=(ssh, bsh), out_shardings=(ssh, parallel.replicated(mesh)),
                 donate_argnums=0)
    return fn.lower(state, batch), train_options(config)


def compile_train_step(config: Any, vocab_size: int, devices: list | None = None):
    lowered, opts = lower_train_step(config, vocab_size, devices)
    return lowered.compile(compiler_options=opts)


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective ops in compiled HLO text (async pairs counted once, by their -start)."""
    out = {}
    for op in COLLECTIVES:
        starts = len(re.findall(rf"= [^=]*? {op}-start\(", hlo_text))
        plain = len(re.findall(rf"= [^=]*? {op}\(", hlo_text))
        out[op] = starts + plain
    return out


__all__ = ["lower_train_step", "compile_train_step", "collective_counts", "COLLECTIVES"]
