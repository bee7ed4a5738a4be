"""`solo prepare`: a source tokenized once into a prepared corpus (layout: data/prepared.py).

The source is cut into *units* (a text file; a byte range of a large .jsonl or blank-line .txt
file, starting at the first document that begins in it; a range of a world/TFDS split's records),
one shard each, tokenized by worker processes. A shard is written under a temporary name, renamed,
then its lengths index and its done marker (counts, size, sha256) are written; a rerun keeps every
shard whose marker matches its file and redoes the rest; the manifest comes last, atomically, from
the markers in unit order, so an interrupted run completes to the manifest an uninterrupted one
writes. A finished directory is left as it is (a no-op).

Documents are encoded as the in-memory path encodes them (transforms.encode_docs: [BOS] ids [EOS];
chat records through the chat template), in record order. With records='chats' (`--records chats`:
JSONL lines with 'messages' or data.prompt_field/response_field, synthetic:world's chats, a TFDS
chat split) each shard also gets SPLIT-NNNNN.weights.arrayrecord, the template's per-token loss
weights (0/1, uint8) in the same record layout as its ids, so task 'sft' can stream it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from solo.data import prepared as P
from solo.data import sources
from solo.data.sources import SourceError
from solo.files import write_atomic

CHUNK_TOKENS = 4096  # tokens per record: 8-16 KiB reads, a row's piece touches 1-2 records
UNIT_BYTES = 64 << 20  # input bytes per shard of a large text / JSONL file
UNIT_RECORDS = 20_000  # records per shard of a world / TFDS split
AR_OPTIONS = "group_size:1,uncompressed"  # one record per read: random access at any index
JOB = "prepare.json"  # the arguments of the run that owns the directory


RECORDS = ("documents", "chats")  # what a corpus is prepared from (--records)


@dataclasses.dataclass(frozen=True)
class Unit:
    split: str
    kind: str  # 'file' | 'lines' | 'blocks' | 'records'
    where: str  # a path, or a source spec for 'records'
    lo: int
    hi: int
    size: int  # input bytes (or records), for the progress bar's ETA


def _units(d, spec: str, unit_bytes: int, kind: str) -> list[Unit]:
    if spec.startswith(("synthetic:", "tfds:")):
        out = []
        for split in ("train", "validation"):
            n = len(sources.load_component(spec, d, kind, split))
            out += [Unit(split, "records", spec, lo, min(n, lo + UNIT_RECORDS),
                         min(n, lo + UNIT_RECORDS) - lo) for lo in range(0, n, UNIT_RECORDS)]
        return out
    out = []
    for path in sources.expand_paths(spec):
        size = os.path.getsize(path)
        if not size:
            raise SourceError(f"{path}: file is empty")
        if path.endswith(".txt") and kind == "chats":
            raise SourceError(f"{path}: .txt files give documents; --records chats reads JSONL "
                              "('messages' lists, or data.prompt_field/response_field) or "
                              "synthetic:world")
        if path.endswith(".txt") and d.txt_split == "file":
            out.append(Unit("all", "file", path, 0, size, size))
        elif path.endswith((".txt", ".jsonl")):
            kind = "lines" if path.endswith(".jsonl") else "blocks"
            out += [Unit("all", kind, path, lo, min(size, lo + unit_bytes),
                         min(size, lo + unit_bytes) - lo) for lo in range(0, size, unit_bytes)]
        else:
            raise SourceError(f"{path}: unsupported file type (use .txt or .jsonl)")
    return out


# ----------------------------------------------------------------------------- readers


def _line_start_at_or_after(f, lo: int) -> int:
    if lo > 0:
        f.seek(lo - 1)
        f.readline()
    return f.tell()


def _decode(raw: bytes, path: str, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: invalid UTF-8 at byte offset {at + e.start}: "
                          f"{e.reason}") from None


def _blocks(path: str, lo: int, hi: int) -> Iterator[dict]:
    """Blank-line documents starting in [lo, hi), as read_txt(..., 'blank_lines') splits them: one
    starts at the file's start or at a non-blank line after a blank line (not the first line)."""
    with open(path, "rb") as f:
        pos = _line_start_at_or_after(f, lo)
        f.seek(max(0, pos - 3))
        before = f.read(pos - max(0, pos - 3))
        prev_blank = before.endswith(b"\n\n") and pos >= 2 or before == b"\n\r\n"
        f.seek(pos)
        cur, start = None, pos
        while True:
            line = f.readline()
            if line.endswith(b"\r\n"):
                line = line[:-2] + b"\n"
            is_start = pos == 0 or (line and line != b"\n" and prev_blank)
            if not line or is_start:
                if cur is not None:
                    text = _decode(b"".join(cur), path, start).strip("\n")
                    if text.strip():
                        yield {"text": text}
                if not line or pos >= hi:
                    return
                cur, start = [], pos
            if cur is not None:
                cur.append(line)
            prev_blank = line == b"\n" and pos > 0
            pos = f.tell()


