"""Prepared corpora (solo prepare -> data.source=prepared:DIR): the same rows and batches as the
in-memory path, exact resume, mixtures, interrupted and repeated preparation, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from solo.data import pipeline as P
from solo.data import prepare as prep
from solo.data import prepared
from solo.data.config import DataConfig
from solo.data.sources import SourceError, read_txt
from solo.data.tokenizer import ASSISTANT_ID, SYSTEM_ID, USER_ID, Tokenizer
from solo.experiments import base

WORDS = "the a king queen sword crown river stone night morning speaks walks sees holds".split()


def write_text(path, seed: int, paragraphs: int = 120) -> str:
    """Deterministic prose: paragraphs split by one or more blank lines, some CRLF line ends, a
    few long paragraphs (several rows each), leading and trailing blank lines."""
    rng = np.random.default_rng(seed)
    parts = ["\n\n"]
    for p in range(paragraphs):
        lines = [" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))).capitalize() + "."
                 for _ in range(int(rng.integers(1, 30 if p % 17 == 0 else 5)))]
        end = "\r\n" if p % 5 == 0 else "\n"
        parts.append(end.join(lines) + end + end * int(rng.integers(1, 4)))
    text = "".join(parts) + "\n\n"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files, a tokenizer trained on the first, and the first prepared in 3 shards."""
    tmp = tmp_path_factory.mktemp("prepared")
    text = write_text(tmp / "a.txt", 0)
    write_text(tmp / "b.txt", 1, paragraphs=60)
    tok = Tokenizer.train([text], str(tmp / "tok"), kind="bpe", vocab_size=300,
                          sample_size=100_000)
    d = config(str(tmp / "a.txt"))
    prep.prepare(str(tmp / "a.txt"), tok.path, str(tmp / "pa"), d, workers=0, progress=False,
                 unit_bytes=os.path.getsize(tmp / "a.txt") // 3 + 1)
    prep.prepare(str(tmp / "b.txt"), tok.path, str(tmp / "pb"), d, workers=0, progress=False)
    return tmp, tok


def config(source: str, task: str = "lm", **data) -> DataConfig:
    c = base.get_config()
    c.data.update(dict(source=source, task=task, txt_split="blank_lines", seq_len=32,
                       batch_size=8, eval_batch_size=8, val_fraction=0.1))
    c.data.update(data)
    return DataConfig.from_config(c)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_blank_line_ranges_split_documents_as_read_txt(tmp_path):
    """Documents read from byte ranges cut anywhere (mid-line, mid-blank-run, mid-CRLF) are,
    concatenated, exactly read_txt's blank-line documents."""
    path = str(tmp_path / "t.txt")
    write_text(path, 3, paragraphs=40)
    with open(path, "ab") as f:  # separators made of odd newline runs
        f.write(b"x\n\n\ny\r\n\r\n\r\nz\n \nw\n\n\n\n")
    want = read_txt(path, "blank_lines")
    size = os.path.getsize(path)
    for cuts in ([], [1, 2, 3], list(range(7, size, 97)), sorted({size - 1, size - 2, 5})):
        edges = [0, *cuts, size]
        got = [r for lo, hi in zip(edges, edges[1:], strict=False)
               for r in prep._blocks(path, lo, hi)]
        assert got == want


@pytest.mark.parametrize("task,pack", [("lm", "first_fit"), ("lm", "fill"), ("mlm", "fill")])
def test_prepared_batches_equal_the_in_memory_path(corpus, task, pack):
    tmp, tok = corpus
    mem = config(str(tmp / "a.txt"), task, pack=pack)
    disk = mem.replace(source=f"prepared:{tmp / 'pa'}")
    assert len(prepared.read_manifest(str(tmp / "pa"))["splits"]["all"]["shards"]) == 3
    for split in ("train", "validation"):
        a, b = P.prepare_split(mem, tok, split)[0], P.prepare_split(disk, tok, split)[0]
        assert len(a) == len(b) > 0 and a.stats(mem) == b.stats(disk)
        for i in range(len(a)):
            assert same(a.example(i, None, mem), b.example(i, None, disk)), (split, i)
    it_a, it_b = P.make_train_iterator(mem, tok), P.make_train_iterator(disk, tok)
    for _ in range(6):  # shuffled, masked (mlm) batches: a function of the index alone
        assert same(next(it_a), next(it_b))
    for x, y in zip(P.eval_batches(mem, tok), P.eval_batches(disk, tok), strict=True):
        assert same(x, y)


def test_resume_mid_epoch_and_mixture(corpus, tmp_path):
    """A 0.7/0.3 mixture of two prepared corpora: deterministic, realised proportions within a
    binomial tolerance, and a restored iterator state continues bit-identically (counts too)."""
    tmp, tok = corpus
    d = config(f"prepared:{tmp / 'pa'}:0.7,prepared:{tmp / 'pb'}:0.3", batch_size=16)
    it = P.make_train_iterator(d, tok)
    first = [next(it) for _ in range(40)]
    state = json.loads(json.dumps(it.get_state()))
    m = it.metrics()
    n = 40 * 16
    assert abs(m["data/mix_0"] - 0.7) < 4 * (0.21 / n) ** 0.5
    assert m["data/mix_1"] == pytest.approx(1 - m["data/mix_0"])
    rest = [next(it) for _ in range(5)]
    again = P.make_train_iterator(d, tok)
    assert all(same(a, b) for a, b in zip(first, (next(again) for _ in range(40)), strict=True))
    resumed = P.make_train_iterator(d, tok)
    resumed.set_state(state)
    assert resumed.metrics() == m
    assert all(same(a, next(resumed)) for a in rest)
    assert resumed.metrics() == it.metrics()
    one = P.make_train_iterator(config(f"prepared:{tmp / 'pa'}"), tok)
    assert one.metrics() == {} and "solo_mixture_counts" not in one.get_state()


def test_training_resume_from_prepared_is_bit_identical(corpus, tmp_path):
    """train_and_evaluate on a prepared mixture: 6 steps straight == 3 steps, then resumed to
    6; the run uses the corpus's tokenizer and logs the mixture proportions."""
    import jax

    from solo.train.inference import load
    from solo.train.loop import train_and_evaluate

    tmp, tok = corpus

    def cfg(steps):
        c = base.get_config()
        c.model.update(dict(d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=32,
                            embed_dim=16))
        c.data.update(dict(source=f"prepared:{tmp / 'pa'}:0.7,prepared:{tmp / 'pb'}:0.3",
                           txt_split="blank_lines", seq_len=32, batch_size=4, val_fraction=0.1))
        c.train.update(dict(steps=steps, log_every=3, eval_every=3, ckpt_every=3,
                            eval_batches=1))
        c.optim.update(dict(warmup_steps=1, decay_steps=6))
        return c

    a = train_and_evaluate(cfg(6), str(tmp_path / "a"))
    train_and_evaluate(cfg(3), str(tmp_path / "b"))
    b = train_and_evaluate(cfg(6), str(tmp_path / "b"))
    assert 0 < a["train"]["data/mix_0"] < 1 and a["train"] == {**a["train"], **{
        k: v for k, v in b["train"].items() if k.startswith(("data/", "causal"))}}
    pa, pb = (jax.tree.leaves(load(str(tmp_path / w)).params) for w in "ab")
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
    from solo.data.hf_tokenizer import load_tokenizer

    saved = load_tokenizer(P.workdir_tokenizer(str(tmp_path / "a")))
    assert prepared.tokenizer_fingerprint(saved) == prepared.tokenizer_fingerprint(tok)


def test_tokenizer_mismatch_is_refused_before_anything_is_written(corpus, tmp_path):
    tmp, tok = corpus
    other = Tokenizer.train([write_text(tmp_path / "o.txt", 9)], str(tmp_path / "other"),
                            kind="bpe", vocab_size=310, sample_size=100_000)
    d = config(f"prepared:{tmp / 'pa'}", tokenizer=dict(path=other.path))
    wd = tmp_path / "wd"
    with pytest.raises(prepared.PreparedError, match="not the tokenizer the prepared corpus"):
        P.build_tokenizer(d, str(wd))
    assert not wd.exists()
    (tmp_path / "wd2").mkdir()
    other.save(str(tmp_path / "wd2" / "tokenizer.model"))  # a workdir trained with another
    with pytest.raises(prepared.PreparedError, match="workdir's tokenizer"):
        P.build_tokenizer(config(f"prepared:{tmp / 'pa'}"), str(tmp_path / "wd2"))
    same_tok = config(f"prepared:{tmp / 'pa'}/manifest.json", tokenizer=dict(path=tok.path))
    got = P.build_tokenizer(same_tok, str(tmp_path / "wd3"))
    assert prepared.tokenizer_fingerprint(got) == prepared.tokenizer_fingerprint(tok)


def test_rerun_is_a_no_op_and_damage_is_named_then_mended(corpus, tmp_path):
    tmp, tok = corpus
    out = tmp_path / "c"
    shutil.copytree(tmp / "pa", out)
    before = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    d = config(str(tmp / "a.txt"))
    unit = os.path.getsize(tmp / "a.txt") // 3 + 1
    prep.prepare(str(tmp / "a.txt"), tok.path, str(out), d, workers=0, progress=False,
                 unit_bytes=unit)
    assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == before
    manifest = (out / "manifest.json").read_text()
    shard = out / "all-00001.arrayrecord"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(prepared.PreparedError) as e:
        P.prepare_split(config(f"prepared:{out}"), tok, "train")
    assert str(shard) in str(e.value) and "re-run the `solo prepare`" in str(e.value)
    assert "\n" not in str(e.value)
    prep.prepare(str(tmp / "a.txt"), tok.path, str(out), d, workers=0, progress=False,
                 unit_bytes=unit)
    assert (out / "manifest.json").read_text() == manifest
    assert os.stat(out / "all-00000.arrayrecord").st_mtime_ns == before["all-00000.arrayrecord"]
    data = bytearray(shard.read_bytes())  # damaged in place (same size): riegeli's hashes
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    rows = prepared.StreamRows(f"prepared:{out}", config(""), "train")
    with pytest.raises(prepared.PreparedError, match="all-00001.arrayrecord cannot be read"):
        [rows.example(i, None, None) for i in range(len(rows))]
    prep.prepare(str(tmp / "a.txt"), tok.path, str(out), d, workers=0, progress=False,
                 unit_bytes=unit)
    assert (out / "manifest.json").read_text() == manifest
    rows = prepared.StreamRows(f"prepared:{out}", config(""), "train")
    assert all(rows.example(i, None, None) for i in range(len(rows)))
    with pytest.raises(SourceError, match="other arguments or another tokenizer"):
        prep.prepare(str(tmp / "b.txt"), tok.path, str(out), d, workers=0, progress=False)
    assert (out / "manifest.json").read_text() == manifest


def test_bad_input_is_one_line(corpus, tmp_path):
    tmp, tok = corpus

    def error(fn) -> str:
        with pytest.raises(SourceError) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    newer = tmp_path / "newer"
    shutil.copytree(tmp / "pb", newer)
    m = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    assert "newer than this solo reads" in error(lambda: prepared.read_manifest(str(newer)))
    assert "is not a prepared corpus" in error(
        lambda: P.prepare_split(config(f"prepared:{tmp}"), tok, "train"))
    (tmp_path / "empty.txt").write_text("")
    d = config(str(tmp_path / "empty.txt"))
    assert "file is empty" in error(lambda: prep.prepare(
        str(tmp_path / "empty.txt"), tok.path, str(tmp_path / "e"), d, workers=0))
    assert not (tmp_path / "e").exists()
    assert "tasks 'lm', 'mlm' and 'sft'" in error(
        lambda: P.prepare_split(config(f"prepared:{tmp / 'pa'}", "bert"), tok, "train"))


def test_cli_prepare_killed_mid_shard_completes_to_the_same_manifest(corpus, tmp_path):
    """`solo prepare` with 2 worker processes, SIGKILLed once a shard is done: the rerun keeps
    the finished shards and writes the manifest of an uninterrupted run."""
    tmp, tok = corpus
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as f:
        for seed in range(6):
            f.write(write_text(tmp_path / "part.txt", seed, paragraphs=150))
    args = [sys.executable, "-m", "solo.cli", "prepare", str(big), "--tokenizer", tok.path,
            "--shard-mb", "0.01", "--config.data.txt_split=blank_lines"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and list(out.glob("*.done.json"))):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name.replace(".done.json", ".arrayrecord"):
            (out / p.name.replace(".done.json", ".arrayrecord")).stat().st_mtime_ns
            for p in out.glob("*.done.json")}  # complete shards (a renamed one may lack it)
    units = -(-os.path.getsize(big) // int(0.01 * (1 << 20)))
    assert not (out / "manifest.json").exists() and 0 < len(kept) < units
    d = config(str(big))
    for where in (out, tmp_path / "whole"):  # the rerun; an uninterrupted run
        prep.prepare(str(big), tok.path, str(where), d, workers=0, progress=False,
                     unit_bytes=int(0.01 * (1 << 20)))
    assert (out / "manifest.json").read_text() == (tmp_path / "whole" / "manifest.json") \
        .read_text()
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept


def test_tokenizer_train_cli(tmp_path):
    from solo.cli import main
    from solo.data.hf_tokenizer import load_tokenizer

    write_text(tmp_path / "t.txt", 4)
    out = str(tmp_path / "shared" / "tok.model")
    assert main(["tokenizer", "train", str(tmp_path / "t.txt"), "--vocab", "310", "--out",
                 out, "--config.data.txt_split=blank_lines"]) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 310 and tok.decode(tok.encode("The king walks.")) == \
        "The king walks."
    assert main(["tokenizer", "train", str(tmp_path / "t.txt"), "--vocab", "310", "--out",
                 out]) == 2  # not replaced


def write_chats(path, seed: int, n: int = 90) -> None:
    """Deterministic JSONL conversations: optional system turn, 1-3 user/assistant exchanges,
    some longer than a row (truncated), one empty (no example)."""
    rng = np.random.default_rng(seed)

    def say(k: int) -> str:
        return " ".join(rng.choice(WORDS, k)).capitalize() + "."

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": say(4)}] if i % 3 == 0 else []
            for _ in range(int(rng.integers(1, 4))):
                long = 40 if i % 11 == 0 else 0
                msgs += [{"role": "user", "content": say(int(rng.integers(2, 8)))},
                         {"role": "assistant", "content": say(int(rng.integers(1, 9)) + long)}]
            f.write(json.dumps({"messages": [] if i == 7 else msgs}) + "\n")


@pytest.fixture(scope="module")
def chats(corpus):
    tmp, tok = corpus
    write_chats(tmp / "chats.jsonl", 5)
    d = config(str(tmp / "chats.jsonl"), "sft")
    m = prep.prepare(str(tmp / "chats.jsonl"), tok.path, str(tmp / "pc"), d, workers=0,
                     progress=False, records="chats",
                     unit_bytes=os.path.getsize(tmp / "chats.jsonl") // 3 + 1)
    return tmp, tok, m


def test_prepared_chats_give_the_in_memory_sft_batches(chats):
    """sft from a prepared chat corpus (3 shards, ids + stored 0/1 loss weights): the same rows,
    shuffled batches and eval batches as the in-memory sft path (template, truncation to a row,
    first-fit packing, held-out conversations)."""
    tmp, tok, m = chats
    assert m["format_version"] == 2 and m["records"] == "chats"
    assert len(m["splits"]["all"]["shards"]) == 3 and m["splits"]["all"]["docs"] == 90
    assert prepared.read_manifest(str(tmp / "pa"))["format_version"] == 1  # documents: as before
    mem = config(str(tmp / "chats.jsonl"), "sft", pack="fill")  # sft packs first-fit anyway
    disk = mem.replace(source=f"prepared:{tmp / 'pc'}")
    for split in ("train", "validation"):
        a, b = P.prepare_split(mem, tok, split)[0], P.prepare_split(disk, tok, split)[0]
        assert len(a) == len(b) > 0 and a.stats(mem) == b.stats(disk)
        for i in range(len(a)):
            assert same(a.example(i, None, mem), b.example(i, None, disk)), (split, i)
    rows = P.prepare_split(disk, tok, "train")[0]
    ex = [rows.example(i, None, disk) for i in range(len(rows))]
    w, y = (np.stack([e[k] for e in ex]) for k in ("weights", "targets"))
    roles = [SYSTEM_ID, USER_ID, ASSISTANT_ID]
    assert 0 < w.sum() < 0.5 * rows.stats(disk)[1]  # the stored weights, not lm's ones:
    assert not np.isin(y[w > 0], roles).any() and np.isin(y[w == 0], roles).any()  # replies
    it_a, it_b = P.make_train_iterator(mem, tok), P.make_train_iterator(disk, tok)
    for _ in range(4):
        assert same(next(it_a), next(it_b))
    for x, y in zip(P.eval_batches(mem, tok), P.eval_batches(disk, tok), strict=True):
        assert same(x, y)


def test_prepared_chats_refusals_are_one_line(chats, tmp_path):
    """sft from a documents corpus names the fix; a chat template other than the corpus's is
    refused before anything is written; a truncated weights shard is named."""
    tmp, tok, _ = chats

    def error(fn, match: str) -> None:
        with pytest.raises(SourceError, match=match) as e:
            fn()
        assert "\n" not in str(e.value)

    error(lambda: P.prepare_split(config(f"prepared:{tmp / 'pa'}", "sft"), tok, "train"),
          "--records chats")
    other = tmp_path / "other"
    shutil.copytree(tmp / "pc", other)
    m = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**m, "chat_template": "0" * 32}))
    error(lambda: P.build_tokenizer(config(f"prepared:{other}", "sft"), str(tmp_path / "wd")),
          "chat template .* is not the one")
    assert not (tmp_path / "wd").exists()
    (other / "manifest.json").write_text(json.dumps(m))
    weights = other / "all-00002.weights.arrayrecord"
    weights.write_bytes(weights.read_bytes()[:-10])
    error(lambda: prepared.StreamRows(f"prepared:{other}", config("", "sft"), "train"),
          "all-00002.weights.arrayrecord has")
    prep.prepare(str(tmp / "chats.jsonl"), tok.path, str(other), config("", "sft"), workers=0,
                 progress=False, records="chats",
                 unit_bytes=os.path.getsize(tmp / "chats.jsonl") // 3 + 1)  # mended
    assert (other / "manifest.json").read_text() == (tmp / "pc" / "manifest.json").read_text()


def test_gpt2_124m_config_reads_a_prepared_corpus(tmp_path):
    """experiments/gpt2_124m.py's prepare -> train path, abstractly: a corpus prepared with
    GPT-2's BPE files; the experiment's config on prepared:DIR validates, uses GPT-2's ids, and
    its first global batch is 512 rows of 1,024 tokens. No step is run; the batch is read
    without grain's thread pool (512 rows through it take ~30 s on a loaded 2-core machine)."""
    from reference import gpt2_bpe_dir

    from solo.config import RunConfig
    from solo.experiments import gpt2_124m
    from solo.train import parallel
    from solo.train.loop import validate_config

    bpe = str(gpt2_bpe_dir())
    write_text(tmp_path / "owt.txt", 6, paragraphs=80)
    prep.prepare(str(tmp_path / "owt.txt"), bpe, str(tmp_path / "owt"),
                 config(str(tmp_path / "owt.txt")), workers=0, progress=False)
    c = gpt2_124m.get_config()
    c.data.update(dict(source=f"prepared:{tmp_path / 'owt'}", split_mode="random"))
    run = RunConfig.from_config(c)
    validate_config(run, parallel.make_mesh(run.train.mesh))
    tok = P.build_tokenizer(run.data, str(tmp_path / "wd"))
    assert tok.vocab_size == 50257 and tok.encode(" the king") == [262, 5822]  # GPT-2's ids
    rows = P.prepare_split(run.data, tok, "train")[0]
    batch = P.eval_batches(run.data, tok, "train", batch_size=run.data.batch_size,
                           max_batches=1)[0]  # rows in order, then all-zero padding rows
    assert {k: v.shape for k, v in batch.items()} == {
        k: (512, 1024) for k in ("tokens", "targets", "weights", "segment_ids", "positions")}
    real = batch["segment_ids"] > 0
    assert real.sum() == rows.stats(run.data)[1] > 1024 * (len(rows) - 1)  # fill packing
    assert batch["weights"].sum() == real.sum() and not real[len(rows):].any()
    assert batch["tokens"].max() < 50257 and (batch["targets"] == 50256).any()  # <|endoftext|>


def test_prepared_world_chats_give_the_in_memory_sft_rows(corpus, tmp_path):
    """synthetic:world's chat splits (multi-turn too), prepared with --records chats: the same
    sft rows per split as the in-memory path."""
    tmp, tok = corpus
    world = dict(base.get_config().data.world.to_dict(), num_people=30, chat_turns=2)
    mem = config("synthetic:world", "sft", world=world)
    m = prep.prepare("synthetic:world", tok.path, str(tmp_path / "w"), mem, workers=0,
                     progress=False, records="chats")
    assert set(m["splits"]) == {"train", "validation"}
    disk = mem.replace(source=f"prepared:{tmp_path / 'w'}")
    for split in ("train", "validation"):
        a, b = P.prepare_split(mem, tok, split)[0], P.prepare_split(disk, tok, split)[0]
        assert len(a) == len(b) > 0 and a.stats(mem) == b.stats(disk)
        assert all(same(a.example(i, None, mem), b.example(i, None, disk))
                   for i in range(len(a))), split
