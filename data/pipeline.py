"""grain pipelines per task: tokenizer, resumable per-process train iterator, exact eval batches.

Each split is tokenized and turned into fixed-length rows once, in memory (fine for corpora up to
~1e8 tokens). Training: per component `MapDataset.range(rows).shuffle(seed).repeat()`, mixed by
weight for multi-source specs, then a per-index map (MLM masks / NSP pairs drawn from an rng seeded
by (seed, global index), so the stream is a pure function of the index), then the per-process
slice `[process_index::process_count]` and batching. The iterator's state is grain's (JSON-able)
state, so restoring it reproduces the following batches exactly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import grain
import numpy as np

from solo.data import sources
from solo.data import transforms as T
from solo.data.sources import cfg_get

_PACKED = ("tokens", "segment_ids", "positions")
# Keys each task's batches carry (contract in README); train/ checks objectives against it.
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "lm": _PACKED + ("targets", "weights"),
    "sft": _PACKED + ("targets", "weights"),
    "mlm": _PACKED + ("mlm_targets", "mlm_weights"),
    "bert": _PACKED + ("mlm_targets", "mlm_weights", "token_types", "nsp_labels"),
    "pairs": _PACKED + ("tokens_b", "segment_ids_b", "positions_b"),
    "seq2seq": _PACKED + ("targets", "weights", "src_tokens", "src_segment_ids", "src_positions"),
}
EVAL_SEED = 20240601  # fixed: eval masks/NSP draws must not change with the training seed
TOKENIZER_FILE = "tokenizer.model"
_CACHE: dict = {}


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(config: Any, workdir: str):
    """Load <workdir>/tokenizer.model if present (resume); else copy data.tokenizer.path, or train
    on the source's train split; the result is saved as <workdir>/tokenizer.model."""
    from solo.data.tokenizer import Tokenizer

    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.exists(target):
        return Tokenizer.load(target)
    tc = cfg_get(config.data, "tokenizer", {})
    path = cfg_get(tc, "path", "")
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.data.tokenizer.path {path!r} does not exist")
        shutil.copyfile(path, target)
        return Tokenizer.load(target)
    texts = [
        t
        for comp in sources.load_records(config, "train")
        for r in comp
        for t in sources.record_texts(r)
    ]
    tok = Tokenizer.train(
        texts,
        os.path.join(workdir, "tokenizer"),
        kind=cfg_get(tc, "kind", "bpe"),
        vocab_size=int(cfg_get(tc, "vocab_size", 512)),
        sample_size=int(cfg_get(tc, "sample_size", 1_000_000)),
    )
    if not os.path.exists(target):
        shutil.copyfile(tok.path, target)
    return Tokenizer.load(target)


# ----------------------------------------------------------------------------- prepared splits


@dataclasses.dataclass
class Prepared:
    """One component's split as indexable examples. rows: [N, ...] arrays; bert keeps sentences."""

    task: str
    rows: dict[str, np.ndarray] | None = None
    sentences: list[list[np.ndarray]] | None = None  # bert: token ids per sentence per document
    slots: np.ndarray | None = None  # bert: (doc, sentence) pairs that have a next sentence

    def __len__(self) -> int:
        return len(self.slots) if self.task == "bert" else len(next(iter(self.rows.values())))


def _prepare(tok, records: list[dict], task: str, config: Any) -> Prepared:
    d = config.data
    L = int(d.seq_len)
    fill = _pack_fill(config)
    if task in ("lm", "mlm"):
        # Chat records mixed into a corpus keep their template (role ids), so pretraining already
        # sees the format SFT and the agent use.
        docs = T.encode_docs(tok, [r["text"] for r in records if "messages" not in r])
        docs += T.encode_chat_docs(tok, [r for r in records if "messages" in r])
        ex = T.lm_examples(docs, L) if task == "lm" else T.mlm_examples(docs, L)
        return Prepared(task, T.pack_examples(ex, L, fill=fill))
    if task == "sft":
        ex = T.sft_examples(tok, records, L)
        if not ex:
            raise sources.SourceError("no usable chat records for task 'sft'")
        return Prepared(task, T.pack_examples(ex, L))
    if task == "pairs":
        return Prepared(task, T.pairs_rows(tok, records, L))
    if task == "seq2seq":
        return Prepared(task, T.seq2seq_rows(tok, records, int(cfg_get(d, "src_seq_len", L)), L))
    if task == "bert":
        sents = [
            [np.asarray(tok.encode(s), np.int32) for s in T.split_sentences(r["text"])]
            for r in records
        ]
        sents = [[s for s in doc if len(s)] for doc in sents]
        slots = np.array(
            [(di, si) for di, doc in enumerate(sents) for si in range(len(doc) - 1)], np.int32
        ).reshape(-1, 2)
        if len(sents) < 2 or not len(slots):
            raise sources.SourceError("task 'bert' needs >= 2 documents with >= 2 sentences")
        return Prepared(task, sentences=sents, slots=slots)
    raise ValueError(f"unknown data.task {task!r}; valid: {sorted(sources.TASK_KIND)}")