def _lines(path: str, lo: int, hi: int, d, kind: str) -> Iterator[dict]:
    with open(path, "rb") as f:
        pos = _line_start_at_or_after(f, lo)
        while pos < hi:
            line = f.readline()
            if not line:
                return
            text = _decode(line, path, pos)
            if text.strip():
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}: line at byte {pos} is not valid JSON ({e.msg})") \
                        from None
                if kind == "chats" and isinstance(obj, dict):  # as read_jsonl maps a line
                    yield sources.jsonl_record(obj, kind, d.text_field, d.prompt_field,
                                               d.response_field, path, f"{path}: line at byte "
                                               f"{pos}")
                elif not isinstance(obj, dict) or not isinstance(obj.get(d.text_field), str):
                    raise SourceError(f"{path}: line at byte {pos} has no string field "
                                      f"{d.text_field!r} (data.text_field)")
                else:
                    yield {"text": obj[d.text_field]}
            pos = f.tell()


def _records(unit: Unit, d, kind: str) -> Iterator[dict]:
    if unit.kind == "file":
        yield from sources.read_txt(unit.where, "file")
    elif unit.kind == "blocks":
        yield from _blocks(unit.where, unit.lo, unit.hi)
    elif unit.kind == "lines":
        yield from _lines(unit.where, unit.lo, unit.hi, d, kind)
    else:
        yield from sources.load_component(unit.where, d, kind, unit.split)[unit.lo:unit.hi]


# ----------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(d, tok_path: str, counters, kind: str = "documents") -> None:
    from solo.data.hf_tokenizer import load_tokenizer

    _W.update(d=d, tok=load_tokenizer(tok_path), counters=counters, kind=kind)


def _encode(tok, rec: dict, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A record's ids (and, for chats, the template's 0/1 loss weights as uint8)."""
    from solo.data import transforms as T
    from solo.data.chat import chat_template

    if kind != "chats":
        return (T.encode_chat_docs(tok, [rec]) if "messages" in rec
                else T.encode_docs(tok, [rec["text"]]))[0], None
    ids, w = chat_template(tok).encode(rec["messages"], add_generation_prompt=False)
    w = np.asarray(w, np.float32)
    if not np.all((w == 0) | (w == 1)):
        raise SourceError("the chat template gives loss weights other than 0 and 1; a prepared "
                          "corpus stores 0/1 weights: train 'sft' from the source itself")
    return np.asarray(ids, np.int32), w.astype(np.uint8)


def _write_shard(args: tuple[Unit, str, str, str]) -> dict:
    """Tokenizes one unit into base.arrayrecord (+ .lengths.npy, then .done.json)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    unit, out, base, dtype = args
    dtype = np.dtype(dtype).newbyteorder("<")
    d, tok, counters, kind = _W["d"], _W["tok"], _W["counters"], _W["kind"]
    final = os.path.join(out, base + ".arrayrecord")
    wfinal = os.path.join(out, base + ".weights.arrayrecord")
    tmp = final + ".tmp"
    writer = ArrayRecordWriter(tmp, AR_OPTIONS)
    wwriter = ArrayRecordWriter(wfinal + ".tmp", AR_OPTIONS) if kind == "chats" else None
    buf, lengths, records, tokens = np.zeros(0, dtype), [], 0, 0
    wbuf = np.zeros(0, np.uint8)
    pending, sent = [0, 0, 0], 0  # docs, tokens, input size not yet counted; size counted
    for rec in _records(unit, d, kind):
        ids, w = _encode(tok, rec, kind)
        lengths.append(len(ids))
        tokens += len(ids)
        buf = np.concatenate([buf, ids.astype(dtype)])
        if wwriter:
            wbuf = np.concatenate([wbuf, w])
        while len(buf) >= CHUNK_TOKENS:  # weights: the same records, a byte a token
            writer.write(buf[:CHUNK_TOKENS].tobytes())
            buf, records = buf[CHUNK_TOKENS:], records + 1
            if wwriter:
                wwriter.write(wbuf[:CHUNK_TOKENS].tobytes())
                wbuf = wbuf[CHUNK_TOKENS:]
        step = 1 if unit.kind == "records" else len(rec.get("text", ""))  # ~ input bytes
        step = min(step, unit.size - sent - pending[2])
        pending = [pending[0] + 1, pending[1] + len(ids), pending[2] + step]
        if pending[0] >= 64:
            _count(counters, *pending)
            sent, pending = sent + pending[2], [0, 0, 0]
    if len(buf):
        writer.write(buf.tobytes())
        records += 1
        if wwriter:
            wwriter.write(wbuf.tobytes())
    writer.close()
    extra = {}
    if wwriter:  # renamed before the ids: a complete ids shard implies complete weights
        wwriter.close()
        extra = dict(weights_file=os.path.basename(wfinal), weights_sha256=_sha256(wfinal + ".tmp"),
                     weights_bytes=os.path.getsize(wfinal + ".tmp"))
        os.replace(wfinal + ".tmp", wfinal)
    _count(counters, pending[0], pending[1], unit.size - sent)
    sha = _sha256(tmp)
    os.replace(tmp, final)
    index = base + ".lengths.npy"
    np.save(os.path.join(out, index + ".tmp.npy"), np.asarray(lengths, np.int64))
    os.replace(os.path.join(out, index + ".tmp.npy"), os.path.join(out, index))
    done = dict(file=base + ".arrayrecord", index=index, docs=len(lengths), tokens=tokens,
                records=records, bytes=os.path.getsize(final), sha256=sha, **extra)
    write_atomic(os.path.join(out, base + ".done.json"), json.dumps(done, sort_keys=True))
    return done


