"""The train and eval steps: one pure function each, then jit (mesh) or pmap wrappers.

`make_train_step` is the single place where the update is defined (loss formulation, gradient
accumulation, clipping + AdamW via `tx`): both parallel modes wrap the same function.

Loss normalisation: every microbatch / device loss is `sum_o w_o * sum_o(micro) / den_o(full)` with
`den_o` the full global batch's denominator (`objectives.denominators`, psummed under pmap), so the
summed gradients of k microbatches on n devices equal the gradient of one big batch exactly (up to
float reassociation). Metrics are (sum, count) pairs and are summed the same way. Losses that
couple rows (InfoNCE's in-batch negatives) cannot be split so; they get gradient caching
(`cached_grads`): the loss sees the whole batch, the backward runs per microbatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from solo.compile_options import train_options
from solo.model import init_params
from solo.model import sharding as model_sharding
from solo.objectives import (
    active_objectives,
    compute_loss,
    denominators,
    forward,
    get_objective,
    model_heads,
)
from solo.train import lora, parallel
from solo.train.state import TrainState

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def objective_names(config: Any) -> list[str]:
    return list(active_objectives(config.objectives))


def init_state_fns(model: nn.Module, config: Any, tx: optax.GradientTransformation
                   ) -> tuple[Callable[[jax.Array], Any], Callable[[jax.Array], TrainState]]:
    """(boxed params init, TrainState init) from one seed key; both pure, for eval_shape/jit."""
    heads = model_heads(config.objectives)
    seq_len, src_seq_len = int(config.data.seq_len), int(config.data.src_seq_len)

    def with_adapters(params, key, boxed):
        return lora.add(params, config.lora, jax.random.fold_in(key, 1), boxed=boxed)

    def init_boxed(key):
        init_key = jax.random.split(key)[0]
        return with_adapters(init_params(model, init_key, heads, seq_len, src_seq_len),
                             init_key, True)

    def init_state(key):
        init_key, rng = jax.random.split(key)
        params = nn.meta.unbox(init_params(model, init_key, heads, seq_len, src_seq_len))
        params = with_adapters(params, init_key, False)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=rng)

    return init_boxed, init_state


def _microbatches(x: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with microbatch j = rows j, j+k, ...: every device keeps an equal
    share of every microbatch (the batch is sharded contiguously along B)."""
    b = x.shape[0]
    if b % k:
        raise ValueError(f"batch of {b} rows is not divisible by optim.grad_accum={k}")
    x = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
    if mesh is not None:
        axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, axes)))
    return x


