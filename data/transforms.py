"""Small numpy transforms: tokenize, chunk, pack, mask, NSP pairs, views, SFT and seq2seq rows.

An *example* is a dict of equal-length 1-D arrays (e.g. tokens/targets/weights) that stays in one
row; `pack_examples` places examples greedily into fixed-length rows, adding segment_ids (1..n per
row, 0 = padding) and positions (restarting at 0 for each example). Documents longer than a row are
split into consecutive chunks of seq_len predictions first; each chunk is its own segment (positions
restart), so no attention or target ever crosses a row or a document boundary.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from solo.data import framing

Example = dict[str, np.ndarray]
Rows = dict[str, np.ndarray]


def encode_docs(tok, texts: Sequence[str]) -> list[np.ndarray]:
    """Documents framed by framing.document ([BOS] text [EOS], or [CLS] text [SEP]), int32."""
    return [np.asarray(framing.document(tok, t), np.int32) for t in texts]


def encode_chat_docs(tok, records: Sequence[dict]) -> list[np.ndarray]:
    """Chat records as LM documents: the chat template's ids, int32."""
    from solo.data.chat import chat_template

    template = chat_template(tok)
    return [np.asarray(template.encode(r["messages"], add_generation_prompt=False)[0], np.int32)
            for r in records]


def lm_examples(docs: Sequence[np.ndarray], seq_len: int) -> list[Example]:
    """Causal-LM examples: inputs ids[:-1], targets ids[1:] (so the last token predicts EOS),
    chunked into pieces of at most seq_len predictions."""
    out = []
    for ids in docs:
        for s in range(0, len(ids) - 1, seq_len):
            x = ids[s : s + seq_len]
            y = ids[s + 1 : s + 1 + seq_len]
            x = x[: len(y)]
            out.append({"tokens": x, "targets": y, "weights": np.ones(len(y), np.float32)})
    return out


def mlm_examples(docs: Sequence[np.ndarray], seq_len: int) -> list[Example]:
    """Encoder examples: the document's own tokens, chunked to seq_len."""
    return [{"tokens": ids[s : s + seq_len]} for ids in docs for s in range(0, len(ids), seq_len)]


def pack_plan(
    lengths: Sequence[int],
    seq_len: int,
    *,
    window: int = 16,
    fill: bool = False,
    min_piece: int = 8,
) -> tuple[np.ndarray, int]:
    """Greedy first-fit packing over the last `window` open rows (keeps order roughly stable),
    from example lengths alone: pieces [P, 5] int64 (example, lo, hi, row, offset) and the number
    of rows. A row's pieces appear in offset order. pack_examples and prepared corpora
    (data/prepared.py) both place examples with it, so their rows are identical.

    fill=True: an example that fits no open row first fills the newest row's free space (if at
    least min_piece slots) and continues in a new row, as a separate segment (positions restart):
    ~100% packing at the cost of cutting documents, like nanoGPT's concatenated stream.
    """
    from array import array

    pieces, used, open_rows = array("q"), [], []  # pieces: (example, lo, hi, row, offset)...
    for e, n in enumerate(lengths):
        n = int(n)
        if not 0 < n <= seq_len:
            raise ValueError(f"example length {n} not in [1, {seq_len}]; chunk it first")
        lo = 0
        while lo < n:
            r = next((r for r in open_rows if used[r] + n - lo <= seq_len), None)
            hi = n
            if r is None and fill and open_rows and seq_len - used[open_rows[-1]] >= min_piece:
                r = open_rows[-1]
                hi = lo + seq_len - used[r]
            if r is None:
                r = len(used)
                used.append(0)
                open_rows.append(r)
                if len(open_rows) > window:
                    open_rows.pop(0)
            pieces.extend((e, lo, hi, r, used[r]))
            used[r] += hi - lo
            lo = hi
    return np.frombuffer(pieces, np.int64).reshape(-1, 5), len(used)


