"""grain pipelines per task: tokenizer, resumable per-process train iterator, exact eval batches.

Each split is tokenized and turned into fixed-length rows once, in memory (fine for corpora up to
~1e8 tokens); a `prepared:DIR` component (data/prepared.py) gives the same rows read from disk.
Training: per component `MapDataset.range(rows).shuffle(seed).repeat()`, mixed by
weight for multi-source specs, then a per-index map (MLM masks / NSP pairs drawn from an rng seeded
by (seed, global index), so the stream is a pure function of the index), then the per-process
block of every global batch (process p of n takes rows [p*b, (p+1)*b) of each global batch of n*b
rows: the global batch is the same rows in the same order for any process count) and batching.
The iterator's state is grain's (JSON-able) state, so restoring it reproduces the following
batches exactly.

Multi-host: every process builds the same pipelines over the same sources and reads only its
rows; the tokenizer is trained (or copied) and written by process 0 alone, the others wait for it
and load that file (solo/multihost.py).
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from solo import multihost
from solo.data import prepared, sources
from solo.data import transforms as T
from solo.data.config import DataConfig
from solo.data.tasks import Prepared, get_task
from solo.data.tasks import example as task_example
from solo.files import join
from solo.files import path as epath_of

EVAL_SEED = 20240601  # fixed: eval masks/NSP draws must not change with the training seed
TOKENIZER_FILE = "tokenizer.model"  # a workdir's tokenizer: solo's own sentencepiece model,
TOKENIZER_DIR = "tokenizer"  # or a pretrained model's (tokenizer.json + tokenizer_config.json)
_CACHE: dict = {}


# ----------------------------------------------------------------------------- tokenizer


def workdir_tokenizer(workdir: str) -> str | None:
    """The path of a workdir's tokenizer (file or directory), None if it has none."""
    for name in (TOKENIZER_FILE, TOKENIZER_DIR):
        path = join(workdir, name)  # local or gs:// (solo.files)
        if epath_of(path).exists():
            return path
    return None


def save_tokenizer(tok, workdir: str) -> str:
    """Writes a tokenizer into a workdir (solo's: tokenizer.model; a pretrained model's:
    tokenizer/); returns its path there."""
    if getattr(tok, "kind", None) == "hf":
        return tok.save(join(workdir, TOKENIZER_DIR))
    return tok.save(join(workdir, TOKENIZER_FILE))


def build_tokenizer(d: DataConfig, workdir: str):
    """The workdir's tokenizer if it has one (resume); else data.tokenizer.path's (a solo .model
    file, a tokenizer directory, a workdir or a .gguf file), copied in; else solo's own, trained
    on the source's train split and saved as <workdir>/tokenizer.model.

    With several processes, process 0 does this and writes the file; the others wait at a
    barrier, then load what it wrote (the workdir must be shared: NFS or gs://)."""
    from solo.data.hf_tokenizer import load_tokenizer

    if multihost.is_primary():
        tok = _build_tokenizer(d, workdir)
    multihost.barrier("tokenizer")
    if multihost.is_primary():
        return tok
    path = workdir_tokenizer(workdir)
    if path is None:
        raise FileNotFoundError(
            f"process {jax.process_index()}: no tokenizer in {workdir} after process 0 "
            "wrote it: the workdir is not shared between the processes; use a filesystem "
            "every host mounts (NFS) or a gs:// workdir")
    return load_tokenizer(path)


def _build_tokenizer(d: DataConfig, workdir: str):
    from solo.data.hf_tokenizer import load_tokenizer
    from solo.data.tokenizer import Tokenizer

    corpus = _prepared_tokenizer(d, workdir)  # checked before anything is written
    epath_of(workdir).mkdir(parents=True, exist_ok=True)
    existing = workdir_tokenizer(workdir)
    if existing:
        return load_tokenizer(existing)
    tc = d.tokenizer
    if corpus and not tc.path:  # a prepared corpus's ids fix the tokenizer: its own
        return load_tokenizer(save_tokenizer(corpus, workdir))
    if tc.path:
        if not epath_of(tc.path).exists():
            raise FileNotFoundError(f"config.data.tokenizer.path {tc.path!r} does not exist")
        # a workdir's tokenizer, else the path itself (a file, or a directory of tokenizer.json)
        src = (workdir_tokenizer(tc.path) if epath_of(tc.path).is_dir() else None) or tc.path
        # loaded first: a damaged file is not copied
        return load_tokenizer(save_tokenizer(load_tokenizer(src), workdir))
    texts = [t for comp in sources.load_records(d, "train") for r in comp
             for t in sources.record_texts(r)]
    return Tokenizer.train(texts, join(workdir, "tokenizer"), kind=tc.kind,
                           vocab_size=tc.vocab_size, sample_size=tc.sample_size)


