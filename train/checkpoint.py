"""Checkpoints (Orbax) and the workdir: validation, resume, and loading params for inference.

Workdir layout:
    config.json          the run's latest resolved config (experiments.to_json)
    config.until-step-<N>.json  an earlier launch's config, kept when a resume changed it
    tokenizer.model      sentencepiece model (data.pipeline.build_tokenizer)
    checkpoints/<step>/  Orbax composite: state/ (TrainState, StandardSave), data/ (JSON iterator
                         state); metrics (eval_loss) tracked by Orbax for best-checkpoint retention
    metrics.jsonl        one JSON object per log/eval step (train.metrics)
    events.out.tfevents.*  TensorBoard

Crash safety: Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete (atomic on POSIX), so a crash mid-save leaves only a tmp dir that is never listed as a
step. Should a step dir still fail to restore (e.g. a truncated copy), `restore` falls back to the
next older step with a warning rather than refusing to resume.
Retention: the newest `train.keep` steps plus (train.keep_best) the one with the lowest eval loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp
from solo.model import ModelConfig, Transformer
from solo.objectives import active_objectives, get_objective
from solo.train import parallel

from solo import experiments

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
CKPT_DIR = "checkpoints"
# Model keys that do not change the parameter tree/shapes (may differ on resume).
NON_SHAPE_MODEL_KEYS = ("dropout", "dtype", "remat")


class WorkdirError(ValueError):
    """A workdir that cannot be used; the one-line message says why and what to do."""


# ----------------------------------------------------------------------------- workdir


def _shape_view(config: Any) -> dict[str, Any]:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {f"model.{k}": v for k, v in cfg.get("model", {}).items()
           if k not in NON_SHAPE_MODEL_KEYS}
    tok = cfg.get("data", {}).get("tokenizer", {})
    out.update({f"data.tokenizer.{k}": tok.get(k) for k in ("kind", "vocab_size")})
    try:  # the objectives' heads decide which head params exist
        active = active_objectives(cfg.get("objectives", {}))
        out["objectives (model heads)"] = sorted({h for n in active
                                                  for h in get_objective(n).heads})
    except ValueError:
        pass  # unknown objective names are reported by config validation
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def shape_diff(old: Any, new: Any) -> list[str]:
    a, b = _shape_view(old), _shape_view(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def read_config(workdir: str) -> ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise WorkdirError(f"{workdir}: not a solo workdir (no {CONFIG_FILE}); train into it first")
    with open(path) as f:
        return experiments.from_json(f.read())


def check_workdir(config: Any, workdir: str) -> None:
    """Fails (WorkdirError, one line) before anything is written if the workdir is unusable."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir} is not writable ({e.strerror or e}); "
                           "choose another --workdir") from None
    if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        diff = shape_diff(read_config(workdir), config)
        if diff:
            raise WorkdirError(
                f"--workdir {workdir} holds a run with a different model shape "
                f"({', '.join(diff)}); pass a new --workdir to start a fresh run")


def _latest_step_on_disk(workdir: str) -> int:
    d = os.path.join(workdir, CKPT_DIR)
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps, default=0)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_config(config: Any, workdir: str) -> None:
    """Writes the resolved config to config.json, so it always describes the latest launch.

    A resume whose config differs (more steps, another learning rate; the model shape is checked
    by check_workdir) first keeps the previous file as config.until-step-<N>.json, N = the newest
    checkpoint it produced: the workdir records every config that trained it, and config.json
    exists at every instant (archive written before the atomic replace)."""
    path = os.path.join(workdir, CONFIG_FILE)
    text = experiments.to_json(config)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return
        stem = os.path.join(workdir, f"config.until-step-{_latest_step_on_disk(workdir)}")
        archive, n = stem + ".json", 1
        while os.path.exists(archive):  # relaunched with new configs and no new checkpoint
            archive, n = f"{stem}.{n}.json", n + 1
        _write_atomic(archive, old)
    _write_atomic(path, text)


# ----------------------------------------------------------------------------- manager


