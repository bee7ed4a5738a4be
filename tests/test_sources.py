"""Sources: file formats, splits, mixtures, TFDS array_record round trip, clear bad-input errors."""

import json
import os
import subprocess
import sys

import pytest

from solo.config import ConfigError
from solo.data import sources
from solo.data.config import DataConfig
from solo.data.sources import SourceError, load_records, parse_source
from solo.data.tasks import TASKS
from solo.data.tfds_io import write_tfds_dataset
from solo.experiments import base

SHAKESPEARE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"
)


def cfg(source, **data) -> DataConfig:
    """The typed data section of experiments/base.py's config reading `source`; `data` overrides
    data.* (nested sections such as world are merged key by key)."""
    c = base.get_config()
    c.data.update(dict(source=source, task="lm", seq_len=32, val_fraction=0.25))
    c.data.update(data)
    return DataConfig.from_config(c)


def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def test_parse_source_weights():
    comps = parse_source("a.txt:0.7, b/*.jsonl:0.3,tfds:wiki/en,synthetic:world")
    assert [(c.spec, c.weight) for c in comps] == [
        ("a.txt", 0.7),
        ("b/*.jsonl", 0.3),
        ("tfds:wiki/en", 1.0),
        ("synthetic:world", 1.0),
    ]
    assert [c.spec for c in parse_source(["x.txt:2", "y.txt"])] == ["x.txt", "y.txt"]
    with pytest.raises(SourceError, match="weight"):
        parse_source("a.txt:0")


def test_txt_blank_lines_and_random_split(tmp_path):
    docs = [f"Document {i}.\nSecond line {i}." for i in range(8)]
    p = write(tmp_path / "c.txt", "\n\n".join(docs) + "\n")
    c = cfg(p, txt_split="blank_lines")
    train, val = load_records(c, "train")[0], load_records(c, "validation")[0]
    assert len(val) == 2 and len(train) == 6
    assert sorted(r["text"] for r in train + val) == sorted(docs)
    assert load_records(c, "validation")[0] == val  # deterministic
    with pytest.raises(SourceError, match="only 'train' and 'validation'"):
        load_records(c, "test")


def test_single_document_needs_tail_split(tmp_path):
    c = cfg(write(tmp_path / "one.txt", "just one document"))
    assert load_records(c, "train")[0] == [{"text": "just one document"}]
    with pytest.raises(SourceError, match=r"one\.txt.*no documents records.*split_mode='tail'"):
        load_records(c, "validation")


