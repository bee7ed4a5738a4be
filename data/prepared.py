"""Prepared corpora: token ids written once by `solo prepare` (data/prepare.py), read by training.

Layout of a prepared directory DIR:
  manifest.json                 written last, atomically: format version, source, tokenizer
                                fingerprint, token dtype, chunk size, per split: shards, counts
  tokenizer.model | tokenizer/  the tokenizer the ids come from (a run on DIR uses it)
  SPLIT-NNNNN.arrayrecord       a shard: its documents' ids ([BOS] ids [EOS], as the in-memory
                                path encodes them) concatenated into one stream, cut into records
                                of `chunk` tokens (the last one shorter), little-endian uint16/32
  SPLIT-NNNNN.lengths.npy       the shard's document lengths in tokens (the index)
  SPLIT-NNNNN.done.json         the shard's counts, size and sha256 (the shard is complete)
  SPLIT-NNNNN.weights.arrayrecord  a chat corpus only (format 2, manifest records='chats'): the
                                chat template's per-token loss weights, one uint8 a token, in the
                                same record layout as the ids (its size and sha256 in the marker)
  plans/                        row plans cached by training runs (rebuilt when missing)

File sources (text, JSONL) are prepared as one split 'all' in record order; a run holds out
data.val_fraction of the documents with the same seeded rule as the in-memory path
(sources.heldout_split, mode 'random'), so both paths see the same train/validation documents.

Training reads a split through `StreamRows`, the `Prepared` protocol of data/tasks.py: example i is
row i of a packing *plan* computed from document lengths alone with the same `pack_plan` as the
in-memory path, so the rows are identical. A plan is two int64 arrays memory-mapped from
DIR/plans/ (row -> its pieces; piece -> stream position and length), and a row is read from the
one or two records that hold each piece: memory does not grow with the corpus.

Task 'sft' reads a chat corpus (its manifest fixes the chat template by fingerprint, as it fixes
the tokenizer): each conversation is one example truncated to seq_len predictions, tokens,
targets and the stored weights shifted by one, packed first-fit, as tasks._sft does in memory.
A documents corpus (format 1, no weights) feeds 'lm' and 'mlm'.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from solo.data.sources import SourceError
from solo.data.transforms import pack_plan

if TYPE_CHECKING:
    from solo.data.config import DataConfig

FORMAT = "solo-prepared"
FORMAT_VERSION = 2  # 2: chat corpora's loss weights; documents corpora are still written as 1
MANIFEST = "manifest.json"
PREFIX = "prepared:"
PLAN_WINDOW = 16  # pack_examples' default window: the same plan as the in-memory path
_HELDOUT_SEED = 1234  # sources._SPLIT_SEED: the same held-out documents as the in-memory path


class PreparedError(SourceError):
    """A prepared corpus that cannot be used (missing, damaged, newer format, wrong tokenizer)."""


def tokenizer_fingerprint(tok) -> str:
    """sha256 of what fixes a tokenizer's ids: solo's sentencepiece proto, or an HF tokenizer's
    tokenizer.json and whether it adds BOS."""
    h = hashlib.sha256()
    if hasattr(tok, "model_proto"):
        h.update(b"sentencepiece\0" + tok.model_proto)
    else:
        h.update(b"hf\0" + tok.to_json().encode() + bytes([bool(getattr(tok, "add_bos", True))]))
    return h.hexdigest()[:32]


def chat_template_fingerprint(tok) -> str:
    """sha256 of what fixes a chat template's ids and weights: a pretrained model's Jinja
    source, or solo's template (its role ids, end-of-turn id and content prefix)."""
    from solo.data import chat

    template = chat.chat_template(tok)
    if isinstance(template, chat.SoloChatTemplate):
        what = f"solo\0{sorted(chat.ROLE_IDS.items())}\0{chat.EOT_ID}\0{chat.CONTENT_PREFIX!r}"
    else:
        what = "jinja\0" + tok.chat_template
    return hashlib.sha256(what.encode()).hexdigest()[:32]


def corpus_dir(spec: str) -> str:
    """'prepared:DIR' or 'prepared:DIR/manifest.json' -> DIR."""
    path = os.path.expanduser(spec[len(PREFIX):] if spec.startswith(PREFIX) else spec)
    return os.path.dirname(path) if os.path.basename(path) == MANIFEST else path


