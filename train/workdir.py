"""The work directory: its layout, the config and tokenizer files, checks before a run writes.

    config.json              the run's latest resolved config (experiments.to_json)
    config.until-step-<N>.json  an earlier launch's config, kept when a resume changed it
    tokenizer.model          the sentencepiece model (+ tokenizer.json, its training settings)
    tokenizer/               or a pretrained model's: tokenizer.json + tokenizer_config.json
    checkpoints/<step>/      Orbax: state/ + data/ (train/checkpoint.py)
    metrics.jsonl            one JSON object per log/eval step (train/metrics.py)
    events.out.tfevents.*    TensorBoard

Nothing reads the experiment file again: config.json and the tokenizer are the run's truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from typing import Any

from ml_collections import ConfigDict

from solo import experiments, multihost
from solo.config import ConfigError, RunConfig
from solo.experiments.base import get_config
from solo.files import join, path, write_atomic
from solo.model.config import ModelConfig
from solo.objectives import model_heads
from solo.train.checkpoint import CKPT_DIR, Checkpointer

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
# Model keys that do not change the parameter tree/shapes (may differ on resume).
NON_SHAPE_MODEL_KEYS = ("dropout", "dtype", "remat")


class WorkdirError(ValueError):
    """A workdir that cannot be used; the one-line message says why and what to do."""


def _shape_view(config: Any) -> dict[str, Any]:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    try:  # resolved values: num_kv_heads 0 and num_kv_heads = num_heads are the same shape
        model = dataclasses.asdict(ModelConfig.from_config(ConfigDict(cfg["model"])))
    except (ConfigError, ValueError, TypeError):
        model = dict(cfg["model"])  # invalid: compared as written, reported by validation
    out = {f"model.{k}": v for k, v in model.items() if k not in NON_SHAPE_MODEL_KEYS}
    tok = cfg["data"]["tokenizer"]
    out.update({f"data.tokenizer.{k}": tok[k] for k in ("kind", "vocab_size")})
    try:  # the objectives' heads decide which head params exist
        out["objectives (model heads)"] = list(model_heads(cfg["objectives"]))
    except ValueError:
        pass  # unknown objective names are reported by config validation
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def shape_diff(old: Any, new: Any) -> list[str]:
    a, b = _shape_view(old), _shape_view(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _upgrade(saved: dict, base: dict, path: str = "") -> tuple[list[str], list[str]]:
    """Brings a config written by an older solo to today's keys, in place: a key base.py gained
    since takes its default there (new keys default to the old behaviour), a key base.py no
    longer has is dropped. Objectives: only the options of the entries the run has. Returns
    (added, dropped) dotted keys."""
    added, dropped = [], []
    for key in list(saved):
        if key not in base and path != "objectives.":
            dropped.append(path + key)
            del saved[key]
    for key, default in base.items():
        if path == "objectives." and key not in saved:
            continue  # an objective the run does not use
        if key not in saved:
            saved[key] = default
            added.append(path + key)
        elif isinstance(default, dict) and isinstance(saved[key], dict):
            a, d = _upgrade(saved[key], default, f"{path}{key}.")
            added, dropped = added + a, dropped + d
    return added, dropped


def read_config(workdir: str) -> ConfigDict:
    """The run's config.json, brought to today's keys (see _upgrade; one warning if it was)."""
    cfg_path = join(workdir, CONFIG_FILE)
    if not path(cfg_path).is_file():
        raise WorkdirError(f"{workdir}: not a solo workdir (no {CONFIG_FILE}); train into it first")
    text = path(cfg_path).read_text()
    try:
        saved = json.loads(text)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        added, dropped = _upgrade(saved, get_config().to_dict())
        if added or dropped:
            log.warning("%s was written by an older solo: %s", cfg_path, "; ".join(
                ([f"new keys take their defaults: {', '.join(added)}"] if added else [])
                + ([f"keys no longer read: {', '.join(dropped)}"] if dropped else [])))
        config = experiments.from_json(json.dumps(saved))
        RunConfig.from_config(config)  # every key there and valid
    except ValueError as e:  # json.JSONDecodeError and ConfigError are ValueErrors
        raise WorkdirError(
            f"{cfg_path} is damaged or incomplete ({str(e)[:160]}); restore it (the workdir keeps "
            "earlier launches' configs as config.until-step-*.json), or train into a new "
            "--workdir") from None
    return config


def tokenizer_path(workdir: str) -> str:
    """The workdir's tokenizer (tokenizer.model, or a pretrained model's tokenizer/), or where
    solo's own would be."""
    from solo.data.pipeline import workdir_tokenizer

    return workdir_tokenizer(workdir) or join(workdir, TOKENIZER_FILE)