def _prepared_tokenizer(d: DataConfig, workdir: str):
    """The tokenizer of data.source's prepared corpora (None if it has none), after checking
    that every corpus, data.tokenizer.path and the workdir's tokenizer agree."""
    from solo.data.hf_tokenizer import load_tokenizer

    specs = [c.spec for c in sources.parse_source(d.source)]
    found = None
    for spec in (s for s in specs if s.startswith(prepared.PREFIX)):
        directory = prepared.corpus_dir(spec)
        manifest = prepared.read_manifest(directory)
        if found is None:
            found = load_tokenizer(prepared.corpus_tokenizer_path(directory, manifest))
            others = [(workdir_tokenizer(workdir), f"the workdir's tokenizer ({workdir})")]
            if d.tokenizer.path:
                src = (workdir_tokenizer(d.tokenizer.path)
                       if epath_of(d.tokenizer.path).is_dir() else None) or d.tokenizer.path
                others.append((src, "data.tokenizer.path"))
            for path, what in others:
                if path:
                    prepared.check_tokenizer(load_tokenizer(path), directory, manifest, what)
        prepared.check_tokenizer(found, directory, manifest, f"the tokenizer of {specs[0]}")
    if found is not None and len(specs) > sum(s.startswith(prepared.PREFIX) for s in specs):
        raise sources.SourceError("data.source mixes prepared corpora with raw sources; prepare "
                                  "every component with `solo prepare` (one tokenizer)")
    return found


# ----------------------------------------------------------------------------- prepared splits


def prepare_split(d: DataConfig, tok, split: str) -> list[Prepared]:
    """Prepared examples per source component (cached per data config/tokenizer/split)."""
    key = (repr(d), split, getattr(tok, "path", id(tok)))
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        task = get_task(d.task)
        out = []
        for c in sources.parse_source(d.source):
            if c.spec.startswith(prepared.PREFIX):  # token ids streamed from disk
                out.append(prepared.StreamRows(c.spec, d, split, tok))
            else:
                out.append(task.prepare(tok, sources.load_component(c.spec, d, task.records,
                                                                    split), d))
        _CACHE[key] = out
    return _CACHE[key]


def _example(d: DataConfig, prep: Prepared, i: int, rng: np.random.Generator,
             tok) -> dict[str, np.ndarray]:
    return task_example(get_task(d.task), prep, i, rng, d, tok)


# ----------------------------------------------------------------------------- train


SOURCE_KEY = "_source"  # a mixture's per-row component index; the iterator strips it


class TrainIterator:
    """Iterator over per-process batches with JSON-serialisable get_state()/set_state().

    For a mixture it counts the rows drawn from each component (in the state too, so a resumed
    run's realised proportions continue); metrics() gives them as data/mix_<i> fractions."""

    def __init__(self, dataset: grain.IterDataset, num_sources: int = 1):
        self._dataset = dataset
        self._it = iter(dataset)
        self._counts = np.zeros(num_sources, np.int64)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        if SOURCE_KEY in batch:
            batch = dict(batch)
            self._counts += np.bincount(batch.pop(SOURCE_KEY), minlength=len(self._counts))
        return batch

    def metrics(self) -> dict[str, float]:
        """Realised fraction of rows per mixture component so far ({} for one source)."""
        if len(self._counts) < 2:
            return {}
        total = max(int(self._counts.sum()), 1)
        return {f"data/mix_{i}": float(n) / total for i, n in enumerate(self._counts)}

    def get_state(self) -> dict:
        state = self._it.get_state()
        if len(self._counts) > 1:
            state = {**state, "solo_mixture_counts": [int(n) for n in self._counts]}
        return state

    def set_state(self, state: dict) -> None:
        state = dict(state)
        counts = state.pop("solo_mixture_counts", None)
        if counts is not None and len(counts) == len(self._counts):
            self._counts = np.asarray(counts, np.int64)
        self._it.set_state(state)