class Checkpointer:
    """CheckpointManager over `<workdir>/checkpoints` with items 'state' and 'data'."""

    def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        policies: list = [pp.LatestN(n=max(int(keep), 1))]
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else pp.AnyPreservationPolicy(policies),
            best_fn=_eval_loss, best_mode="min",
            enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only,
        )
        self.read_only = read_only
        self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"),
                                             options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: Any, data_state: dict | None,
             eval_loss: float | None = None) -> bool:
        """Async save (returns once arrays are copied off-device); no-op if step exists."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, data_state, step) from `step` or the newest restorable one.

        `abstract_state` leaves are ShapeDtypeStructs carrying the *current* mesh's shardings,
        so a checkpoint written on any device count restores onto this one.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")

        def one(s):
            out = self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            return out["state"], dict(out["data"] or {})

        (state, data_state), s = _first_restorable(one, steps, self.directory)
        if not self.read_only:
            self._set_aside([t for t in steps if t > s])
        return state, data_state, s

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unrestorable steps newer than the restored one to `<step>.unrestorable-<time>`
        (kept for inspection, never deleted) so that training can save those steps again."""
        for t in steps:
            src = os.path.join(self.directory, str(t))
            if os.path.isdir(src):
                dst = f"{src}.unrestorable-{int(time.time())}"
                log.warning("moving unrestorable checkpoint %s aside to %s", src, dst)
                os.rename(src, dst)
        if steps:
            self.manager.reload()

    def restore_params(self, abstract_params: Any, step: int) -> Any:
        """Only the params subtree of the saved TrainState (optimizer state is not read)."""
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)
        with ocp.PyTreeCheckpointer() as ckptr:  # standalone: works whatever this manager saved
            return ckptr.restore(self._state_dir(step), args=args)["params"]

    def _state_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step), "state")

    def saved_param_shapes(self, step: int) -> dict[str, tuple]:
        """keystr(path) -> shape of every saved param leaf (from metadata; reads no arrays)."""
        with ocp.PyTreeCheckpointer() as ckptr:
            md = ckptr.metadata(self._state_dir(step))
        tree = getattr(md, "item_metadata", md)
        tree = getattr(tree, "tree", tree)
        return {jax.tree_util.keystr(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}

    def restore_common_params(self, params: Any, step: int) -> tuple[Any, list[str]]:
        """`params` (a live, sharded tree) with every leaf the checkpoint also has replaced by the
        saved value; returns (params, paths kept from `params`, e.g. a new head). Shape
        mismatches on shared leaves are an error naming them."""
        saved = self.saved_param_shapes(step)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [jax.tree_util.keystr(p) for p, _ in flat]
        bad = [f"{n} {saved[n]} vs {tuple(x.shape)}" for n, (_, x) in zip(names, flat, strict=True)
               if n in saved and saved[n] != tuple(x.shape)]
        if bad:
            raise WorkdirError(f"checkpoint {self.directory}/{step} params do not fit this model: "
                               + "; ".join(bad[:5]))
        keep = [n for n in names if n not in saved]
        target = _subtree(params, lambda path: jax.tree_util.keystr(path) in saved)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        restored = dict(zip(_keystrs(abstract), jax.tree.leaves(
            self.restore_params(abstract, step)), strict=True))
        leaves = [restored.get(n, x) for n, (_, x) in zip(names, flat, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, leaves), keep

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _first_restorable(restore_fn, steps: list[int], directory: str) -> tuple[Any, int]:
    """restore_fn(step) for the first step that restores; warns about each one that does not."""
    errors = []
    for s in steps:
        try:
            return restore_fn(s), s
        except Exception as e:  # noqa: BLE001 - fall back to the next older step, report all
            log.warning("checkpoint step %d failed to restore (%s: %s); trying an older one",
                        s, type(e).__name__, e)
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError(f"no restorable checkpoint in {directory}: " + "; ".join(errors))


def _keystrs(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _subtree(tree: Any, keep, path: tuple = ()) -> Any:
    """Nested dicts restricted to the leaves whose path satisfies `keep` (empty dicts dropped)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        p = (*path, jax.tree_util.DictKey(k))
        if isinstance(v, dict):
            sub = _subtree(v, keep, p)
            if sub:
                out[k] = sub
        elif keep(p):
            out[k] = v
    return out


def _eval_loss(metrics: Any) -> float:
    return float(metrics["eval_loss"])


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass
class Loaded:
    config: ConfigDict
    model: Transformer
    params: Any
    tokenizer: Any
    step: int = 0


def build_model(config: Any, vocab_size: int) -> Transformer:
    vocab = int(config.model.vocab_size) or int(vocab_size)
    return Transformer(ModelConfig.from_config(config.model, vocab_size=vocab))


def abstract_params(model: Transformer, config: Any, mesh) -> Any:
    """Unboxed ShapeDtypeStruct param tree with the mesh's shardings (logical rules)."""
    from solo.train.step import init_state_fns  # local: step imports objectives (heavier)

    init_boxed, _ = init_state_fns(model, config, _NoOpt())
    boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    return parallel.abstract_with_sharding(nn.meta.unbox(boxed),
                                           parallel.param_shardings(boxed, mesh))


class _NoOpt:
    def init(self, params):
        return ()


def load_tokenizer(workdir: str):
    from solo.data.tokenizer import Tokenizer

    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise WorkdirError(f"{workdir}: no {TOKENIZER_FILE}; the workdir is incomplete "
                           "(train into it again, or copy the tokenizer there)")
    return Tokenizer.load(path)


def load_for_inference(workdir: str, which: str | int = "latest") -> Loaded:
    """Config, model, params and tokenizer from a workdir alone. which: 'latest', 'best' (lowest
    eval loss; the latest if none has one) or a step number (a saved step, else an error listing
    them).

    Params are placed on whatever devices exist (replicated over a data-only mesh; sharded only
    where the model's logical rules map onto mesh axes > 1).
    """
    if not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} does not exist")
    config = read_config(workdir)
    tokenizer = load_tokenizer(workdir)
    model = build_model(config, tokenizer.vocab_size)
    which = str(which)
    if which not in ("latest", "best") and not which.isdigit():
        raise ValueError(f"checkpoint {which!r}; valid: 'latest', 'best' or a step number")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        steps = sorted(ckpt.all_steps(), reverse=True)
        if not steps:
            raise WorkdirError(f"{workdir}: no checkpoint in {ckpt.directory}; train first")
        if which.isdigit():
            if int(which) not in steps:
                raise WorkdirError(f"{workdir} has no checkpoint of step {which}; saved steps: "
                                   f"{sorted(steps)}")
            steps = [int(which)]  # that one or an error, never silently another
        elif which == "best" and ckpt.best_step() is not None:
            steps.insert(0, ckpt.best_step())
        mesh = parallel.make_mesh(ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
        target = abstract_params(model, config, mesh)
        params, step = _first_restorable(lambda s: ckpt.restore_params(target, s), steps,
                                         ckpt.directory)
    finally:
        ckpt.close()
    return Loaded(config=config, model=model, params=params, tokenizer=tokenizer, step=step)


def latest_step(workdir: str) -> int | None:
    """The newest checkpoint step in workdir (None if it has none); reads no arrays."""
    if not os.path.isdir(os.path.join(workdir, CKPT_DIR)):
        return None
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def has_checkpoint(workdir: str) -> bool:
    return latest_step(workdir) is not None


def dump_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
