"""One process of tests/test_multihost.py: trains `tiny` (shrunk) into a workdir and records
which shared files this process wrote, whether it trained a tokenizer, the rows it fed each step
(hashes), and the params it then restores from the run's checkpoint.

    python multihost_worker.py WORKDIR OUT [COORDINATOR NUM_PROCESSES PROCESS_ID]

NUM_PROCESSES=1 is the one-process reference run (on every device it has, still through
jax.distributed: see INTRA_OP_THREADS in test_multihost.py). OUT.json gets the record, OUT.npz
(process 0) the restored params, and with one process the init params too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import numpy as np

from solo import files, multihost
from solo.config import RunConfig
from solo.data import pipeline
from solo.data import tokenizer as tokenizer_lib
from solo.experiments import load_config
from solo.train import checkpoint as ckpt_lib
from solo.train import inference, loop
from solo.train import metrics as metrics_lib

# the tiny experiment, short: 4 steps with a log row at 2, a checkpoint and an eval at 4;
# mesh data=2 x fsdp=4 over 8 devices (1 process x 8, or 2 processes x 4)
OVERRIDES = [
    "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=4",
    "--config.train.ckpt_every=4", "--config.train.eval_batches=1",
    "--config.train.mesh.data=2", "--config.train.mesh.fsdp=4", "--config.train.mesh.tensor=1",
    "--config.data.world.num_people=20", "--config.data.tokenizer.vocab_size=400",
    "--config.data.eval_batch_size=16",
]


def main() -> None:
    workdir, log_path, *dist = sys.argv[1:]
    overrides = list(OVERRIDES)
    if dist:
        address, count, pid = dist
        overrides += [f"--config.dist.coordinator_address={address}",
                      f"--config.dist.num_processes={count}",
                      f"--config.dist.process_id={pid}", "--config.dist.timeout_s=60"]
    written, trained = [], []
    # record every shared-file write and tokenizer training this process does
    write_atomic = files.write_atomic

    def recording_write(path, data):
        written.append(os.fspath(path))
        write_atomic(path, data)

    for module in (files, tokenizer_lib):  # tokenizer.py imported write_atomic by name
        module.write_atomic = recording_write
    import solo.data.hf_tokenizer as hf
    import solo.train.workdir as wd

    hf.write_atomic = wd.write_atomic = metrics_lib.write_atomic = recording_write
    train = tokenizer_lib.Tokenizer.train.__func__

    def recording_train(cls, *args, **kwargs):
        trained.append(True)
        return train(cls, *args, **kwargs)

    tokenizer_lib.Tokenizer.train = classmethod(recording_train)
    metric_write = metrics_lib.MetricWriter.write

    def recording_metrics(self, step, split, metrics):
        if self.enabled:
            written.append(self.path)
        metric_write(self, step, split, metrics)

    metrics_lib.MetricWriter.write = recording_metrics
    rows = []  # per step: a hash of each row of `tokens` this process fed
    next_batch = pipeline.TrainIterator.__next__

    def recording_next(self):
        batch = next_batch(self)
        rows.append([hashlib.sha1(r.tobytes()).hexdigest()[:12] for r in batch["tokens"]])
        return batch

    pipeline.TrainIterator.__next__ = recording_next

    raw = load_config("tiny", overrides)
    multihost.initialize(multihost.DistConfig.from_config(raw.dist))  # as `solo train`: first
    config = RunConfig.from_config(raw)  # (model 'auto' defaults ask jax for its backend)
    summary = loop.train_and_evaluate(config, workdir)
    assert multihost.is_initialized() == bool(dist)
    out = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               devices=jax.device_count(), local_devices=jax.local_device_count(),
               written=sorted(set(written)), trained_tokenizer=bool(trained),
               rows=rows, eval=summary["eval"], train=summary["train"])
    # `solo eval`'s path on every process (an all-devices data mesh, each its eval rows)
    out["evaluate"] = loop.evaluate(workdir)["eval"]
    # every process restores the checkpoint they wrote (Orbax restores collectively)
    restored = inference.load(workdir).params
    arrays = {f"final{jax.tree_util.keystr(p)}": np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    if jax.process_count() == 1:  # the init params: every param must have been trained
        run = loop._setup(config, workdir)
        init = jax.jit(run.init_state)(run.key).params
        arrays.update({f"init{jax.tree_util.keystr(p)}": np.asarray(x)
                       for p, x in jax.tree_util.tree_flatten_with_path(init)[0]})
    # a restore that fails on process 1 alone: every process falls back to the same older step
    def restore_fn(step):
        if step == 5 and jax.process_index() == 1:
            raise OSError("injected read error")
        return step

    out["agreed_step"] = ckpt_lib.first_restorable(restore_fn, [5, 4], workdir,
                                                   agree=multihost.all_agree)[1]
    if multihost.is_primary():
        np.savez(log_path + ".npz", **arrays)
    with open(log_path + ".json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