def read_manifest(directory: str) -> dict:
    """The manifest of a prepared corpus, checked: one-line errors for a path that is not one or
    a manifest written by a newer solo."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(directory) else "has no manifest.json"
        unfinished = any(n.endswith(".done.json") for n in _listdir(directory))
        fix = ("its preparation did not finish: re-run the same `solo prepare` command to "
               "complete it" if unfinished else
               "make one with `solo prepare SOURCE --tokenizer T --out DIR`")
        raise PreparedError(f"{directory} is not a prepared corpus ({what}); {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise PreparedError(f"{path} is unreadable ({e}); re-run the `solo prepare` command that "
                            "made it (finished shards are kept)") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PreparedError(f"{path} is not a solo prepared-corpus manifest")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise PreparedError(f"{path} has format version {m['format_version']}, newer than this "
                            f"solo reads ({FORMAT_VERSION}); upgrade solo or prepare the corpus "
                            "again with this version")
    return m


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def corpus_tokenizer_path(directory: str, manifest: dict) -> str:
    return os.path.join(directory, manifest["tokenizer"]["file"])


def check_tokenizer(tok, directory: str, manifest: dict, what: str) -> None:
    """Refuses a tokenizer whose ids differ from the corpus's."""
    want = manifest["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint(tok) != want:
        raise PreparedError(
            f"{what} ({tok!r}) is not the tokenizer the prepared corpus {directory} was made with "
            f"(fingerprint {want}); leave data.tokenizer.path empty to use the corpus's own, or "
            "prepare the corpus with this tokenizer")
    want = manifest.get("chat_template")
    if want and chat_template_fingerprint(tok) != want:
        raise PreparedError(
            f"the chat template of {what} ({tok!r}) is not the one the prepared chat corpus "
            f"{directory} was made with (fingerprint {want}); use the corpus's own tokenizer "
            "(leave data.tokenizer.path empty) or prepare the corpus with this tokenizer")


# ----------------------------------------------------------------------------- splits


class Split:
    """One split of a prepared corpus as a token stream, read by position."""

    def __init__(self, directory: str, manifest: dict, split: str):
        self.directory, self.manifest, self.split = directory, manifest, split
        if split not in manifest["splits"]:
            raise PreparedError(f"prepared corpus {directory} has no split {split!r} (it has "
                                f"{', '.join(manifest['splits'])})")
        info = manifest["splits"][split]
        self.shards = info["shards"]
        self.chunk = int(manifest["chunk_tokens"])
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.has_weights = manifest.get("records") == "chats"
        for s in self.shards:  # a cheap check that catches truncation before training starts
            files = [(s["file"], s["bytes"])]
            if self.has_weights:
                files.append((s["weights_file"], s["weights_bytes"]))
            for name, want in files:
                path = os.path.join(directory, name)
                size = os.path.getsize(path) if os.path.isfile(path) else -1
                if size != want:
                    got = ("is missing" if size < 0 else
                           f"has {size} bytes, the manifest says {want}")
                    raise PreparedError(f"shard {path} {got} (truncated or damaged); re-run the "
                                        "`solo prepare` command that made it: it rewrites only "
                                        "damaged shards")
        tokens = np.array([s["tokens"] for s in self.shards], np.int64)
        self.token_start = np.concatenate([[0], np.cumsum(tokens)])
        self._starts = [int(t) for t in self.token_start]  # bisect: ~1 us, not numpy's ~10
        self._readers: dict = {}

    def __getstate__(self) -> dict:  # grain worker processes reopen the files
        return {**self.__dict__, "_readers": {}}

    @property
    def num_tokens(self) -> int:
        return int(self.token_start[-1])

    def doc_lengths(self) -> np.ndarray:
        """Every document's length in stream order (O(documents); used to build plans)."""
        parts = [np.load(os.path.join(self.directory, s["index"])) for s in self.shards]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def shard_of(self, pos: int) -> int:
        return bisect.bisect_right(self._starts, pos) - 1

    def read(self, pos: int, n: int, weights: bool = False) -> np.ndarray:
        """Tokens [pos, pos + n) of the stream (within one shard), in the stored dtype; or,
        weights=True, their loss weights (uint8, a chat corpus's)."""
        from grain.sources import ArrayRecordDataSource

        s = self.shard_of(pos)
        local = pos - self._starts[s]
        r0, r1 = local // self.chunk, (local + n - 1) // self.chunk
        key = (s, "weights_file" if weights else "file")
        try:
            if key not in self._readers:  # one per shard file, opened on first use
                self._readers[key] = ArrayRecordDataSource(
                    os.path.join(self.directory, self.shards[s][key[1]]))
            raw = b"".join(self._readers[key][r] for r in range(r0, r1 + 1))
        except Exception as e:  # noqa: BLE001 - any reader failure is a damaged shard
            path = os.path.join(self.directory, self.shards[s][key[1]])
            raise PreparedError(f"shard {path} cannot be read ({type(e).__name__}: "
                                f"{str(e)[:100]}); re-run the `solo prepare` command that made "
                                "it: it rewrites only damaged shards") from None
        ids = np.frombuffer(raw, np.uint8 if weights else self.dtype)
        off = local - r0 * self.chunk
        return ids[off: off + n]


def selected_docs(manifest: dict, split: str, d: DataConfig) -> tuple[str, np.ndarray | None]:
    """(stored split, document indices of it to use; None = all): a corpus prepared from files
    has one split 'all', held out per run as sources.heldout_split does."""
    if split in manifest["splits"] or "all" not in manifest["splits"]:
        return split, None
    if split == "test":
        raise PreparedError("a prepared corpus of local files has only 'train' and 'validation' "
                            "splits")
    if d.split_mode != "random":
        raise PreparedError("data.split_mode='tail' cuts text by characters; a prepared corpus "
                            "holds out whole documents: use data.split_mode='random'")
    n = int(manifest["splits"]["all"]["docs"])
    n_val = int(round(n * d.val_fraction))
    if d.val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    perm = np.random.default_rng(_HELDOUT_SEED).permutation(n)
    keep = np.sort(perm[:n_val] if split == "validation" else perm[n_val:])
    if not len(keep):
        raise PreparedError(f"prepared corpus has no documents in split {split!r} (too few to "
                            "hold out data.val_fraction)")
    return "all", keep


# ----------------------------------------------------------------------------- plans


def build_plan(lengths: np.ndarray, starts: np.ndarray, task: str, seq_len: int,
               fill: bool) -> tuple[np.ndarray, np.ndarray]:
    """Documents (lengths, stream starts) -> (row_ptr [R+1], pieces [P, 2] = stream position of
    the piece's first token, its length). Examples are the documents' chunks as lm_examples /
    mlm_examples make them (sft: each conversation's first seq_len predictions, as
    sft_examples); rows place them as pack_examples does."""
    shift = 1 if task in ("lm", "sft") else 0  # a chunk of n predictions reads n+1 tokens
    span = np.maximum(lengths - shift, 0)
    if task == "sft":
        span = np.minimum(span, seq_len)
    nchunks = -(-span // seq_len)
    doc = np.repeat(np.arange(len(lengths)), nchunks)
    first = np.repeat(np.cumsum(nchunks) - nchunks, nchunks)
    chunk_start = (np.arange(len(doc)) - first) * seq_len
    ex_len = np.minimum(seq_len, span[doc] - chunk_start)
    ex_pos = starts[doc] + chunk_start
    del doc, first, chunk_start
    plan, num_rows = pack_plan(ex_len, seq_len, window=PLAN_WINDOW, fill=fill)
    order = np.lexsort((plan[:, 4], plan[:, 3]))  # by row, then offset
    plan = plan[order]
    pieces = np.stack([ex_pos[plan[:, 0]] + plan[:, 1], plan[:, 2] - plan[:, 1]], 1)
    row_ptr = np.searchsorted(plan[:, 3], np.arange(num_rows + 1))
    return row_ptr.astype(np.int64), pieces.astype(np.int64)


def _save_npy(path: str, a: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, a)
    os.replace(tmp, path)


class StreamRows:
    """A prepared split as packed rows (tasks' `Prepared` protocol): lm or sft
    (tokens/targets/weights) or mlm (tokens), segment_ids and positions as pack_examples makes
    them. tok: the run's tokenizer, checked against a chat corpus's template (sft)."""

    def __init__(self, spec: str, d: DataConfig, split: str, tok=None):
        if d.task not in ("lm", "mlm", "sft"):
            raise PreparedError(f"data.task={d.task!r} cannot read a prepared corpus ({spec}); "
                                "prepared corpora feed tasks 'lm', 'mlm' and 'sft'")
        self.directory = corpus_dir(spec)
        manifest = read_manifest(self.directory)
        if d.task == "sft" and manifest.get("records") != "chats":
            raise PreparedError(f"{spec} was prepared from documents, without the loss weights "
                                "task 'sft' needs; prepare the chats with `solo prepare SOURCE "
                                "--records chats --tokenizer T --out DIR`")
        if d.task == "sft" and tok is not None:
            check_tokenizer(tok, self.directory, manifest, "the run's tokenizer")
        stored, keep = selected_docs(manifest, split, d)
        self.stream = Split(self.directory, manifest, stored)
        self.task, self.seq_len = d.task, d.seq_len
        pack = "first_fit" if d.task == "sft" else d.pack  # tasks._sft packs first-fit
        fill = pack == "fill"
        sel = "all" if keep is None else f"heldout{d.val_fraction!r}-{split}"
        key = f"{stored}-{sel}-{d.task}-L{d.seq_len}-{pack}-w{PLAN_WINDOW}"
        plans = os.path.join(self.directory, "plans")
        paths = [os.path.join(plans, f"{key}.{n}.npy") for n in ("rows", "pieces")]
        if not all(os.path.isfile(p) for p in paths):
            lengths = self.stream.doc_lengths()
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            if keep is not None:
                lengths, starts = lengths[keep], starts[keep]
            arrays = build_plan(lengths, starts, d.task, d.seq_len, fill)
            try:
                os.makedirs(plans, exist_ok=True)
                for p, a in zip(paths, arrays, strict=True):
                    _save_npy(p, a)
            except OSError:  # a read-only corpus: the plan stays in memory
                self.row_ptr, self.pieces = arrays
                self._paths = None
                return
        self._paths = paths
        self.row_ptr, self.pieces = (np.load(p, mmap_mode="r") for p in paths)

    def __getstate__(self) -> dict:  # grain worker processes map the plan again, not a copy
        drop = ("row_ptr", "pieces") if self._paths else ()
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._paths:
            self.row_ptr, self.pieces = (np.load(p, mmap_mode="r") for p in self._paths)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def example(self, i: int, rng: np.random.Generator, d: DataConfig) -> dict[str, np.ndarray]:
        L, lm, sft = self.seq_len, int(self.task in ("lm", "sft")), self.task == "sft"
        pieces = np.asarray(self.pieces[int(self.row_ptr[i]): int(self.row_ptr[i + 1])])
        pos, n = pieces[:, 0], pieces[:, 1]
        used = int(n.sum())
        offsets = np.cumsum(n) - n
        lo, hi = int(pos.min()), int((pos + n).max()) + lm
        s = self.stream.shard_of(lo)
        if hi - lo <= 4 * L and s == self.stream.shard_of(hi - 1):  # one read for the row
            span = self.stream.read(lo, hi - lo)
            wspan = self.stream.read(lo, hi - lo, weights=True) if sft else None
        else:  # pieces far apart (first-fit's window, or shards): one read per piece
            span = np.concatenate([self.stream.read(int(p), int(k) + lm) for p, k in pieces])
            wspan = np.concatenate([self.stream.read(int(p), int(k) + lm, weights=True)
                                    for p, k in pieces]) if sft else None
            lo_k = np.cumsum(n + lm) - (n + lm)
            pos, lo = lo_k, 0
        within = np.arange(used) - np.repeat(offsets, n)  # positions restart per piece
        src = np.repeat(pos - lo, n) + within
        row = {k: np.zeros(L, np.int32) for k in ("tokens", "segment_ids", "positions")}
        row["tokens"][:used] = span[src]
        row["segment_ids"][:used] = np.repeat(np.arange(1, len(n) + 1, dtype=np.int32), n)
        row["positions"][:used] = within
        if lm:
            row["targets"] = np.zeros(L, np.int32)
            row["targets"][:used] = span[src + 1]
            row["weights"] = np.zeros(L, np.float32)
            row["weights"][:used] = wspan[src + 1] if sft else 1.0
        return row

    def stats(self, d: DataConfig) -> tuple[int, int, int]:
        """(rows, real tokens, slots)."""
        return len(self), int(np.asarray(self.pieces[:, 1]).sum()), len(self) * self.seq_len