def check_workdir(config: Any, workdir: str) -> None:
    """Fails (WorkdirError, one line) before anything is written if the workdir is unusable
    (every process checks: each writes and removes its own probe file)."""
    wd = path(workdir)
    try:
        if wd.exists() and not wd.is_dir():
            raise WorkdirError(f"--workdir {workdir} exists and is not a directory")
        wd.mkdir(parents=True, exist_ok=True)
        probe = wd / f".write_test_{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.unlink()
    except (OSError, ImportError) as e:  # ImportError: gs:// without gcsfs installed
        raise WorkdirError(f"--workdir {workdir} is not writable ({_reason(e)}); "
                           "choose another --workdir" + _remote_hint(workdir)) from None
    except WorkdirError:
        raise
    except Exception as e:  # noqa: BLE001 - object stores raise their own (credentials, ...)
        raise WorkdirError(f"--workdir {workdir} cannot be used ({_reason(e)})"
                           + _remote_hint(workdir)) from None
    if path(join(workdir, CONFIG_FILE)).is_file():
        diff = shape_diff(read_config(workdir), config)
        if diff:
            raise WorkdirError(
                f"--workdir {workdir} holds a run with a different model shape "
                f"({', '.join(diff)}); pass a new --workdir to start a fresh run")


def _reason(e: BaseException) -> str:
    return " ".join((getattr(e, "strerror", None) or str(e) or type(e).__name__).split())[:200]


def _remote_hint(workdir: str) -> str:
    if not workdir.startswith("gs://"):
        return ""
    return ("; gs:// workdirs need `pip install gcsfs` and credentials (`gcloud auth "
            "application-default login`, or a service account on the VM)")


def _latest_step_on_disk(workdir: str) -> int:
    d = path(join(workdir, CKPT_DIR))
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return max(steps, default=0)


def launch_neutral(text: str) -> str:
    """The config JSON with its `dist` section at the defaults: how one launch joined its
    processes (a coordinator address, this process's id) is not part of the run, and a later
    `solo eval` on another machine must not try to reach that coordinator."""
    plain = json.loads(text)
    if "dist" in plain:
        plain["dist"] = get_config().dist.to_dict()
    return json.dumps(plain, indent=2, sort_keys=True, default=list)


def write_config(config: RunConfig, workdir: str) -> None:
    """Writes the resolved config to config.json, so it always describes the latest launch.

    A resume whose config differs (more steps, another learning rate; the model shape is checked
    by check_workdir) first keeps the previous file as config.until-step-<N>.json, N = the newest
    checkpoint it produced: the workdir records every config that trained it, and config.json
    exists at every instant (archive written before the atomic replace). Process 0 writes it;
    every process returns once it is there."""
    if multihost.is_primary():
        _write_config(launch_neutral(config.json), workdir)
    multihost.barrier("config.json")


def _write_config(text: str, workdir: str) -> None:
    cfg = path(join(workdir, CONFIG_FILE))
    if cfg.exists():
        old = cfg.read_text()
        if old == text:
            return
        stem = join(workdir, f"config.until-step-{_latest_step_on_disk(workdir)}")
        archive, n = stem + ".json", 1
        while path(archive).exists():  # relaunched with new configs and no new checkpoint
            archive, n = f"{stem}.{n}.json", n + 1
        write_atomic(archive, old)
    write_atomic(cfg, text)


def latest_step(workdir: str) -> int | None:
    """The newest checkpoint step in workdir (None if it has none); reads no arrays."""
    if not path(join(workdir, CKPT_DIR)).is_dir():
        return None
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()
