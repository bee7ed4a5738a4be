"""Input-pipeline throughput: tokens/s delivered per task after warm-up (CPU only, no model).

  python benchmarks/input_pipeline.py [--seconds 3] [--num_workers 0]
  python benchmarks/input_pipeline.py --prepared 0.2,2 [--tmp /tmp/solo-bench-prepared]

--prepared GB,...: for each size, a JSONL corpus of GB gigabytes of generated text (16 kB passages
of tinyshakespeare at seeded offsets, numbered), `solo prepare`d with 2 worker processes and a
4,096-piece BPE trained on tinyshakespeare, then streamed as data.source=prepared:DIR (task lm,
1024 x 32 rows, pack fill): prepare tokens/s, the peak resident memory (RSS, summed over the
process and its workers) while preparing and while streaming, and the streamed tokens/s against
10x GPT-2 124M's consumption on one H200, taken as 0.5M tokens/s (GPT2_H200_TOKENS_PER_S).
--num_workers N streams through N grain worker processes; --stream-only reuses the corpora.

Tokens = batch slots (B*L, plus the second view / source for pairs / seq2seq) delivered per second;
'real' counts only non-padding slots. The bar for the shakespeare char model (seq 256, batch 16) is
5x its train step's ~2,500 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    ap.add_argument("--prepared", default="", help="corpus sizes in GB, e.g. 0.2,2")
    ap.add_argument("--tmp", default="/tmp/solo-bench-prepared")
    ap.add_argument("--stream-only", action="store_true",
                    help="--prepared: stream the corpora a previous run prepared in --tmp")
    ap.add_argument("--_stream", default="", help=argparse.SUPPRESS)  # the streaming child
    args = ap.parse_args()
    if args._stream:
        return print(json.dumps(stream_child(args._stream, args.seconds, args.num_workers)))
    if args.prepared:
        return prepared_main([float(g) for g in args.prepared.split(",")], args.tmp,
                             max(args.seconds, 10.0), args.stream_only, args.num_workers)
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



# ----------------------------------------------------------------------------- prepared corpora

# GPT-2 124M on one H100/H200 trains at ~0.4-0.5M tokens/s (llm.c's GPT-2 124M reproduction and
# nanoGPT speedrun reports, bf16, seq 1024); the bar takes the upper end.
GPT2_H200_TOKENS_PER_S = 500_000
PASSAGE = 16_000  # characters per generated document


def generate(path: str, gb: float) -> None:
    """GB gigabytes of JSONL {"text": passage}: numbered tinyshakespeare passages at offsets
    drawn from a seeded rng (deterministic; kept between runs)."""
    import numpy as np

    if os.path.exists(path):
        return
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    rng = np.random.default_rng(0)
    tmp, size, i = path + ".tmp", 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while size < gb * 1e9:
            o = int(rng.integers(len(text) - PASSAGE))
            line = json.dumps({"text": f"Passage {i}.\n{text[o:o + PASSAGE]}"}) + "\n"
            f.write(line)
            size, i = size + len(line), i + 1
    os.replace(tmp, path)


class PeakRSS:
    """Samples the summed RSS of a process and its children every 50 ms; .peak in bytes."""

    def __init__(self, pid: int):
        import threading

        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def stream_child(directory: str, seconds: float, num_workers: int) -> dict:
    """In a fresh process: plan + iterator setup, then `seconds` of batches; RSS per phase."""
    from solo.data.hf_tokenizer import load_tokenizer

    rss = PeakRSS(os.getpid())
    c = config("lm", f"prepared:{directory}", seq_len=1024, batch_size=32, pack="fill",
               val_fraction=0.0005, num_workers=num_workers)
    tok = load_tokenizer(P.workdir_tokenizer(directory))
    t0 = time.perf_counter()
    it = P.make_train_iterator(c, tok)
    for _ in range(3):
        next(it)
    setup_s, setup_rss = time.perf_counter() - t0, rss.peak
    rss.peak = 0
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tokens += next(it)["tokens"].size
    dt = time.perf_counter() - t0
    return dict(setup_s=setup_s, setup_rss=setup_rss, stream_rss=rss.stop(),
                tokens_per_s=tokens / dt, rows=len(P.prepare_split(c, tok, "train")[0]))


def prepared_main(sizes: list[float], tmp: str, seconds: float, stream_only: bool,
                  num_workers: int) -> None:
    import subprocess

    from solo.data.tokenizer import Tokenizer

    if not os.path.exists(SHAKESPEARE):
        raise SystemExit(f"--prepared needs {SHAKESPEARE}")
    os.makedirs(tmp, exist_ok=True)
    tok_path = os.path.join(tmp, "bpe4096.model")
    if not os.path.exists(tok_path):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            Tokenizer.train([f.read()], tok_path[:-6], kind="bpe", vocab_size=4096)
    bar = 10 * GPT2_H200_TOKENS_PER_S
    for gb in sizes:
        src, out = os.path.join(tmp, f"text-{gb}gb.jsonl"), os.path.join(tmp, f"prepared-{gb}gb")
        if not stream_only:
            generate(src, gb)
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "solo.cli", "prepare", src,
                                     "--tokenizer", tok_path, "--out", out, "--workers", "2"],
                                    stdout=subprocess.DEVNULL)
            rss = PeakRSS(proc.pid)
            if proc.wait():
                raise SystemExit(f"solo prepare failed ({proc.returncode})")
            prep_s, prep_rss = time.perf_counter() - t0, rss.stop()
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)["splits"]["all"]
        shutil.rmtree(os.path.join(out, "plans"), ignore_errors=True)  # setup builds the plan
        child = subprocess.run([sys.executable, __file__, "--_stream", out, "--seconds",
                                str(seconds), "--num_workers", str(num_workers)], check=True,
                               capture_output=True, text=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{gb} GB ({os.path.getsize(src) / 1e9:.2f} GB text, {m['docs']:,} documents, "
              f"{m['tokens']:,} tokens, {len(m['shards'])} shards)")
        if not stream_only:
            mb_s = os.path.getsize(src) / prep_s / 1e6
            print(f"  prepare (2 workers): {prep_s:.0f} s, {m['tokens'] / prep_s:,.0f} tokens/s, "
                  f"{mb_s:.1f} MB/s; peak RSS {prep_rss / 2**20:.0f} MiB")
        print(f"  stream (lm 1024x32 fill, {r['rows']:,} rows, data.num_workers={num_workers}): "
              "setup (plan) "
              f"{r['setup_s']:.1f} s, peak RSS {r['setup_rss'] / 2**20:.0f} MiB; streaming "
              f"{r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['stream_rss'] / 2**20:.0f} MiB")
        print(f"  bar: {r['tokens_per_s'] / GPT2_H200_TOKENS_PER_S:.1f}x GPT-2 124M's "
              f"{GPT2_H200_TOKENS_PER_S:,} tokens/s on one H200 "
              f"({'PASS' if r['tokens_per_s'] >= bar else 'FAIL'}: need >= 10x)", flush=True)


if __name__ == "__main__":
    main()
