"""`train_and_evaluate(config, workdir)`: validate, prepare the workdir, init or resume, train with
periodic eval / logging / checkpointing; `evaluate(workdir)`: a checkpoint's eval-split metrics
(`solo eval` adds data overrides, splits and QA: train/eval_data.py).

Order of operations is chosen so that every user error (bad objective, task/objective mismatch,
indivisible batch, wrong mesh, unusable workdir) fails before anything is written or compiled.
Resume restores params, optimizer state, step, rng and the data iterator position, so a resumed run
is bit-identical to an uninterrupted one (same device count).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from solo import experiments, multihost
from solo.compile_options import train_options
from solo.config import ConfigError, RunConfig
from solo.data import pipeline
from solo.data.tasks import TASKS, get_task
from solo.experiments.base import get_config
from solo.files import path
from solo.model import attention, flops_per_token
from solo.model import sharding as model_sharding
from solo.objectives import get_objective, summarize
from solo.train import checkpoint as ckpt_lib
from solo.train import inference, lora, parallel, preemption, runtime
from solo.train import metrics as metrics_lib
from solo.train import workdir as wd_lib
from solo.train.optim import make_optimizer
from solo.train.peaks import peak_flops
from solo.train.step import Stepper, init_state_fns, make_eval_step


class TrainConfigError(ConfigError):
    """A config that cannot train; the message names the keys and the fix."""


def validate_config(config: RunConfig, mesh, *, batches: bool = True) -> None:
    """What no single section can check: objectives vs the task's batches, batch sizes vs the
    mesh (`batches`; evaluation pads its batches instead), the parallel mode vs the mesh. (Each
    section validated itself when it was built.)"""
    if not config.objectives:
        raise TrainConfigError("config.objectives: no objective has a nonzero weight")
    task = get_task(config.data.task)
    for name in config.objectives:
        missing = [k for k in get_objective(name).batch_keys if k not in task.batch_keys]
        if missing:
            fits = [t.name for t in TASKS.values()
                    if all(k in t.batch_keys for o in config.objectives
                           for k in get_objective(o).batch_keys)]
            raise TrainConfigError(
                f"objective {name!r} needs batch keys {missing} that data.task={task.name!r} "
                f"does not provide; use data.task in {fits or 'none (objectives incompatible)'}")
    dp, k = parallel.data_parallel_size(mesh), config.optim.grad_accum
    bs, ebs = config.data.batch_size, config.data.eval_batch
    if batches and bs % (dp * k):
        raise TrainConfigError(
            f"data.batch_size={bs} must be divisible by data-parallel size {dp} x "
            f"optim.grad_accum {k} = {dp * k}")
    if batches and ebs % dp:
        raise TrainConfigError(
            f"data.eval_batch_size={ebs} must be divisible by data-parallel size {dp}")
    if config.train.parallel == "pmap" and mesh.shape["fsdp"] * mesh.shape["tensor"] != 1:
        raise TrainConfigError("train.parallel='pmap' is data-parallel only: set "
                               "train.mesh.fsdp=1 and train.mesh.tensor=1 (or use 'jit')")
    try:  # model dims vs mesh axes (heads, kv heads, MLP, vocabulary; issue 13)
        model_sharding.check_divisible(config.model, dict(mesh.shape))
    except ValueError as e:
        raise TrainConfigError(str(e)) from None


def _add(a, b):
    return b if a is None else jax.tree.map(lambda x, y: x + y, a, b)


def _summary(metrics, config: RunConfig) -> dict[str, float]:
    """summarize() plus the weighted total 'loss' over objectives (the eval/best-ckpt criterion)."""
    out = summarize(metrics)
    if "loss" not in out:
        out["loss"] = sum(float(o["weight"]) * out[f"{n}/loss"]
                          for n, o in config.objectives.items())
    return out


def run_eval(eval_fn, params, config: RunConfig, tokenizer) -> dict[str, float]:
    """Token-weighted metrics over the validation split (whole split unless train.eval_batches)."""
    batches = pipeline.eval_batches(
        config.data, tokenizer, "validation", process_index=jax.process_index(),
        process_count=jax.process_count(), max_batches=config.train.eval_batches)
    acc = None
    for batch in batches:
        acc = _add(acc, eval_fn(params, batch))
    if acc is None:
        raise ValueError("the validation split is empty; raise data.val_fraction")
    return _summary(jax.device_get(acc), config)


def _prepare_init_from(config: RunConfig) -> None:
    """Makes sure config.train.init_from has a checkpoint (importing init_import or training
    init_experiment if asked; with init_experiment, a run stopped before its last step is
    finished first)."""
    src, exp = config.train.init_from, config.train.init_experiment
    latest = wd_lib.latest_step(src)
    if latest is None and config.train.init_import:
        from solo.train.hub import import_model

        if jax.process_count() > 1:  # an import is one process's job (staged local files)
            raise wd_lib.WorkdirError(
                f"train.init_from={src} has no checkpoint and this is a multi-process run: "
                f"`solo import {config.train.init_import} --workdir {src}` once first")

        print(f"train.init_from={src} has no checkpoint: importing {config.train.init_import} "
              "into it first", file=sys.stderr)
        import_model(config.train.init_import, src)
        return
    if latest is not None and (not exp or latest >= int(wd_lib.read_config(src).train.steps)):
        return
    if not exp:
        raise wd_lib.WorkdirError(f"train.init_from={src} has no checkpoint; train it first "
                                    "or set train.init_experiment")
    if latest is not None:  # stopped before its end (e.g. preempted): finish it
        print(f"train.init_from={src} stopped at step {latest}: resuming it first",
              file=sys.stderr)
        train_and_evaluate(wd_lib.read_config(src), src)
        return
    print(f"train.init_from={src} has no checkpoint: training {exp} into it first",
          file=sys.stderr)
    train_and_evaluate(experiments.load_config(exp), src)


def _init_from(config: RunConfig, params: Any) -> Any:
    """`params` with every leaf that config.train.init_from's latest checkpoint has replaced by
    its value (same model shape required); leaves it lacks (a new head) keep their fresh init."""
    src = config.train.init_from
    diff = [k for k in wd_lib.shape_diff(wd_lib.read_config(src), config)
            if k.startswith("model.")]
    if diff:
        raise wd_lib.WorkdirError(f"train.init_from={src} has a different model shape "
                                    f"({', '.join(diff)}); it cannot initialise this run")
    c = ckpt_lib.Checkpointer(src, read_only=True)
    try:
        params, fresh = c.restore_common_params(params, c.latest_step())
    finally:
        c.close()
    adapters = [k for k in fresh if k.startswith("['lora']")]
    fresh = [k for k in fresh if k not in adapters]
    if adapters:  # expected: LoRA adapters start as lora.add made them (B = 0)
        print(f"init_from: {len(adapters)} LoRA adapter arrays start fresh", file=sys.stderr)
    if fresh:
        print(f"init_from: {len(fresh)} params not in {src} keep their fresh init: "
              f"{', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}", file=sys.stderr)
    return params


@dataclasses.dataclass
class _Run:
    """Everything built once per train_and_evaluate call."""

    config: RunConfig
    workdir: str
    mesh: Any
    model: Any
    tokenizer: Any
    tx: Any
    schedule: Any
    init_state: Any
    key: Any
    state_sharding: Any
    abstract_state: Any
    profiler: Any = None  # runtime.Profiler (train.profile_steps)


def _setup(config: RunConfig, workdir: str) -> _Run:
    """Validation first (nothing written on error), then workdir, tokenizer, model, shardings."""
    mesh = parallel.make_mesh(config.train.mesh)
    validate_config(config, mesh)
    if config.train.init_from:
        _prepare_init_from(config)
        if config.train.init_model:  # a pretrained model's architecture is its own
            src = RunConfig.from_config(wd_lib.read_config(config.train.init_from))
            config = config.replace(model=src.model)
            validate_config(config, mesh)
    wd_lib.check_workdir(config, workdir)
    if config.train.init_from:
        if not path(wd_lib.tokenizer_path(workdir)).exists():
            # the init run's tokenizer, or its params are garbage
            tok = dataclasses.replace(config.data.tokenizer,
                                      path=wd_lib.tokenizer_path(config.train.init_from))
            config = config.replace(data=config.data.replace(tokenizer=tok))
    tokenizer = pipeline.build_tokenizer(config.data, workdir)
    wd_lib.write_config(config, workdir)
    model = inference.build_model(config, tokenizer.vocab_size)
    print(attention.describe(model.cfg.attention, config.data.seq_len, model.cfg.head_dim,
                             model.cfg.dtype), file=sys.stderr)  # the path in use (issue 13)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    key = jax.random.PRNGKey(config.seed)
    boxed = jax.eval_shape(init_state_fns(model, config, tx)[0], key)  # params only: no tx
    if config.lora.rank > 0:
        tx = lora.freeze_base(tx, nn.meta.unbox(boxed))
    init_state = init_state_fns(model, config, tx)[1]
    params_sh = parallel.param_shardings(boxed, mesh)
    state_sh = parallel.state_shardings(tx, nn.meta.unbox(boxed), params_sh, mesh)
    abstract_state = parallel.abstract_with_sharding(jax.eval_shape(init_state, key), state_sh)
    return _Run(config, workdir, mesh, model, tokenizer, tx, schedule, init_state, key, state_sh,
                abstract_state)


def train_and_evaluate(config: ConfigDict | RunConfig, workdir: str) -> dict[str, Any]:
    """Train config.train.steps steps into workdir (resuming if it has a checkpoint).

    Returns {'step', 'train': last logged train metrics, 'eval': last eval metrics, 'workdir',
    'num_devices', 'flops_per_token'}. SIGTERM or Ctrl-C ends it after the current step with a
    checkpoint of that step and raises `preemption.Stopped` (see train/preemption.py).
    """
    if not isinstance(config, RunConfig):  # join first: resolving model 'auto' keys starts jax
        multihost.initialize(multihost.DistConfig.from_config(config.dist))
    config = RunConfig.from_config(config)
    multihost.initialize(config.dist)  # multi-host: before any device is used (solo/multihost.py)
    runtime.set_compilation_cache(config.train.compilation_cache_dir)
    run = _setup(config, workdir)
    config = run.config
    run.profiler = runtime.Profiler(config.train.profile_range, workdir)
    train_iter = pipeline.make_train_iterator(config.data, run.tokenizer,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep,
                                 keep_best=config.train.keep_best)
    writer = metrics_lib.MetricWriter(workdir)
    progress = metrics_lib.Progress(config.train.steps)
    with preemption.StopSignals() as signals:
        try:
            if ckpt.latest_step() is not None:
                state, data_state, restored = ckpt.restore(run.abstract_state)
                train_iter.set_state(data_state)
                writer.truncate(restored)  # rows of the steps after it are redone
                progress.message(f"resumed from {ckpt.directory}/{restored}")
            else:
                writer.truncate(0)  # rows of a run that died before its first checkpoint
                state = jax.jit(run.init_state, out_shardings=run.state_sharding)(run.key)
                if config.train.init_from:
                    state = state.replace(params=_init_from(config, state.params))
                    progress.message(f"params initialised from {config.train.init_from}")
            return _loop(run, state, train_iter, ckpt, writer, progress, signals)
        finally:  # also on a stop or Ctrl-C: finish the in-flight async save (the latest step)
            run.profiler.stop()
            ckpt.wait()
            ckpt.close()
            writer.close()
            progress.end()


def _stop_signal(signals: preemption.StopSignals, ckpt, step: int) -> int | None:
    if jax.process_count() == 1:
        return signals.signum
    return signal.SIGTERM if ckpt.manager.reached_preemption(step) else None


class Diverged(Exception):
    """A step's loss or gradient norm was not finite (and no skip was left); nothing non-finite
    was saved. `solo train` prints the message and exits 3."""

    def __init__(self, step: int, last_checkpoint: int | None, skipped: int):
        self.step, self.last_checkpoint = step, last_checkpoint
        where = (f"the last checkpoint (all finite) is step {last_checkpoint}"
                 if last_checkpoint is not None else "no checkpoint was saved")
        also = (f" after {skipped} skipped step(s) (train.max_skipped_steps)" if skipped else "")
        fix = "" if skipped else (", or set train.max_skipped_steps=N to skip up to N such "
                                  "steps")
        super().__init__(
            f"the loss or gradient norm is not finite at step {step}{also}: training stopped; "
            f"{where}. Lower optim.lr (or raise optim.warmup_steps){fix}")


class _Guard:
    """The divergence guard. Each step's `nonfinite` flag is read one step late (the next step
    is already queued, so the device never idles), and at once before anything is logged,
    evaluated or saved: a non-finite state is never checkpointed."""

    def __init__(self, max_skipped: int, ckpt):
        self.max_skipped, self.ckpt = max_skipped, ckpt
        self.skipped, self.pending = 0, None

    def push(self, step: int, metrics) -> None:
        self.check()
        self.pending = (step, metrics["nonfinite"][0])

    def check(self) -> None:
        if self.pending is None:
            return
        step, flag = self.pending
        self.pending = None
        if float(flag) > 0:
            self.skipped += 1
            if self.skipped > self.max_skipped:
                self.ckpt.wait()
                raise Diverged(step, self.ckpt.latest_step(), self.skipped - 1)


def _loop(run: _Run, state, train_iter, ckpt, writer, progress, signals) -> dict[str, Any]:
    config, total = run.config, run.config.train.steps
    stepper = Stepper(run.model, config, run.tx, run.schedule, run.mesh, run.state_sharding)
    dstate = stepper.device_state(state)
    start = int(np.asarray(jax.device_get(state.step)))
    tokens_per_step = config.data.batch_size * config.data.seq_len
    fpt = flops_per_token(run.model.cfg, config.data.seq_len)
    ndev = run.mesh.devices.size
    peak = peak_flops(run.model.cfg.dtype)[0]  # per device, for the compute dtype
    log_every, eval_every = config.train.log_every, config.train.eval_every
    ckpt_every = config.train.ckpt_every
    guard = _Guard(config.train.max_skipped_steps, ckpt)
    acc, train_summary, eval_summary = None, {}, {}
    t0, timed, sec_per_step, tok_s = time.time(), 0, float("nan"), float("nan")

    def log(step: int) -> None:
        """One train row for the steps since the last one (also a partial window at a stop)."""
        nonlocal acc, train_summary, t0, timed, sec_per_step, tok_s
        train_summary = _summary(jax.device_get(acc), config)
        del train_summary["nonfinite"]  # the guard's flag: skipped_steps counts them
        train_summary["skipped_steps"] = float(guard.skipped)
        if timed:
            sec_per_step = (time.time() - t0) / timed
            tok_s = tokens_per_step / sec_per_step
            t0, timed = time.time(), 0
        train_summary.update(getattr(train_iter, "metrics", dict)())  # mixture proportions
        train_summary.update(lr=float(run.schedule(step - 1)), tokens_per_sec=tok_s,
                             step_time=sec_per_step,
                             mfu=metrics_lib.mfu(fpt, tok_s, ndev, peak=peak))
        # no value, not NaN, where a window has no data: a loss of skipped steps only (0 of 0),
        # the throughput of the first window (its one step is the compilation)
        train_summary = {k: v for k, v in train_summary.items() if not math.isnan(v)}
        writer.write(step, "train", train_summary)
        progress.update(step, train_summary.get("loss", math.nan), tok_s, sec_per_step)
        acc = None

    if start == 0 and config.train.eval_at_start:  # the "before" of a fine-tune, at step 0
        first = run_eval(stepper.eval, dstate.params, config, run.tokenizer)
        writer.write(0, "eval", first)
        progress.message(f"eval step 0: loss {first['loss']:.4g}")
    step = start
    for step in range(start + 1, total + 1):
        run.profiler.before(step)
        dstate, m = stepper.train(dstate, next(train_iter))
        run.profiler.after(step, m)
        guard.push(step, m)
        acc = _add(acc, m)
        timed += 1
        if step == start + 1:  # exclude compilation from throughput
            jax.block_until_ready(acc)
            t0, timed = time.time(), 0
        last = step == total
        stop = None if last else _stop_signal(signals, ckpt, step)
        do_log = bool(log_every and step % log_every == 0) or last or stop is not None
        do_eval = bool(eval_every and step % eval_every == 0) or last
        do_save = bool(ckpt_every and step % ckpt_every == 0) or last or stop is not None
        if do_log or do_eval or do_save:
            guard.check()
        if do_log:
            log(step)
        paused = time.time()  # eval and checkpoint time is not training throughput
        if do_eval:
            eval_summary = run_eval(stepper.eval, dstate.params, config, run.tokenizer)
            writer.write(step, "eval", eval_summary)
            progress.message(f"eval step {step}: loss {eval_summary['loss']:.4g}")
        if do_save:
            ckpt.save(step, stepper.host_state(dstate), train_iter.get_state(),
                      eval_summary["loss"] if do_eval else None)
        if stop is not None:
            raise preemption.Stopped(step, stop)
        t0 += time.time() - paused
    if start >= total:  # already finished: report the eval of the restored params
        eval_summary = run_eval(stepper.eval, dstate.params, config, run.tokenizer)
    return {"step": max(step, start), "train": train_summary, "eval": eval_summary,
            "workdir": run.workdir, "num_devices": ndev, "flops_per_token": fpt}


def mesh_eval_fn(loaded, config: RunConfig) -> Callable[[Any, dict], Any]:
    """`loaded`'s (train.inference.load) eval step on every device, taking host batches
    (pipeline.eval_batches: data.eval_batch_size real rows each on any device count). Each
    process's rows are padded with all-zero rows to a multiple of its devices: padding carries
    zero weight, so every metric, a batch-coupled one such as InfoNCE's in-batch retrieval
    included, is the one the training run's eval reported."""
    mesh = parallel.data_mesh()
    local = mesh.devices.size // jax.process_count()
    params_sh = jax.tree.map(lambda x: x.sharding, loaded.params)
    eval_fn = jax.jit(make_eval_step(loaded.model, config),
                      in_shardings=(params_sh, parallel.batch_sharding(mesh)),
                      out_shardings=parallel.replicated(mesh),
                      compiler_options=train_options(config))

    def fn(params: Any, batch: dict[str, np.ndarray]) -> Any:
        extra = -len(next(iter(batch.values()))) % local
        if extra:
            batch = {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
                     for k, v in batch.items()}
        return eval_fn(params, parallel.shard_batch(batch, mesh))

    return fn


def evaluate(workdir: str, checkpoint: str | int = "latest",
             dist: multihost.DistConfig | None = None) -> dict[str, Any]:
    """Eval-split metrics of a workdir's checkpoint ('latest', 'best' or a step number), on the
    devices present. `dist`: how this launch joins other processes (default: config.dist's
    defaults, i.e. automatic on a detected cluster; a workdir's config.json never says)."""
    multihost.initialize(dist or multihost.DistConfig.from_config(get_config().dist))
    loaded = inference.load(workdir, checkpoint)
    config = loaded.config
    out = run_eval(mesh_eval_fn(loaded, config), loaded.params, config, loaded.tokenizer)
    return {"step": loaded.step, "eval": out, "workdir": workdir, "config": config}