def per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} not divisible by process_count {process_count}"
        )
    return global_batch // process_count


def make_train_dataset(
    d: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """The grain IterDataset behind make_train_iterator."""
    preps = prepare_split(d, tokenizer, "train")
    comps = sources.parse_source(d.source)
    seed = d.shuffle_seed
    bs = per_process_batch(d.batch_size, process_count)
    parts = [
        grain.MapDataset.range(len(p))
        .shuffle(seed=seed + 7919 * c)
        .repeat(None)
        .map(lambda j, c=c: (c, j))
        for c, p in enumerate(preps)
    ]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [c.weight for c in comps])
    def make(idx: int, cj: tuple[int, int]) -> dict[str, np.ndarray]:
        row = _example(d, preps[cj[0]], int(cj[1]), np.random.default_rng([seed, idx]),
                       tokenizer)
        return row if len(parts) == 1 else {**row, SOURCE_KEY: np.int32(cj[0])}

    ds = _ProcessRows(ds.map_with_index(make), process_index, process_count, bs)
    ds = ds.batch(bs, drop_remainder=True)
    workers, prefetch = d.num_workers, d.prefetch
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


class _ProcessRows(grain.MapDataset):
    """Process p's rows of an endless stream cut into global batches of n*b rows: local row i
    is global row (i // b) * n*b + p*b + i % b. Unlike a strided slice [p::n], this keeps the
    global batch (all processes' rows, in process order, as make_array_from_process_local_data
    assembles it) equal to the one-process batch: same rows, same order, same devices."""

    def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int,
                 rows: int):
        super().__init__(parent)
        self._p, self._n, self._b = process_index, process_count, rows

    def __len__(self) -> int:
        return len(self._parent) // self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(int(index), self._b)
        return self._parent[(step * self._n + self._p) * self._b + row]

    def __str__(self) -> str:
        return f"_ProcessRows(process={self._p}/{self._n}, rows={self._b})"


def make_train_iterator(
    d: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1
) -> TrainIterator:
    """Endless per-process batches (global data.batch_size // process_count rows) for data.task."""
    return TrainIterator(
        make_train_dataset(d, tokenizer, process_index=process_index, process_count=process_count),
        len(sources.parse_source(d.source)),
    )


# ----------------------------------------------------------------------------- eval


def eval_batches(
    d: DataConfig,
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
    batch_size (default data.eval_batch_size) is the global batch's real rows on any process
    count (a batch-coupled metric, InfoNCE's, depends on which rows share a batch): with zero
    rows after them to a multiple of process_count, each process gets its equal slice of every
    batch and all processes get the same number of batches. max_batches > 0 truncates."""
    preps = prepare_split(d, tokenizer, split)
    gbs = int(batch_size or d.eval_batch)
    bs = -(-gbs // process_count)  # this process's rows of each (padded) global batch
    index = [(c, j) for c, p in enumerate(preps) for j in range(len(p))]
    num = -(-len(index) // gbs)
    if max_batches > 0:
        num = min(num, max_batches)
    def row(g: int) -> dict[str, np.ndarray]:
        c, j = index[g]
        return _example(d, preps[c], j, np.random.default_rng([EVAL_SEED, g]), tokenizer)

    zero = T.zero_like_row(row(0))
    out = []
    for b in range(num):
        lo = process_index * bs
        rows = [row(b * gbs + j) if j < gbs and b * gbs + j < len(index) else zero
                for j in range(lo, lo + bs)]
        out.append({k: np.stack([r[k] for r in rows]) for k in zero})
    return out


# ----------------------------------------------------------------------------- stats


def dataset_stats(d: DataConfig, tokenizer, split: str = "train") -> dict[str, float]:
    """Rows, real tokens and packing efficiency (fraction of non-pad slots) of a split."""
    rows = real = slots = 0
    for p in prepare_split(d, tokenizer, split):
        r, t, s = p.stats(d)
        rows, real, slots = rows + r, real + t, slots + s
    return {"rows": float(rows), "tokens": float(real), "packing_efficiency": real / max(slots, 1)}


def packing_efficiency(d: DataConfig, tokenizer, split: str = "train") -> float:
    return dataset_stats(d, tokenizer, split)["packing_efficiency"]
