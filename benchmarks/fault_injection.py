"""Fault injection: SIGKILL a training run at random moments, resume it each time, and compare
its final params (and metrics) with a run that was never interrupted.

  python benchmarks/fault_injection.py [--kills 20] [--steps 2400] [--seed 0]

`solo train tiny` runs in a subprocess with checkpoints every 3 steps (so many kills land during
a checkpoint write); each kill comes at a random time after the process started, and the next
launch resumes the same workdir. A kill that
left an `*.orbax-checkpoint-tmp*` directory behind hit a checkpoint write. After the last kill
the run is resumed to its end. Prints, per kill, the time and whether a write was under way,
then whether the final params equal the uninterrupted run's bit for bit and whether
metrics.jsonl holds each logged step exactly once.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def command(workdir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "solo", "train", "tiny", "--workdir", str(workdir),
            f"--config.train.steps={steps}", "--config.train.ckpt_every=3",
            "--config.train.log_every=10", "--config.train.eval_every=100",
            "--config.train.keep=2"]


def params(workdir: Path) -> dict[str, np.ndarray]:
    from solo.train.inference import load

    loaded = load(str(workdir))
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(loaded.params)[0]}


def writing(workdir: Path) -> bool:
    return any((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=14.0,
                   help="a kill comes uniformly within this many seconds of a launch")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="solo_faults_"))
    try:
        t0 = time.time()
        subprocess.run(command(root / "reference", args.steps), check=True,
                       capture_output=True)
        print(f"reference run: {time.time() - t0:.1f} s", flush=True)
        wd = root / "faulty"
        kills = during_write = 0
        while kills < args.kills:
            proc = subprocess.Popen(command(wd, args.steps), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            delay = rng.uniform(2.0, args.max_delay)
            try:
                proc.wait(timeout=delay)
                print(f"the run finished before kill {kills + 1} ({delay:.1f} s)")
                break
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            kills += 1
            hit = writing(wd)
            during_write += hit
            steps = sorted(int(s.name) for s in (wd / "checkpoints").glob("[0-9]*")
                           if s.name.isdigit()) if (wd / "checkpoints").exists() else []
            print(f"kill {kills:2d} at {delay:5.1f} s: checkpoints {steps[-2:]}"
                  f"{'  (during a checkpoint write)' if hit else ''}", flush=True)
        subprocess.run(command(wd, args.steps), check=True, capture_output=True)  # to the end
        a, b = params(root / "reference"), params(wd)
        same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
        keys = [(r["step"], r["split"]) for r in rows]
        ref = [(r["step"], r["split"]) for r in map(json.loads, (
            root / "reference" / "metrics.jsonl").read_text().splitlines())]
        print(f"kills: {kills}, of which during a checkpoint write: {during_write}")
        print(f"final params bit-identical to the uninterrupted run: {same}")
        print(f"metrics rows: each logged step once: {len(keys) == len(set(keys))}, "
              f"same steps as the reference: {keys == ref}")
        return 0 if same and keys == ref else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
