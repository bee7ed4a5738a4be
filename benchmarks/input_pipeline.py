"""Input-pipeline throughput: tokens/s delivered per task after warm-up (CPU only, no model).

  python benchmarks/input_pipeline.py [--seconds 3] [--num_workers 0]

Tokens = batch slots (B*L, plus the second view / source for pairs / seq2seq) delivered per second;
'real' counts only non-padding slots. The bar for the shakespeare char model (seq 256, batch 16) is
5x its train step's ~2,500 tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ml_collections import ConfigDict  # noqa: E402

from solo.data import pipeline as P  # noqa: E402
from solo.data.config import DataConfig  # noqa: E402
from solo.experiments import base  # noqa: E402

SHAKESPEARE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt"
)


def base_config(task: str, source: str = "synthetic:world", **data) -> ConfigDict:
    """experiments/base.py's config for `task` on `source`; `data` overrides data.*."""
    c = base.get_config()
    c.data.update(dict(source=source, task=task, seq_len=128, src_seq_len=64, batch_size=32))
    c.data.update(data)
    return c


def config(task: str, source: str = "synthetic:world", **data) -> DataConfig:
    """The typed data config of base_config(task, source, **data)."""
    return DataConfig.from_config(base_config(task, source, **data))


def measure(c: DataConfig, tok, seconds: float) -> dict[str, float]:
    t0 = time.perf_counter()
    it = P.make_train_iterator(c, tok)
    for _ in range(3):  # warm-up: thread pool start, first prefetch
        next(it)
    setup = time.perf_counter() - t0
    slots = real = steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        steps += 1
        for k in ("segment_ids", "segment_ids_b", "src_segment_ids"):
            if k in b:
                slots += b[k].size
                real += int((b[k] > 0).sum())
    dt = time.perf_counter() - t0
    return dict(
        setup_s=setup,
        batches_per_s=steps / dt,
        tokens_per_s=slots / dt,
        real_tokens_per_s=real / dt,
        packing=P.packing_efficiency(c, tok),
    )


EXPERIMENTS = {  # task -> experiment whose data config is measured (mlm: bert_world's data)
    "lm": "gpt_world",
    "mlm": "bert_world",
    "bert": "bert_world",
    "pairs": "simcse_world",
    "sft": "chat_world",
    "seq2seq": "seq2seq_world",
}


def experiment_config(task: str, **data) -> DataConfig:
    """The experiment's data config when experiments/ provides it, else this file's defaults."""
    import importlib

    try:
        c = importlib.import_module(f"solo.experiments.{EXPERIMENTS[task]}").get_config()
    except Exception as e:  # noqa: BLE001 - the benchmark must run without experiments/
        print(f"(solo.experiments.{EXPERIMENTS[task]} unavailable: {e}; using defaults)")
        c = base_config(task)
    c.data.update(task=task, **data)
    return DataConfig.from_config(c)


def row(name: str, r: dict[str, float]) -> None:
    print(
        f"{name:28s} {r['setup_s']:8.2f} {r['batches_per_s']:9.1f} {r['tokens_per_s']:11.0f} "
        f"{r['real_tokens_per_s']:11.0f} {r['packing']:8.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--num_workers", type=int, default=0)
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    print(
        f"{'run (seq_len x batch)':28s} {'setup s':>8s} {'batch/s':>9s} {'tokens/s':>11s} "
        f"{'real tok/s':>11s} {'packing':>8s}"
    )
    runs = [(t, {}) for t in EXPERIMENTS] + [("lm", {"pack": "fill"})]
    for task, extra in runs:
        c = experiment_config(task, num_workers=args.num_workers, **extra)
        tok = P.build_tokenizer(c, os.path.join(work, f"{task}_{c.tokenizer.vocab_size}"))
        name = f"world/{task}{'/fill' if extra else ''} ({c.seq_len}x{c.batch_size})"
        row(name, measure(c, tok, args.seconds))
    if not os.path.exists(SHAKESPEARE):
        print(f"skip shakespeare: {SHAKESPEARE} absent")
        return
    c = config(
        "lm",
        SHAKESPEARE,
        seq_len=256,
        batch_size=16,
        split_mode="tail",
        num_workers=args.num_workers,
        tokenizer=dict(kind="char", vocab_size=0, sample_size=1_000_000, path=""),
    )
    tok = P.build_tokenizer(c, os.path.join(work, "shakespeare"))
    r = measure(c, tok, args.seconds)
    row("shakespeare_char/lm (256x16)", r)
    print(
        f"shakespeare bar: {r['tokens_per_s'] / 2500:.0f}x the ~2,500 tokens/s train step "
        f"({'PASS' if r['tokens_per_s'] >= 5 * 2500 else 'FAIL'}: need >= 5x)"
    )


if __name__ == "__main__":
    main()