def test_tail_split_is_contiguous(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    c = cfg(write(tmp_path / "s.txt", text), split_mode="tail", val_fraction=0.1)
    train, val = load_records(c, "train")[0], load_records(c, "validation")[0]
    assert train == [{"text": text[:900]}] and val == [{"text": text[900:]}]


def test_jsonl_text_and_chat_fields(tmp_path):
    lines = [
        json.dumps({"q": f"question {i}?", "a": f"answer {i}", "text": f"doc {i}"})
        for i in range(4)
    ]
    p = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n\n")
    docs = load_records(cfg(p, val_fraction=0.0), "train")[0]
    assert [r["text"] for r in docs] == [f"doc {i}" for i in range(4)]
    chats = load_records(
        cfg(p, task="sft", prompt_field="q", response_field="a", val_fraction=0.0), "train"
    )[0]
    assert chats[1]["messages"] == [
        {"role": "user", "content": "question 1?"},
        {"role": "assistant", "content": "answer 1"},
    ]
    s2s = load_records(
        cfg(p, task="seq2seq", prompt_field="q", response_field="a", val_fraction=0.0), "train"
    )[0]
    assert s2s[2] == {"source": "question 2?", "target": "answer 2"}
    g = write(tmp_path / "g.jsonl", "\n".join(json.dumps({"q": "a", "a": "b", "group": i // 2})
                                             for i in range(3)) + "\n" + json.dumps(
        {"q": "c", "a": "d"}))
    pairs = load_records(
        cfg(g, task="pairs", prompt_field="q", response_field="a", val_fraction=0.0), "train"
    )[0]
    assert [r.get("group") for r in pairs] == [0, 0, 1, None]  # kept for InfoNCE's pair_groups


def test_glob_and_mixture(tmp_path):
    for i in range(3):
        write(tmp_path / f"part{i}.txt", f"text number {i}")
    write(tmp_path / "other.jsonl", json.dumps({"text": "from jsonl"}) + "\n")
    c = cfg(f"{tmp_path}/part*.txt:0.7,{tmp_path}/other.jsonl:0.3", val_fraction=0.0)
    a, b = load_records(c, "train")
    assert [r["text"] for r in a] == [f"text number {i}" for i in range(3)]
    assert b == [{"text": "from jsonl"}]


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("empty.txt", b"", r"empty\.txt: file is empty"),
        ("blank.txt", b"  \n\n", r"blank\.txt: file is empty"),
        (
            "bad.txt",
            b"line one\nline two \xff\xfe\n",
            r"bad\.txt: invalid UTF-8 at byte offset 18 \(line 2\)",
        ),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
        (
            "nofield.jsonl",
            b'{"text": "ok"}\n\n{"body": "x"}\n',
            r"nofield\.jsonl:3: missing field 'text'",
        ),
        ("notstr.jsonl", b'{"text": 5}\n', r"notstr\.jsonl:1: field 'text' must be a string"),
        ("list.jsonl", b"[1, 2]\n", r"list\.jsonl:1: expected a JSON object"),
        ("data.csv", b"a,b\n", r"data\.csv: unsupported file type"),
    ],
)
def test_bad_input_errors_name_file_and_line(tmp_path, name, content, pattern):
    p = write(tmp_path / name, content, "wb")
    with pytest.raises(SourceError, match=pattern):
        load_records(cfg(p), "train")


def test_missing_files_and_fields(tmp_path):
    with pytest.raises(SourceError, match=r"glob pattern .*nothing\*\.txt.* matched no files"):
        load_records(cfg(f"{tmp_path}/nothing*.txt"), "train")
    with pytest.raises(SourceError, match="missing.txt' matched no files"):
        load_records(cfg(f"{tmp_path}/missing.txt"), "train")
    p = write(tmp_path / "d.jsonl", json.dumps({"text": "x"}) + "\n")
    with pytest.raises(SourceError, match="prompt_field"):
        load_records(cfg(p, task="sft"), "train")
    # An unknown task fails when the data config is built, listing the known tasks.
    with pytest.raises(ConfigError, match=rf"unknown data\.task 'nope'.*known tasks: "
                       rf"{', '.join(TASKS)}$"):
        cfg(p, task="nope")


def test_world_source_kinds():
    c = cfg("synthetic:world", task="pairs",
            world=dict(seed=0, num_people=12, heldout_frac=0.25, bios_per_person=2))
    pairs = load_records(c, "train")[0]
    assert pairs and {"text_a", "text_b"} <= set(pairs[0])
    c = c.replace(task="sft")
    assert "messages" in load_records(c, "validation")[0][0]


def test_tfds_array_record_roundtrip_without_tensorflow(tmp_path):
    data_dir = str(tmp_path / "tfds")
    train = [{"text": f"train doc {i} \u00e9"} for i in range(5)]
    val = [{"text": "val doc"}]
    write_tfds_dataset({"train": train, "validation": val}, "solo_test_corpus", data_dir)
    c = cfg("tfds:solo_test_corpus", data_dir=data_dir)
    assert load_records(c, "train")[0] == train  # order preserved, utf-8 decoded
    assert load_records(c, "validation")[0] == val
    # A dataset without a validation split gets a deterministic held-out fraction.
    write_tfds_dataset(
        [{"text": f"d{i}"} for i in range(8)], "solo_flat", data_dir, val_fraction=0.0
    )
    c2 = cfg("tfds:solo_flat", data_dir=data_dir, val_fraction=0.25)
    tr, va = load_records(c2, "train")[0], load_records(c2, "validation")[0]
    assert len(tr) == 6 and len(va) == 2
    assert sorted(r["text"] for r in tr + va) == [f"d{i}" for i in range(8)]
    assert "tensorflow" not in sys.modules
    r = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True)
    assert r.returncode != 0 and b"No module named 'tensorflow'" in r.stderr


def test_tfds_unprepared_dataset_explains_how_to_prepare(tmp_path):
    c = cfg("tfds:solo_not_there", data_dir=str(tmp_path))
    with pytest.raises(SourceError) as e:
        load_records(c, "train")
    msg = str(e.value)
    assert "tfds build solo_not_there --file_format=array_record" in msg
    assert "TFDS_DATA_DIR" in msg and "manual" in msg and str(tmp_path) in msg


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tinyshakespeare.txt absent")
def test_shakespeare_tail_split_matches_nanogpt():
    c = cfg(SHAKESPEARE, split_mode="tail", val_fraction=0.1)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    n = int(len(text) * 0.9)
    assert load_records(c, "train")[0][0]["text"] == text[:n]
    assert load_records(c, "validation")[0][0]["text"] == text[n:]


def test_record_texts():
    assert sources.record_texts({"source": "a", "target": "b"}) == ["a", "b"]
    assert sources.record_texts({"messages": [{"role": "user", "content": "hi"}]}) == ["hi"]
