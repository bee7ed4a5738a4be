"""Record sources named by `config.data.source`; every source yields plain-dict records per split.

Source spec syntax (a string, or a list/tuple of strings for a mixture):
  'synthetic:world'            records from data/world.py (options: config.data.world.*)
  'tfds:NAME[/CONFIG][:VER]'   TFDS dataset prepared as array_record (data.data_dir, $TFDS_DATA_DIR)
  'path/file.txt' or a glob    one document per file (data.txt_split='file') or per blank-line block
  'path/file.jsonl' or a glob  a JSON object per line: data.text_field, or data.prompt_field +
                               data.response_field (chats / seq2seq / pairs), or a 'messages' list
  'prepared:DIR'               token ids written by `solo prepare` (data/prepared.py)
  'a.txt:0.7,b.jsonl:0.3'      mixture: comma-separated components, optional ':WEIGHT' suffix
                               (default 1.0). A list ['a.txt:0.7', 'b.jsonl:0.3'] means the same.
Record kinds: 'documents' {'text'}, 'pairs' {'text_a','text_b'}, 'chats' {'messages'}, 'seq2seq'
{'source','target'}. Splits come from the source when it has them (world, TFDS), else a
deterministic held-out fraction (data.val_fraction) chosen by data.split_mode: 'random' (seeded
record permutation) or 'tail' (the last fraction of the text in characters, as nanoGPT does).
Bad input raises SourceError naming the file and line (never a crash deep inside grain).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from solo.data.config import DataConfig

KINDS = ("documents", "pairs", "chats", "seq2seq")
_SPLIT_SEED = 1234  # fixed: the held-out set must not move when data.shuffle_seed changes


class SourceError(ValueError):
    """Invalid or unreadable input data; the message names the file (and line) at fault."""


@dataclasses.dataclass
class Component:
    spec: str
    weight: float


def parse_source(source: str | Sequence[str]) -> list[Component]:
    """'a.txt:0.7,b.jsonl:0.3' (or a list of such items) -> components with weights."""
    items = [source] if isinstance(source, str) else list(source)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise SourceError("config.data.source is empty")
    out = []
    for p in parts:
        spec, weight = p, 1.0
        head, _, tail = p.rpartition(":")
        if head and head not in ("tfds", "synthetic", "prepared"):
            try:
                weight = float(tail)
                spec = head
            except ValueError:
                pass
        if weight <= 0:
            raise SourceError(f"source component {p!r}: weight must be > 0")
        out.append(Component(spec, weight))
    return out


# ----------------------------------------------------------------------------- local files


def _read_utf8(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise SourceError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SourceError(
            f"{path}: invalid UTF-8 at byte offset {e.start} (line {line}): {e.reason}"
        ) from None


def expand_paths(spec: str) -> list[str]:
    paths = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
    if not paths:
        what = "glob pattern" if glob.has_magic(spec) else "file"
        raise SourceError(f"{what} {spec!r} matched no files (cwd {os.getcwd()})")
    return [p for p in paths if os.path.isfile(p)] or _raise(f"{spec!r} matched only directories")


def _raise(msg: str):
    raise SourceError(msg)


def read_txt(path: str, txt_split: str) -> list[dict]:
    text = _read_utf8(path)
    if txt_split == "file":
        return [{"text": text}]
    if txt_split == "blank_lines":
        blocks = [b.strip("\n") for b in text.replace("\r\n", "\n").split("\n\n")]
        return [{"text": b} for b in blocks if b.strip()]
    raise ValueError(f"data.txt_split must be 'file' or 'blank_lines', got {txt_split!r}")


def read_jsonl(
    path: str, kind: str, text_field: str, prompt_field: str, response_field: str
) -> list[dict]:
    """One JSON object per line (blank lines skipped), mapped onto the wanted record kind."""
    text = _read_utf8(path)
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(
                f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise SourceError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(jsonl_record(obj, kind, text_field, prompt_field, response_field,
                                    path, f"{path}:{lineno}"))
    if not records:
        raise SourceError(f"{path}: no records (only blank lines)")
    return records


def jsonl_record(obj: dict, kind: str, text_field: str, prompt_field: str, response_field: str,
                 path: str, where: str) -> dict:
    """One JSONL object -> a record of `kind` (`where` names its file and line in errors)."""

    def field(name: str) -> Any:
        if name not in obj:
            raise SourceError(f"{where}: missing field {name!r} (has {sorted(obj)})")
        value = obj[name]
        if name != "messages" and not isinstance(value, str):
            raise SourceError(
                f"{where}: field {name!r} must be a string, got {type(value).__name__}"
            )
        return value

    if kind == "chats" and "messages" in obj and not prompt_field:
        msgs = field("messages")
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant")
            for m in msgs
        ):
            raise SourceError(
                f"{where}: 'messages' must be a list of "
                "{role: system|user|assistant, content: str}"
            )
        return {"messages": msgs}
    if kind in ("chats", "seq2seq", "pairs") and (prompt_field or response_field):
        if not (prompt_field and response_field):
            raise SourceError(f"{path}: set both data.prompt_field and data.response_field")
        p, r = field(prompt_field), field(response_field)
        if kind == "chats":
            return {"messages": [{"role": "user", "content": p},
                                 {"role": "assistant", "content": r}]}
        if kind == "seq2seq":
            return {"source": p, "target": r}
        # an optional 'group': pairs sharing it are not each other's negatives
        group = {"group": obj["group"]} if obj.get("group") is not None else {}
        return {"text_a": p, "text_b": r, **group}
    if kind in ("documents", "pairs"):
        t = field(text_field)
        return {"text": t} if kind == "documents" else {"text_a": t, "text_b": t}
    raise SourceError(
        f"{path}: task needs {kind!r} records; set data.prompt_field and "
        "data.response_field (or give each line a 'messages' list)"
    )


# ----------------------------------------------------------------------------- splits


def heldout_split(records: list[dict], split: str, val_fraction: float, mode: str) -> list[dict]:
    """Deterministic train/validation split for sources without their own splits."""
    if split == "test":
        raise SourceError("local file sources have only 'train' and 'validation' splits")
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if mode == "tail":
        return _tail_split(records, split, val_fraction)
    if mode != "random":
        raise ValueError(f"data.split_mode must be 'random' or 'tail', got {mode!r}")
    n = len(records)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    keep = np.sort(perm[:n_val] if split == "validation" else perm[n_val:])
    return [records[i] for i in keep]


def _tail_split(records: list[dict], split: str, val_fraction: float) -> list[dict]:
    """Last val_fraction of the characters (documents only); a straddling document is cut."""
    if any("text" not in r for r in records):
        raise SourceError("data.split_mode='tail' needs document records ({'text'})")
    lengths = np.array([len(r["text"]) for r in records])
    cut = int(lengths.sum() * (1.0 - val_fraction))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out = []
    for r, s, n in zip(records, starts, lengths, strict=True):
        lo, hi = (0, min(n, cut - s)) if split == "train" else (max(0, cut - s), n)
        if hi > lo:
            out.append({"text": r["text"][lo:hi]})
    return out


# ----------------------------------------------------------------------------- sources


def _world_records(d: DataConfig, kind: str, split: str) -> list[dict]:
    from solo.data.world import World

    kwargs = World.config_options(d.world)
    key = tuple(sorted(kwargs.items()))
    if key not in _WORLD_CACHE:
        _WORLD_CACHE.clear()
        _WORLD_CACHE[key] = World.generate(**kwargs)
    return list(_WORLD_CACHE[key].records(kind, split))


_WORLD_CACHE: dict = {}


def load_component(spec: str, d: DataConfig, kind: str, split: str) -> list[dict]:
    """Records of one source component for one split."""
    if spec.startswith("prepared:"):
        raise SourceError(f"{spec} holds token ids, not records: only training and evaluation "
                          "(tasks 'lm', 'mlm', 'sft') read it")
    if spec.startswith("synthetic:"):
        if spec != "synthetic:world":
            raise SourceError(f"unknown synthetic source {spec!r}; valid: 'synthetic:world'")
        records = _world_records(d, kind, split)
    elif spec.startswith("tfds:"):
        from solo.data.tfds_io import read_tfds

        records = read_tfds(spec[len("tfds:") :], d, kind, split)
    else:
        records = []
        for path in expand_paths(spec):
            if path.endswith(".txt"):
                if kind not in ("documents", "pairs"):
                    raise SourceError(f"{path}: .txt files give documents; task needs {kind!r}")
                docs = read_txt(path, d.txt_split)
                records += (
                    docs
                    if kind == "documents"
                    else [{"text_a": r["text"], "text_b": r["text"]} for r in docs]
                )
            elif path.endswith(".jsonl"):
                records += read_jsonl(path, kind, d.text_field, d.prompt_field, d.response_field)
            else:
                raise SourceError(f"{path}: unsupported file type (use .txt or .jsonl)")
        records = heldout_split(records, split, d.val_fraction, d.split_mode)
    if not records:
        hint = ""
        if split == "validation" and not spec.startswith(("synthetic:", "tfds:")):
            hint = (
                " (too few records to hold out data.val_fraction: use data.split_mode='tail'"
                " for one long text, or data.txt_split='blank_lines')"
            )
        raise SourceError(f"source {spec!r} has no {kind} records in split {split!r}{hint}")
    return records


def load_records(d: DataConfig, split: str, kind: str | None = None) -> list[list[dict]]:
    """Records of every component of data.source for `split` (one list per component); kind
    defaults to the record kind data.task reads."""
    from solo.data.tasks import get_task

    kind = kind or get_task(d.task).records
    return [load_component(c.spec, d, kind, split) for c in parse_source(d.source)]


def record_texts(record: dict) -> list[str]:
    """All text in a record of any kind (tokenizer training), as the model reads it: a chat's
    turns as the template encodes them (an assistant's after its space, data/chat.py)."""
    if "text" in record:
        return [record["text"]]
    if "messages" in record:
        from solo.data.chat import CONTENT_PREFIX

        return [(CONTENT_PREFIX if m["role"] == "assistant" else "") + m["content"]
                for m in record["messages"]]
    if "source" in record:
        return [record["source"], record["target"]]
    return [record["text_a"], record["text_b"]]