def _pack_fill(config: Any) -> bool:
    mode = cfg_get(config.data, "pack", "first_fit")
    if mode not in ("first_fit", "fill"):
        raise ValueError(f"data.pack must be 'first_fit' or 'fill', got {mode!r}")
    return mode == "fill"


def prepare_split(config: Any, tok, split: str) -> list[Prepared]:
    """Prepared examples per source component (cached per config/tokenizer/split)."""
    task = cfg_get(config.data, "task", "lm")
    key = (
        str(config.data.source),
        task,
        split,
        getattr(tok, "path", id(tok)),
        repr(sorted((k, str(v)) for k, v in dict(config.data).items())),
    )
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = [
            _prepare(tok, recs, task, config) for recs in sources.load_records(config, split)
        ]
    return _CACHE[key]


def _example(
    prep: Prepared, i: int, rng: np.random.Generator, config: Any, vocab_size: int
) -> dict[str, np.ndarray]:
    """Example i of a prepared component, with the per-index randomness (masks, NSP) applied."""
    d = config.data
    if prep.task == "bert":
        di, si = (int(v) for v in prep.slots[i])
        doc = prep.sentences[di]
        nsp = bool(cfg_get(d, "nsp", True))
        is_next = (not nsp) or rng.random() < 0.5
        budget = int(d.seq_len) - 3
        # A: sentences from si up to half the row (leaving >= 1 sentence for a true B).
        a, j = T.take_sentences(doc[:-1], si, budget // 2)
        # same_doc negatives start anywhere in A's document but at A or its true continuation
        same_doc = not is_next and cfg_get(d, "nsp_negatives", "other_doc") == "same_doc"
        starts = [k for k in range(len(doc)) if not si <= k <= j] if same_doc else []
        if is_next:
            b, _ = T.take_sentences(doc, j, budget - len(a))
        elif starts:
            k = starts[int(rng.integers(len(starts)))]  # B before A stops where A starts
            b, _ = T.take_sentences(doc[:si] if k < si else doc, k, budget - len(a))
        else:  # other_doc, or a document too short for a same-document negative
            other = int(rng.integers(len(prep.sentences) - 1))
            other += other >= di  # any document but this one
            odoc = prep.sentences[other]
            b, _ = T.take_sentences(odoc, int(rng.integers(len(odoc))), budget - len(a))
        row = T.nsp_row(a, b, is_next, int(d.seq_len))
        if not nsp:
            row["nsp_weights"] = np.float32(0.0)
    else:
        row = {k: v[i] for k, v in prep.rows.items()}
    if prep.task in ("mlm", "bert"):
        tokens, mt, mw = T.mask_row(
            row["tokens"],
            rng,
            vocab_size=vocab_size,
            rate=float(cfg_get(d, "mlm_rate", 0.15)),
            segment_ids=row["segment_ids"],
        )
        row = {**row, "tokens": tokens, "mlm_targets": mt, "mlm_weights": mw}
    return row


# ----------------------------------------------------------------------------- train


class TrainIterator:
    """Iterator over per-process batches with JSON-serialisable get_state()/set_state()."""

    def __init__(self, dataset: grain.IterDataset):
        self._dataset = dataset
        self._it = iter(dataset)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)


def _seed(config: Any) -> int:
    s = int(cfg_get(config.data, "shuffle_seed", -1))
    return int(cfg_get(config, "seed", 0)) if s < 0 else s