def make_train_step(model: nn.Module, config: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, axis_name: str | None = None,
                    mesh: Mesh | None = None) -> Callable[[TrainState, dict], tuple]:
    """Pure `train_step(state, batch) -> (state, metrics)`; axis_name set = inside pmap."""
    names = objective_names(config)
    obj_cfg = config.objectives
    k = int(config.optim.grad_accum)
    skip_nonfinite = config.train.max_skipped_steps > 0

    coupled = any(get_objective(n).batch_coupled for n in names)

    apply = lora.apply_fn(model.apply, config.lora)

    def outputs_fn(params, batch, rng):
        return forward(apply, params, batch, names, deterministic=False, rngs={"dropout": rng})

    def loss_fn(params, batch, dens, rng):
        outputs = outputs_fn(params, batch, rng)
        return compute_loss(outputs, batch, obj_cfg, dens, axis_name=axis_name)

    # With LoRA only the adapters are differentiated (the base's gradient, never used, is then
    # never computed: ~1/3 of a step's matmuls); `trainable`/`merged` are identities otherwise.
    frozen = config.lora.rank > 0
    trainable = (lambda p: p[lora.KEY]) if frozen else (lambda p: p)
    merged = (lambda p, t: {**p, lora.KEY: t}) if frozen else (lambda p, t: t)

    def grad_fn(params, batch, dens, rng):
        return jax.value_and_grad(lambda t: loss_fn(merged(params, t), batch, dens, rng),
                                  has_aux=True)(trainable(params))

    def summed_grads(params, micro, dens, rng):
        """Row-separable losses: each microbatch's (loss, metrics, grads), summed (exact, since
        every microbatch is normalised by the whole batch's denominators)."""
        def body(carry, xs):
            i, mb = xs
            (loss_i, m), g = grad_fn(params, mb, dens, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss_i, m, g)), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, first, dens, rng)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zero = (zero[0][0], zero[0][1], zero[1])
        (loss, metrics, grads), _ = jax.lax.scan(body, zero, (jnp.arange(k), micro))
        return loss, metrics, grads

    def cached_grads(params, micro, dens, rng):
        """Gradient caching (Gao et al. 2021) for batch-coupled losses (InfoNCE): pass 1 runs
        every microbatch forward without keeping activations and collects the outputs; the loss
        and its gradient w.r.t. those outputs are taken on the whole batch (all negatives); pass
        2 re-runs each microbatch forward (same dropout key) and pulls that cotangent back to
        the params. Exact: the update equals one big batch's, for ~1 extra forward pass.
        Outputs with a row axis are [k, rows, ...] when stacked; row-free ones (a learned logit
        scale) are the same for every microbatch, so their cotangent goes to microbatch 0 only."""
        idx = jnp.arange(k)
        outs = jax.lax.map(lambda xs: outputs_fn(params, xs[1], jax.random.fold_in(rng, xs[0])),
                           (idx, micro))
        rows = {n: x.ndim >= 2 for n, x in outs.items()}
        merge = lambda x: x.reshape(-1, *x.shape[2:])  # microbatch-major row order, as `micro`
        whole = {n: merge(x) if rows[n] else x[0] for n, x in outs.items()}
        (loss, metrics), d_whole = jax.value_and_grad(
            lambda o: compute_loss(o, jax.tree.map(merge, micro), obj_cfg, dens,
                                   axis_name=axis_name), has_aux=True)(whole)
        cts = {n: d.reshape(outs[n].shape) if rows[n] else jnp.zeros_like(outs[n]).at[0].set(d)
               for n, d in d_whole.items()}

        def body(acc, xs):
            i, mb, ct = xs
            _, pull = jax.vjp(lambda t: outputs_fn(merged(params, t), mb,
                                                   jax.random.fold_in(rng, i)), trainable(params))
            return jax.tree.map(jnp.add, acc, pull(ct)[0]), None

        zero = jax.tree.map(jnp.zeros_like, trainable(params))
        grads, _ = jax.lax.scan(body, zero, (idx, micro, cts))
        return loss, metrics, grads

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        rng = state.step_rng()
        dens = denominators(batch, obj_cfg)
        if axis_name is not None:  # pmap: the state is replicated, so each device folds in its
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))  # own dropout draws
            dens = jax.lax.psum(dens, axis_name)
        if k == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, dens, rng)
        else:
            micro = jax.tree.map(lambda x: _microbatches(x, k, mesh), batch)
            accumulate = cached_grads if coupled else summed_grads
            loss, metrics, grads = accumulate(state.params, micro, dens, rng)
        if axis_name is not None:
            loss, metrics, grads = jax.lax.psum((loss, metrics, grads), axis_name)
        grad_norm = optax.tree.norm(grads)
        if frozen:  # the optimizer sees the whole tree; the base's zeros are never read
            grads = merged(jax.tree.map(jnp.zeros_like, state.params), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if frozen:  # only the adapters move: the base stays bit for bit
            params = {**state.params, lora.KEY: optax.apply_updates(state.params[lora.KEY],
                                                                   updates[lora.KEY])}
        else:
            params = optax.apply_updates(state.params, updates)
        one = jnp.float32(1.0)
        metrics = {**metrics, "loss": (loss, one), "grad_norm": (grad_norm, one),
                   "lr": (jnp.asarray(schedule(state.step), jnp.float32), one)}
        # the divergence guard (train.loop) reads `nonfinite`; with train.max_skipped_steps a
        # bad step changes nothing but the step counters and stays out of the metric sums
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)
            params = jax.tree.map(keep, params, state.params)
            opt_state = _skipped(keep, opt_state, state.opt_state)
            metrics = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), metrics)
        metrics["nonfinite"] = (1.0 - finite.astype(jnp.float32), one)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return _with_activation_sharding(train_step, mesh)


def _skipped(keep: Callable, new: Any, old: Any) -> Any:
    """The optimizer state after a step `keep` may skip: Adam's moments and its count stay (its
    bias correction counts the updates applied), the lr schedule's count follows the step (the
    logged lr is the one applied, and the run still ends at its minimum lr)."""
    def schedule(x) -> bool:
        return isinstance(x, optax.ScaleByScheduleState)

    return jax.tree.map(lambda n, o: n if schedule(n) else jax.tree.map(keep, n, o),
                        new, old, is_leaf=schedule)


def _with_activation_sharding(fn: Callable, mesh: Mesh | None) -> Callable:
    """fn traced with the model's activation sharding constraints on `mesh` (jit steps)."""
    if mesh is None:
        return fn

    def sharded(*args):
        with model_sharding.activation_sharding(mesh):
            return fn(*args)

    return sharded