def _count(counters, docs: int, tokens: int, size: int) -> None:
    with counters.get_lock():
        counters[0] += docs
        counters[1] += tokens
        counters[2] += size


# ----------------------------------------------------------------------------- driver


def resolve_tokenizer(path: str):
    """A solo .model file, a tokenizer.json directory, a GPT-2 directory (encoder.json +
    vocab.bpe), a .gguf file, or a workdir (its tokenizer)."""
    from solo.data.hf_tokenizer import HFTokenizer, load_tokenizer
    from solo.data.pipeline import workdir_tokenizer

    if os.path.isdir(path):
        if workdir_tokenizer(path):
            return load_tokenizer(workdir_tokenizer(path))
        files = [os.path.join(path, n) for n in ("encoder.json", "vocab.bpe")]
        if all(os.path.isfile(p) for p in files):
            return HFTokenizer.from_gpt2_files(*files)
    return load_tokenizer(path)


def _sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _shard_ok(out: str, base: str) -> dict | None:
    """The shard's done marker if the shard is complete and intact (size and sha256), else None
    (it is written again)."""
    try:
        with open(os.path.join(out, base + ".done.json"), encoding="utf-8") as f:
            done = json.load(f)
        path = os.path.join(out, done["file"])
        ok = (os.path.getsize(path) == done["bytes"] and _sha256(path) == done["sha256"]
              and os.path.isfile(os.path.join(out, done["index"])))
        if ok and "weights_file" in done:
            wpath = os.path.join(out, done["weights_file"])
            ok = (os.path.getsize(wpath) == done["weights_bytes"]
                  and _sha256(wpath) == done["weights_sha256"])
        return done if ok else None
    except (OSError, ValueError, KeyError):
        return None


