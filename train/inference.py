"""A workdir, loaded for inference: config, model, params and tokenizer, on the devices present.

`load(workdir, checkpoint)` reads config.json, the tokenizer and one checkpoint's params (never
the optimizer state). Parameter shapes come from the model alone (`jax.eval_shape` of its init
with the heads the run's objectives use), so a checkpoint saved on any mesh restores here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from solo.config import RunConfig
from solo.files import path
from solo.model import Transformer, init_params
from solo.objectives import model_heads
from solo.train import lora, parallel
from solo.train.checkpoint import Checkpointer, first_restorable
from solo.train.workdir import TOKENIZER_FILE, WorkdirError, read_config


@dataclasses.dataclass
class Loaded:
    config: RunConfig
    model: Transformer
    params: Any
    tokenizer: Any
    step: int = 0


def build_model(config: RunConfig, vocab_size: int) -> Transformer:
    """The run's model; model.vocab_size 0 takes the tokenizer's."""
    return Transformer(config.model.replace(vocab_size=config.model.vocab_size or vocab_size))


def abstract_params(model: Transformer, config: RunConfig, mesh) -> Any:
    """Unboxed ShapeDtypeStruct param tree (the heads of config's objectives) with the mesh's
    shardings (logical rules)."""
    heads = model_heads(config.objectives)

    def init(key):
        params = init_params(model, key, heads, config.data.seq_len, config.data.src_seq_len)
        return lora.add(params, config.lora, key, boxed=True)

    boxed = jax.eval_shape(init, jax.random.key(0))
    return parallel.abstract_with_sharding(nn.meta.unbox(boxed),
                                           parallel.param_shardings(boxed, mesh))


def load_tokenizer(workdir: str):
    from solo.data.hf_tokenizer import load_tokenizer as load
    from solo.data.pipeline import workdir_tokenizer

    path = workdir_tokenizer(workdir)
    if path is None:
        raise WorkdirError(f"{workdir}: no {TOKENIZER_FILE} (or tokenizer/); the workdir is "
                           "incomplete (train into it again, or copy the tokenizer there)")
    return load(path)


def load(workdir: str, checkpoint: str | int = "latest") -> Loaded:
    """Config, model, params and tokenizer from a workdir alone. checkpoint: 'latest', 'best'
    (lowest eval loss; the latest if none has one) or a step number (a saved step, else an error
    listing them).

    Params are placed on whatever devices exist (replicated over a data-only mesh; sharded only
    where the model's logical rules map onto mesh axes > 1).
    """
    if not path(workdir).is_dir():  # local or gs:// (solo.files)
        raise WorkdirError(f"workdir {workdir} does not exist")
    config = RunConfig.from_config(read_config(workdir))
    tokenizer = load_tokenizer(workdir)
    model = build_model(config, tokenizer.vocab_size)
    which = str(checkpoint)
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
        mesh = parallel.data_mesh()
        target = abstract_params(model, config, mesh)
        params, step = first_restorable(lambda s: ckpt.restore_params(target, s), steps,
                                        ckpt.directory)
    finally:
        ckpt.close()
    params = lora.merge(params, config.lora)  # inference sees the adapted kernels
    return Loaded(config=config, model=model, params=params, tokenizer=tokenizer, step=step)
