"""Checkpoints (Orbax `CheckpointManager`, public API): save, restore with fallback, retention.

`<workdir>/checkpoints/<step>/` is an Orbax composite: state/ (the TrainState, StandardSave) and
data/ (the input iterator's JSON state); each step's eval loss is tracked for best-checkpoint
retention.

Crash safety: Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete (atomic on POSIX), so a crash mid-save leaves only a tmp dir that is never listed as a
step. Should a step dir still fail to restore (e.g. a truncated copy), `restore` falls back to the
next older step with a warning rather than refusing to resume.
Retention: the newest `train.keep` steps plus (train.keep_best) the one with the lowest eval loss.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from solo import multihost
from solo.files import path

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"
_policies = ocp.checkpoint_managers


class CheckpointError(ValueError):
    """Checkpoint params that do not fit the model; the message names the misfits."""


class Checkpointer:
    """CheckpointManager over `<workdir>/checkpoints` with items 'state' and 'data'."""

    def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        policies: list = [_policies.LatestN(n=max(int(keep), 1))]
        if keep_best:
            policies.append(_policies.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
                                            keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else _policies.AnyPreservationPolicy(policies),
            best_fn=_eval_loss, best_mode="min",
            enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only,
        )
        self.read_only = read_only
        # an epath (local or gs://); Orbax takes it as it is. Every process constructs the
        # manager and calls save/restore: Orbax has process 0 write the metadata and commit
        # each step (rename of the tmp dir) after all processes wrote their shards
        wd = path(workdir)
        self.directory: epath.Path = (wd if "://" in str(wd) else wd.absolute()) / CKPT_DIR
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

        # all processes must restore the same step (a failure on one host alone, e.g. a read
        # error, must not leave the others on a newer step, or out of the set-aside barrier)
        (state, data_state), s = first_restorable(one, steps, self.directory,
                                                  agree=multihost.all_agree)
        if not self.read_only:
            self._set_aside([t for t in steps if t > s])
        return state, data_state, s

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unrestorable steps newer than the restored one to `<step>.unrestorable-<time>`
        (kept for inspection, never deleted) so that training can save those steps again.
        Process 0 renames; every process then reloads the manager's view of the directory."""
        if not steps:
            return
        if multihost.is_primary():
            stamp = int(time.time())
            for t in steps:
                src = self.directory / str(t)
                if src.is_dir():
                    dst = src.parent / f"{t}.unrestorable-{stamp}"
                    log.warning("moving unrestorable checkpoint %s aside to %s", src, dst)
                    src.rename(dst)
        multihost.barrier("checkpoints-set-aside")
        self.manager.reload()

    def restore_params(self, abstract_params: Any, step: int) -> Any:
        """Only the params subtree of the saved TrainState (optimizer state is not read)."""
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)
        with ocp.PyTreeCheckpointer() as ckptr:  # standalone: works whatever this manager saved
            return ckptr.restore(self._state_dir(step), args=args)["params"]

    def _state_dir(self, step: int) -> epath.Path:
        return self.directory / str(step) / "state"

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
            raise CheckpointError(f"checkpoint {self.directory}/{step} params do not fit this "
                                  "model: " + "; ".join(bad[:5]))
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


def first_restorable(restore_fn, steps: list[int], directory: str,
                     agree=lambda ok: ok) -> tuple[Any, int]:
    """restore_fn(step) for the first step that restores; warns about each one that does not.
    `agree(ok)` says whether every process restored it too (multihost.all_agree), so all of
    them settle on one step."""
    errors = []
    for s in steps:
        try:
            out, why = restore_fn(s), None
        except Exception as e:  # noqa: BLE001 - fall back to the next older step, report all
            out = None
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e) else ''}"
        if agree(why is None):
            return out, s
        why = why or "another process could not restore it"
        log.warning("checkpoint step %d does not restore (%s); trying an older one", s, why)
        errors.append(f"step {s}: {why}")
    raise CheckpointError(
        f"no restorable checkpoint in {directory} ({'; '.join(errors)[:400]}); restore the "
        "checkpoints from a copy, or move the directory aside to train from scratch")


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