def prepare(source: str, tokenizer: str, out: str, d, *, workers: int = 2,
            progress: bool = True, unit_bytes: int = UNIT_BYTES,
            records: str = "documents") -> dict:
    """Prepares `source` (one spec; data options from the DataConfig d) with `tokenizer` into
    `out` by `workers` processes (0: in this one), a shard per `unit_bytes` of large text files;
    returns the manifest. A finished `out` is returned as it is. records='chats': the source's
    chat records, with their loss weights (for task 'sft')."""
    from solo.data.pipeline import save_tokenizer, workdir_tokenizer

    if "," in source or source.startswith(P.PREFIX):
        raise SourceError(f"solo prepare takes one source, not {source!r}: prepare each "
                          "component, then train on 'prepared:A:0.7,prepared:B:0.3'")
    if records not in RECORDS:
        raise SourceError(f"records={records!r}: prepare 'documents' or 'chats'")
    tok = resolve_tokenizer(tokenizer)
    fp = P.tokenizer_fingerprint(tok)
    opts = dict(txt_split=d.txt_split, text_field=d.text_field, world=dict(d.world),
                data_dir=d.data_dir)
    chats = {}  # only a chat corpus records these (a documents corpus stays format 1)
    if records == "chats":
        opts.update(prompt_field=d.prompt_field, response_field=d.response_field)
        chats = dict(records="chats", chat_template=P.chat_template_fingerprint(tok))
    job = dict(source=source, tokenizer_fingerprint=fp, options=opts, unit_bytes=unit_bytes,
               **chats)
    job_path = os.path.join(out, JOB)
    if os.path.isfile(job_path):
        with open(job_path, encoding="utf-8") as f:
            before = json.load(f)
        if before != json.loads(json.dumps(job)):
            raise SourceError(f"{out} holds a corpus prepared from {before['source']!r} with other "
                              "arguments or another tokenizer; choose another --out (nothing "
                              "there was changed)")
    units = _units(d, source, unit_bytes, records)
    if not units:
        raise SourceError(f"source {source!r} has no documents")
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(job_path):
        write_atomic(job_path, json.dumps(job, sort_keys=True))
    existing = workdir_tokenizer(out)
    tok_path = existing or save_tokenizer(tok, out)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    per_split: dict[str, int] = {}
    tasks = []
    for u in units:
        k = per_split.get(u.split, 0)
        per_split[u.split] = k + 1
        tasks.append((u, out, f"{u.split}-{k:05d}", dtype))
    manifest_path = os.path.join(out, P.MANIFEST)
    done = {t[2]: _shard_ok(out, t[2]) for t in tasks}
    if os.path.isfile(manifest_path) and all(done.values()):
        return P.read_manifest(out)  # finished: a no-op
    todo = [t for t in tasks if not done[t[2]]]
    if todo and workers == 0:  # in this process (tests, debugging)
        _init_worker(d, tok_path, mp.get_context("spawn").Array("q", 3), records)
        for t in todo:
            _write_shard(t)
        done = {t[2]: _shard_ok(out, t[2]) for t in tasks}
    elif todo:
        ctx = mp.get_context("spawn")
        counters = ctx.Array("q", 3)
        total = sum(t[0].size for t in todo)
        with ctx.Pool(max(1, min(workers, len(todo))), _init_worker,
                      (d, tok_path, counters, records)) as pool:
            pending = pool.imap_unordered(_write_shard, todo)
            t0, left, shown = time.time(), len(todo), 0.0
            tty = sys.stderr.isatty()
            while left:
                try:
                    pending.next(timeout=0.5)
                    left -= 1
                except mp.TimeoutError:
                    pass
                now = time.time()
                if progress and (tty or now - shown > 30 or not left):  # a log: every 30 s
                    shown = now
                    _progress(counters, total, now - t0, len(todo) - left, len(todo), tty)
        done = {t[2]: _shard_ok(out, t[2]) for t in tasks}
    splits: dict[str, dict] = {}
    for u, _, base, _ in tasks:
        s = splits.setdefault(u.split, dict(docs=0, tokens=0, shards=[]))
        s["shards"].append(done[base])
        s["docs"] += done[base]["docs"]
        s["tokens"] += done[base]["tokens"]
    for name, s in splits.items():
        if not s["docs"]:
            raise SourceError(f"source {source!r} has no documents in split {name!r}")
    manifest = dict(format=P.FORMAT, format_version=P.FORMAT_VERSION if chats else 1,
                    source=source, options=opts, dtype=dtype, chunk_tokens=CHUNK_TOKENS,
                    tokenizer=dict(fingerprint=fp, file=os.path.relpath(tok_path, out),
                                   vocab_size=tok.vocab_size), splits=splits, **chats)
    write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _progress(counters, total: int, dt: float, shards: int, of: int, tty: bool) -> None:
    docs, tokens, size = counters[:]
    frac = size / max(total, 1)
    eta = f"{dt * (1 - frac) / frac:,.0f}s" if frac > 0 else "?"
    line = (f"prepare: shards {shards}/{of}  {100 * frac:5.1f}%  {docs / max(dt, 1e-9):,.0f} "
            f"docs/s  {tokens / max(dt, 1e-9):,.0f} tokens/s  ETA {eta}")
    done = shards == of
    print(f"\r{line}   " if tty else line, end="\n" if done or not tty else "",
          file=sys.stderr, flush=True)