def pack_examples(
    examples: Sequence[Example],
    seq_len: int,
    *,
    window: int = 16,
    fill: bool = False,
    min_piece: int = 8,
) -> Rows:
    """Examples placed into fixed-length rows by pack_plan (see there for window/fill)."""
    lengths = [len(next(iter(ex.values()))) for ex in examples]
    pieces, num_rows = pack_plan(lengths, seq_len, window=window, fill=fill,
                                 min_piece=min_piece)
    keys = list(examples[0]) if examples else ["tokens"]
    rows = {
        k: np.zeros((num_rows, seq_len), np.float32 if k == "weights" else np.int32) for k in keys
    }
    rows["segment_ids"] = np.zeros((num_rows, seq_len), np.int32)
    rows["positions"] = np.zeros((num_rows, seq_len), np.int32)
    seg_count = np.zeros(num_rows, np.int32)
    for e, lo, hi, r, o in pieces.tolist():
        n = hi - lo
        for k in keys:
            rows[k][r, o : o + n] = examples[e][k][lo:hi]
        seg_count[r] += 1
        rows["segment_ids"][r, o : o + n] = seg_count[r]
        rows["positions"][r, o : o + n] = np.arange(n)
    return rows


def packing_efficiency(rows: Rows) -> float:
    """Fraction of row slots holding a real token (segment_ids > 0)."""
    seg = rows["segment_ids"]
    return float((seg > 0).mean()) if seg.size else 0.0