def make_eval_step(model: nn.Module, config: Any, *, axis_name: str | None = None,
                   mesh: Mesh | None = None) -> Callable[[Any, dict], Metrics]:
    """Pure `eval_step(params, batch) -> metrics` ((sum, count) pairs, summed over devices)."""
    names = objective_names(config)

    apply = lora.apply_fn(model.apply, config.lora)

    def eval_step(params, batch):
        outputs = forward(apply, params, batch, names, deterministic=True)
        _, metrics = compute_loss(outputs, batch, config.objectives, None, axis_name=axis_name)
        if axis_name is not None:
            metrics = jax.lax.psum(metrics, axis_name)
        return metrics

    return _with_activation_sharding(eval_step, mesh)


class PmapWithOptions:
    """A pmapped function compiled with XLA `compiler_options`, which `jax.pmap` does not take:
    lowered and compiled once per argument signature (shapes, dtypes), on first use."""

    def __init__(self, fn: Callable, options: dict | None):
        self.fn, self.options, self._compiled = fn, options, {}

    def __call__(self, *args):
        if self.options is None:
            return self.fn(*args)
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if key not in self._compiled:
            self._compiled[key] = self.fn.lower(*args).compile(compiler_options=self.options)
        return self._compiled[key](*args)


class Stepper:
    """Compiled steps for one parallel mode, plus host<->device glue.

    The canonical state (what is checkpointed) is always a mesh-sharded TrainState; under pmap
    `device_state` replicates it along a leading device axis and `host_state` undoes that.
    """

    def __init__(self, model: nn.Module, config: Any, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, mesh: Mesh, state_sharding: TrainState):
        self.mode = str(config.train.parallel)
        self.mesh, self.state_sharding = mesh, state_sharding
        opts = train_options(config)
        if self.mode == "jit":
            batch_sh = parallel.batch_sharding(mesh)
            rep = parallel.replicated(mesh)
            self._train = jax.jit(
                make_train_step(model, config, tx, schedule, mesh=mesh),
                in_shardings=(state_sharding, batch_sh), out_shardings=(state_sharding, rep),
                donate_argnums=0, compiler_options=opts)
            self._eval = jax.jit(make_eval_step(model, config, mesh=mesh),
                                 in_shardings=(state_sharding.params, batch_sh),
                                 out_shardings=rep, compiler_options=opts)
        elif self.mode == "pmap":
            self.devices = list(mesh.devices.flat)
            self._train = PmapWithOptions(jax.pmap(
                make_train_step(model, config, tx, schedule, axis_name="data"),
                axis_name="data", donate_argnums=0, devices=self.devices), opts)
            self._eval = PmapWithOptions(jax.pmap(
                make_eval_step(model, config, axis_name="data"), axis_name="data",
                devices=self.devices), opts)
        else:
            raise ValueError(f"train.parallel={self.mode!r}; valid: 'jit', 'pmap'")

    def device_state(self, state: TrainState) -> TrainState:
        """Under pmap: replicate along a leading device axis, with exactly the sharding pmap
        outputs carry (Mesh(devices, ('data',))), else the 2nd step would recompile."""
        if self.mode != "pmap":
            return state
        n = len(self.devices)
        sh = NamedSharding(Mesh(np.asarray(self.devices), ("data",)), PartitionSpec("data"))
        tile = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n, *x.shape)), t)
        return jax.jit(tile, out_shardings=sh)(state)

    def host_state(self, state: TrainState) -> TrainState:
        if self.mode == "pmap":
            return jax.device_put(jax.tree.map(lambda x: x[0], state), self.state_sharding)
        return state

    def params(self, state: TrainState) -> Any:
        """Unreplicated params of a device state."""
        return jax.tree.map(lambda x: x[0], state.params) if self.mode == "pmap" else state.params

    def step_of(self, state: TrainState) -> int:
        return int(np.asarray(state.step).reshape(-1)[0])

    def _place(self, batch: dict) -> dict:
        if self.mode == "pmap":
            return parallel.split_for_pmap(batch, self.devices)  # by this process's devices
        return parallel.shard_batch(batch, self.mesh)

    def _first(self, metrics):
        return jax.tree.map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics

    def train(self, state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        state, metrics = self._train(state, self._place(batch))
        return state, self._first(metrics)

    def eval(self, device_params: Any, batch: dict) -> Metrics:
        """`device_params` = `device_state(state).params` (replicated under pmap)."""
        return self._first(self._eval(device_params, self._place(batch)))
