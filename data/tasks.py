"""The data task registry: one `Task` record per `config.data.task`, as objectives/ has one per
objective. A task says what its batches hold, which record kind its source must give, how a
split's records become indexable examples, and which evaluations it supports.

Adding a task: write its `prepare` (records -> `Rows` or another `Prepared`) here from the
transforms in data/transforms.py, and add a `Task` to `TASKS`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from solo.data import transforms as T

if TYPE_CHECKING:
    from solo.data.config import DataConfig

_PACKED = ("tokens", "segment_ids", "positions")


class TaskError(ValueError):
    """An unknown task, or records a task cannot use."""


@dataclasses.dataclass
class Rows:
    """A split as fixed-length rows [N, ...]; example i is row i."""

    rows: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def example(self, i: int, rng: np.random.Generator, d: DataConfig) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.rows.items()}

    def stats(self, d: DataConfig) -> tuple[int, int, int]:
        """(rows, real tokens, slots)."""
        seg = self.rows["segment_ids"]
        return seg.shape[0], int((seg > 0).sum()), seg.size


@dataclasses.dataclass
class SentencePairs:
    """Task 'bert': documents as sentences; example i is an NSP pair starting at sentence slot i,
    its B (true next or a negative) drawn from the per-index rng."""

    sentences: list[list[np.ndarray]]  # token ids per sentence per document
    slots: np.ndarray  # [N, 2] (document, sentence) pairs that have a next sentence
    cls_id: int
    sep_id: int

    def __len__(self) -> int:
        return len(self.slots)

    def example(self, i: int, rng: np.random.Generator, d: DataConfig) -> dict[str, np.ndarray]:
        di, si = (int(v) for v in self.slots[i])
        doc = self.sentences[di]
        is_next = (not d.nsp) or rng.random() < 0.5
        budget = d.seq_len - 3
        # A: sentences from si up to half the row (leaving >= 1 sentence for a true B).
        a, j = T.take_sentences(doc[:-1], si, budget // 2)
        # same_doc negatives start anywhere in A's document but at A or its true continuation
        same_doc = not is_next and d.nsp_negatives == "same_doc"
        starts = [k for k in range(len(doc)) if not si <= k <= j] if same_doc else []
        if is_next:
            b, _ = T.take_sentences(doc, j, budget - len(a))
        elif starts:
            k = starts[int(rng.integers(len(starts)))]  # B before A stops where A starts
            b, _ = T.take_sentences(doc[:si] if k < si else doc, k, budget - len(a))
        else:  # other_doc, or a document too short for a same-document negative
            other = int(rng.integers(len(self.sentences) - 1))
            other += other >= di  # any document but this one
            odoc = self.sentences[other]
            b, _ = T.take_sentences(odoc, int(rng.integers(len(odoc))), budget - len(a))
        row = T.nsp_row(a, b, is_next, d.seq_len, self.cls_id, self.sep_id)
        if not d.nsp:
            row["nsp_weights"] = np.float32(0.0)
        return row

    def stats(self, d: DataConfig) -> tuple[int, int, int]:
        """(rows, real tokens of every slot's true-next pair, slots)."""
        L, real = d.seq_len, 0
        for di, si in self.slots:
            a, j = T.take_sentences(self.sentences[di][:-1], si, (L - 3) // 2)
            b, _ = T.take_sentences(self.sentences[di], j, L - 3 - len(a))
            real += min(L, 3 + len(a) + len(b))
        return len(self), real, len(self) * L


Prepared = Rows | SentencePairs


def _documents(tok, records: list[dict], d: DataConfig, masked: bool) -> Rows:
    # Chat records mixed into a corpus keep their template (role ids), so pretraining already
    # sees the format SFT and the agent use.
    docs = T.encode_docs(tok, [r["text"] for r in records if "messages" not in r])
    docs += T.encode_chat_docs(tok, [r for r in records if "messages" in r])
    ex = T.mlm_examples(docs, d.seq_len) if masked else T.lm_examples(docs, d.seq_len)
    return Rows(T.pack_examples(ex, d.seq_len, fill=d.pack == "fill"))


def _sft(tok, records: list[dict], d: DataConfig) -> Rows:
    ex = T.sft_examples(tok, records, d.seq_len)
    if not ex:
        raise TaskError("no usable chat records for task 'sft'")
    return Rows(T.pack_examples(ex, d.seq_len))


def _bert(tok, records: list[dict], d: DataConfig) -> SentencePairs:
    sents = [[np.asarray(tok.encode(s), np.int32) for s in T.split_sentences(r["text"])]
             for r in records]
    sents = [[s for s in doc if len(s)] for doc in sents]
    slots = np.array([(di, si) for di, doc in enumerate(sents) for si in range(len(doc) - 1)],
                     np.int32).reshape(-1, 2)
    if len(sents) < 2 or not len(slots):
        raise TaskError("task 'bert' needs >= 2 documents with >= 2 sentences")
    if tok.cls_id is None or tok.sep_id is None:
        raise TaskError(f"task 'bert' needs a tokenizer with CLS and SEP tokens; {tok!r} has "
                        "none")
    return SentencePairs(sents, slots, tok.cls_id, tok.sep_id)


@dataclasses.dataclass(frozen=True)
class Task:
    """name: config.data.task. records: the record kind the source must give ('documents',
    'pairs', 'chats', 'seq2seq'; data/sources.py). batch_keys: keys every batch carries (the
    objectives' batch_keys are checked against them). prepare(tokenizer, records, data config):
    a split's records -> indexable examples. masked: MLM masking is drawn per example index.
    chat_eval: the run is a chat model, scored by QA exact match through the chat path."""

    name: str
    records: str
    batch_keys: tuple[str, ...]
    prepare: Callable[[Any, list[dict], DataConfig], Prepared]
    masked: bool = False
    chat_eval: bool = False


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("lm", "documents", _PACKED + ("targets", "weights"),
         lambda tok, recs, d: _documents(tok, recs, d, masked=False)),
    Task("mlm", "documents", _PACKED + ("mlm_targets", "mlm_weights"),
         lambda tok, recs, d: _documents(tok, recs, d, masked=True), masked=True),
    Task("bert", "documents",
         _PACKED + ("mlm_targets", "mlm_weights", "token_types", "nsp_labels"), _bert,
         masked=True),
    Task("pairs", "pairs", _PACKED + ("tokens_b", "segment_ids_b", "positions_b"),
         lambda tok, recs, d: Rows(T.pairs_rows(tok, recs, d.seq_len))),
    Task("sft", "chats", _PACKED + ("targets", "weights"), _sft, chat_eval=True),
    Task("seq2seq", "seq2seq",
         _PACKED + ("targets", "weights", "src_tokens", "src_segment_ids", "src_positions"),
         lambda tok, recs, d: Rows(T.seq2seq_rows(tok, recs, d.src_seq_len, d.seq_len))),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        near = difflib.get_close_matches(str(name), list(TASKS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TaskError(f"unknown data.task {name!r}{hint}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def chat_eval(d: DataConfig) -> bool:
    """Whether a run is a chat model of the synthetic world, scored by the world's held-out QA
    exact match: its data includes synthetic:world and its task says so (sft), or it trains on
    the world's chats as documents (data.world.mix_qa='chat'). Any other run's QA set is given
    explicitly (`solo eval --qa FILE.jsonl`)."""
    from solo.data.sources import parse_source

    if not any(c.spec == "synthetic:world" for c in parse_source(d.source)):
        return False
    return get_task(d.task).chat_eval or d.world.get("mix_qa") == "chat"


def example(task: Task, prep: Prepared, i: int, rng: np.random.Generator, d: DataConfig,
            tok) -> dict[str, np.ndarray]:
    """Example i of a prepared split, with its per-index randomness (NSP draws, MLM masks)."""
    row = prep.example(i, rng, d)
    if task.masked:
        tokens, mt, mw = T.mask_row(tok, row["tokens"], rng, rate=d.mlm_rate,
                                    segment_ids=row["segment_ids"])
        row = {**row, "tokens": tokens, "mlm_targets": mt, "mlm_weights": mw}
    return row