def mask_row(
    tok,
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    rate: float,
    segment_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking via data/masking.py with the tokenizer's mask id; its special ids (PAD, SEP,
    CLS, ...) are never selected."""
    from solo.data.masking import mask_tokens

    if tok.mask_id is None:
        raise ValueError(f"{tok!r} has no mask token: masked LM needs one (a BERT-style "
                         "tokenizer, or solo's own)")
    inputs, targets, weights = mask_tokens(
        tokens,
        rng,
        vocab_size=tok.vocab_size,
        special_ids=tuple(sorted(tok.special_ids)),
        mask_id=tok.mask_id,
        rate=rate,
        segment_ids=segment_ids,
    )
    return (
        np.asarray(inputs, np.int32),
        np.asarray(targets, np.int32),
        np.asarray(weights, np.float32),
    )


# Sentence ends: . ! or ? (optionally followed by a closing quote/bracket), whitespace, then an
# uppercase letter, digit or opening quote. Short abbreviations (Mr. Dr. St. e.g.) are not ends.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREV = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|St|Sr|Jr|vs|etc|e\.g|i\.e|No)\.|\b[A-Z]\.)$")


def split_sentences(text: str) -> list[str]:
    """Plain-prose sentence splitter (regex; good enough for NSP pairs, not for linguistics)."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        piece = text[start : m.start()]
        if _ABBREV.search(piece):
            continue
        out.append(piece.strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def take_sentences(sents: Sequence[np.ndarray], start: int, budget: int) -> tuple[list[int], int]:
    """Consecutive sentences from `start` while they fit in `budget` tokens (always >= 1).
    Returns (concatenated ids, index after the last sentence taken)."""
    ids, j = list(sents[start]), start + 1
    while j < len(sents) and len(ids) + len(sents[j]) <= budget:
        ids += sents[j].tolist()
        j += 1
    return [int(t) for t in ids], j


def truncate_pair(a: list[int], b: list[int], max_total: int) -> tuple[list[int], list[int]]:
    """Trim the longer side from its end until len(a)+len(b) <= max_total (as BERT does)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_total:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def nsp_row(a: Sequence[int], b: Sequence[int], is_next: bool, seq_len: int, cls_id: int,
            sep_id: int) -> Example:
    """[CLS] A [SEP] B [SEP] with token_types 0 for CLS A SEP and 1 for B SEP, padded to
    seq_len."""
    a, b = truncate_pair(a, b, seq_len - 3)
    ids = [cls_id, *a, sep_id, *b, sep_id]
    n = len(ids)
    row = {
        k: np.zeros(seq_len, np.int32)
        for k in ("tokens", "segment_ids", "positions", "token_types")
    }
    row["tokens"][:n] = ids
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    row["token_types"][len(a) + 2 : n] = 1
    row["nsp_labels"] = np.int32(is_next)
    row["nsp_weights"] = np.float32(1.0)
    return row


def view_row(tok, ids: Sequence[int], seq_len: int, suffix: str = "") -> Example:
    """One contrastive view: framing.document ([BOS] text [EOS]) truncated to seq_len (keeping
    EOS), one segment."""
    ids = framing.document(tok, ids, seq_len)
    n = len(ids)
    row = {
        f"{k}{suffix}": np.zeros(seq_len, np.int32) for k in ("tokens", "segment_ids", "positions")
    }
    row[f"tokens{suffix}"][:n] = ids
    row[f"segment_ids{suffix}"][:n] = 1
    row[f"positions{suffix}"][:n] = np.arange(n)
    return row


def group_id(group: Any) -> np.int32:
    """A record's `group` (any printable value) -> a stable id in [0, 2^31); None -> -1."""
    if group is None:
        return np.int32(-1)
    digest = hashlib.blake2b(str(group).encode(), digest_size=4).digest()
    return np.int32(int.from_bytes(digest, "little") & 0x7FFFFFFF)


def pairs_rows(tok, records: Sequence[dict], seq_len: int) -> Rows:
    """Two views per record (a paraphrase pair, or the same text twice for dropout views).

    `pair_groups`: records with the same optional `group` (e.g. pairs of one fact) are positives
    of each other, and InfoNCE does not use them as each other's negatives; -1 = no group."""
    rows = [
        {
            **view_row(tok, tok.encode(r["text_a"]), seq_len),
            **view_row(tok, tok.encode(r["text_b"]), seq_len, "_b"),
            "pair_weights": np.float32(1.0),
            "pair_groups": group_id(r.get("group")),
        }
        for r in records
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def sft_examples(tok, chats: Sequence[dict], seq_len: int) -> list[Example]:
    """encode_chat ids -> shifted tokens/targets; weights only on assistant content + EOT.
    Conversations longer than seq_len+1 tokens are truncated at the end."""
    from solo.data.chat import chat_template

    template = chat_template(tok)
    out = []
    for rec in chats:
        ids, w = template.encode(rec["messages"], add_generation_prompt=False)
        ids, w = np.asarray(ids, np.int32)[: seq_len + 1], np.asarray(w, np.float32)[: seq_len + 1]
        if len(ids) < 2:
            continue
        out.append({"tokens": ids[:-1], "targets": ids[1:], "weights": w[1:]})
    return out


def seq2seq_rows(tok, records: Sequence[dict], src_len: int, seq_len: int) -> Rows:
    """One pair per row: src = framing.source (source+[EOS]); decoder tokens [BOS]+target,
    targets target+[EOS]."""
    first, (last,) = framing.decoder_start(tok), framing.end(tok)
    n = len(records)
    rows = {
        k: np.zeros((n, src_len), np.int32)
        for k in ("src_tokens", "src_segment_ids", "src_positions")
    }
    rows.update(
        {
            k: np.zeros((n, seq_len), np.int32)
            for k in ("tokens", "targets", "segment_ids", "positions")
        }
    )
    rows["weights"] = np.zeros((n, seq_len), np.float32)
    for i, r in enumerate(records):
        src = framing.source(tok, r["source"], src_len)
        tgt = tok.encode(r["target"])[: seq_len - 1]
        m, k = len(src), len(tgt) + 1
        rows["src_tokens"][i, :m] = src
        rows["src_segment_ids"][i, :m] = 1
        rows["src_positions"][i, :m] = np.arange(m)
        rows["tokens"][i, :k] = [first, *tgt]
        rows["targets"][i, :k] = [*tgt, last]
        rows["weights"][i, :k] = 1.0
        rows["segment_ids"][i, :k] = 1
        rows["positions"][i, :k] = np.arange(k)
    return rows


def zero_like_row(row: Example) -> Example:
    """An all-padding row (every weight 0) with the same keys/shapes/dtypes."""
    return {k: np.zeros_like(v) for k, v in row.items()}