def per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} not divisible by process_count {process_count}"
        )
    return global_batch // process_count


def make_train_dataset(
    config: Any, tokenizer, *, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """The grain IterDataset behind make_train_iterator."""
    preps = prepare_split(config, tokenizer, "train")
    comps = sources.parse_source(config.data.source)
    seed = _seed(config)
    bs = per_process_batch(int(config.data.batch_size), process_count)
    parts = [
        grain.MapDataset.range(len(p))
        .shuffle(seed=seed + 7919 * c)
        .repeat(None)
        .map(lambda j, c=c: (c, j))
        for c, p in enumerate(preps)
    ]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [c.weight for c in comps])
    vocab = tokenizer.vocab_size

    def make(idx: int, cj: tuple[int, int]) -> dict[str, np.ndarray]:
        return _example(preps[cj[0]], int(cj[1]), np.random.default_rng([seed, idx]), config, vocab)

    ds = ds.map_with_index(make)[process_index::process_count].batch(bs, drop_remainder=True)
    workers = int(cfg_get(config.data, "num_workers", 0))
    prefetch = int(cfg_get(config.data, "prefetch", 2))
    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=max(1, min(16, bs)), prefetch_buffer_size=max(1, prefetch) * bs
        )
    )
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=max(1, prefetch)
            )
        )
    return it


def make_train_iterator(
    config: Any, tokenizer, *, process_index: int = 0, process_count: int = 1
) -> TrainIterator:
    """Endless per-process batches (global data.batch_size // process_count rows) for data.task."""
    return TrainIterator(
        make_train_dataset(
            config, tokenizer, process_index=process_index, process_count=process_count
        )
    )


# ----------------------------------------------------------------------------- eval


def eval_batches(
    config: Any,
    tokenizer,
    split: str = "validation",
    batch_size: int | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Every example of `split` exactly once, in order, deterministic masks; the last batch is
    padded with all-zero rows (zero weights), so weighted sums do not depend on batch_size.
    batch_size is global (default data.eval_batch_size); each process gets its slice of every
    batch and all processes get the same number of batches. max_batches > 0 truncates."""
    preps = prepare_split(config, tokenizer, split)
    gbs = int(batch_size or cfg_get(config.data, "eval_batch_size", 0) or config.data.batch_size)
    bs = per_process_batch(gbs, process_count)
    index = [(c, j) for c, p in enumerate(preps) for j in range(len(p))]
    num = -(-len(index) // gbs)
    if max_batches > 0:
        num = min(num, max_batches)
    vocab = tokenizer.vocab_size

    def row(g: int) -> dict[str, np.ndarray]:
        c, j = index[g]
        return _example(preps[c], j, np.random.default_rng([EVAL_SEED, g]), config, vocab)

    zero = T.zero_like_row(row(0))
    out = []
    for b in range(num):
        lo = b * gbs + process_index * bs
        rows = [row(g) if g < len(index) else zero for g in range(lo, lo + bs)]
        out.append({k: np.stack([r[k] for r in rows]) for k in zero})
    return out


# ----------------------------------------------------------------------------- stats


def dataset_stats(config: Any, tokenizer, split: str = "train") -> dict[str, float]:
    """Rows, real tokens and packing efficiency (fraction of non-pad slots) of a split."""
    preps = prepare_split(config, tokenizer, split)
    rows = real = slots = 0
    for p in preps:
        if p.rows is None:  # bert rows are built per index; count the true-next pair lengths
            L = int(config.data.seq_len)
            rows += len(p)
            for d, s in p.slots:  # the true-next row of every slot
                a, j = T.take_sentences(p.sentences[d][:-1], s, (L - 3) // 2)
                b, _ = T.take_sentences(p.sentences[d], j, L - 3 - len(a))
                real += min(L, 3 + len(a) + len(b))
            slots += len(p) * L
            continue
        seg = p.rows["segment_ids"]
        rows += seg.shape[0]
        real += int((seg > 0).sum())
        slots += seg.size
    return {"rows": float(rows), "tokens": float(real), "packing_efficiency": real / max(slots, 1)}


def packing_efficiency(config: Any, tokenizer, split: str = "train") -> float:
    return dataset_stats(config, tokenizer, split)["packing_efficiency"]
