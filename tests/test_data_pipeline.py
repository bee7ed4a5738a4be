"""Pipelines: packing, MLM/NSP statistics, SFT weights, sharding, exact resume, eval exactness."""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest

from solo.data import pipeline as P
from solo.data import transforms as T
from solo.data.config import DataConfig
from solo.data.sources import load_records
from solo.data.tokenizer import (
    ASSISTANT_ID,
    BOS_ID,
    EOS_ID,
    EOT_ID,
    MASK_ID,
    SEP_ID,
    SPECIAL_IDS,
    SYSTEM_ID,
    USER_ID,
)
from solo.experiments import base

SHAKESPEARE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"
)


def make_config(task="lm", **data) -> DataConfig:
    """The typed data section of experiments/base.py's config with a tiny world and tokenizer;
    `data` overrides data.* (nested sections such as tokenizer/world are merged key by key)."""
    c = base.get_config()
    c.data.update(dict(task=task, seq_len=64, src_seq_len=48, batch_size=8, eval_batch_size=8,
                       tokenizer=dict(vocab_size=400, sample_size=100_000),
                       world=dict(num_people=16, bios_per_person=2)))
    c.data.update(data)
    return DataConfig.from_config(c)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return P.build_tokenizer(make_config(), str(tmp_path_factory.mktemp("tok")))


def take(it, n):
    return [next(it) for _ in range(n)]


ALPHA = 1e-6  # false-failure probability of each statistical check below


def assert_binomial(k, n, p):
    """k hits in n independent draws of probability p: a two-sided exact binomial test, which
    a correct sampler fails with probability ALPHA."""
    from scipy.stats import binomtest

    assert binomtest(int(k), int(n), p).pvalue > ALPHA, (int(k), int(n), p)


def test_build_tokenizer_reused_from_workdir(tmp_path):
    c = make_config()
    t1 = P.build_tokenizer(c, str(tmp_path))
    path = tmp_path / "tokenizer.model"
    before = path.stat().st_mtime_ns
    # ignored on resume: the saved model wins
    c = c.replace(tokenizer=dataclasses.replace(c.tokenizer, vocab_size=350))
    t2 = P.build_tokenizer(c, str(tmp_path))
    assert path.stat().st_mtime_ns == before and t2.vocab_size == t1.vocab_size
    c = c.replace(tokenizer=dataclasses.replace(c.tokenizer, path=str(path)))
    t3 = P.build_tokenizer(c, str(tmp_path / "other"))
    assert t3.encode("Alice was born") == t1.encode("Alice was born")


def test_pack_examples_handcrafted():
    docs = [np.array([BOS_ID, 11, 12, EOS_ID]), np.array([BOS_ID, *range(20, 29), EOS_ID])]
    rows = T.pack_examples(T.lm_examples(docs, 6), 6)
    # doc 0 -> 3 predictions; doc 1 -> 10 predictions, chunked 6 + 4; neither chunk fits beside
    # doc 0 (3 + 4 > 6), so three rows.
    assert rows["tokens"].tolist() == [
        [BOS_ID, 11, 12, 0, 0, 0],
        [BOS_ID, 20, 21, 22, 23, 24],
        [25, 26, 27, 28, 0, 0],
    ]
    assert rows["targets"].tolist() == [
        [11, 12, EOS_ID, 0, 0, 0],
        [20, 21, 22, 23, 24, 25],
        [26, 27, 28, EOS_ID, 0, 0],
    ]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 1, 1, 0, 0]]
    short = T.pack_examples(T.lm_examples([np.array([BOS_ID, 7, EOS_ID])] * 3, 6), 6)
    assert short["segment_ids"].tolist() == [[1, 1, 2, 2, 3, 3]]
    assert short["positions"].tolist() == [[0, 1, 0, 1, 0, 1]]
    seg, pos = rows["segment_ids"], rows["positions"]
    assert ((seg > 0) == (rows["weights"] > 0)).all()
    for r in range(3):
        for s in set(seg[r][seg[r] > 0]):
            assert (pos[r][seg[r] == s] == np.arange((seg[r] == s).sum())).all()


@pytest.mark.parametrize("pack", ["first_fit", "fill"])
def test_lm_packing_keeps_documents_and_all_tokens(tok, pack):
    c = make_config(seq_len=48, pack=pack)  # world bios are longer than 48: exercises chunking
    rows = P.prepare_split(c, tok, "train")[0].rows
    docs = T.encode_docs(tok, [r["text"] for r in load_records(c, "train")[0]])
    seg, x, y, w, pos = (
        rows[k] for k in ("segment_ids", "tokens", "targets", "weights", "positions")
    )
    assert ((seg > 0) == (w > 0)).all() and (x[seg == 0] == 0).all()
    # Multisets: inputs = every doc minus its EOS; targets = every doc minus its BOS.
    assert collections.Counter(x[seg > 0].tolist()) == collections.Counter(
        t for d in docs for t in d[:-1].tolist()
    )
    assert collections.Counter(y[seg > 0].tolist()) == collections.Counter(
        t for d in docs for t in d[1:].tolist()
    )
    doc_strings = [",".join(map(str, d.tolist())) for d in docs]
    for r in range(len(seg)):
        ids = seg[r][seg[r] > 0]
        assert (np.diff(ids) >= 0).all() and ids[0] == 1 and set(ids) == set(range(1, ids[-1] + 1))
        for s in set(ids.tolist()):
            m = seg[r] == s
            assert (pos[r][m] == np.arange(m.sum())).all()
            assert (y[r][m][:-1] == x[r][m][1:]).all()  # next token of the same document
            piece = ",".join(map(str, [*x[r][m].tolist(), int(y[r][m][-1])]))
            assert any(piece in d for d in doc_strings)  # a contiguous piece of one document
    # exact: both are the integer count of real slots over the count of all, divided once
    assert P.packing_efficiency(c, tok) == (seg > 0).mean()
    assert P.packing_efficiency(c, tok) > 0.9


def unmasked(batch):
    return np.where(batch["mlm_weights"] > 0, batch["mlm_targets"], batch["tokens"])


def test_mlm_statistics(tok):
    c = make_config("mlm")
    orig = P.prepare_split(c, tok, "train")[0].rows["tokens"]
    (b,) = P.eval_batches(c, tok, "train", batch_size=len(orig))  # in row order, masked
    w = b["mlm_weights"] > 0
    assert (b["tokens"][~w] == orig[~w]).all() and (b["mlm_targets"][w] == orig[w]).all()
    assert (b["mlm_targets"][~w] == 0).all()
    special = np.isin(orig, SPECIAL_IDS)
    assert not (w & special).any()
    assert (b["tokens"][special] == orig[special]).all()
    eligible = (~special).sum()
    assert_binomial(w.sum(), eligible, c.mlm_rate)
    masked = (b["tokens"] == MASK_ID) & w
    kept = (b["tokens"] == orig) & w
    rand = w & ~masked & ~kept
    assert_binomial(masked.sum(), w.sum(), 0.8)
    # a random replacement draws the original token again with probability 1 / (non-special ids)
    same = 1 / (tok.vocab_size - len(SPECIAL_IDS))
    assert_binomial(kept.sum(), w.sum(), 0.1 + 0.1 * same)
    assert_binomial(rand.sum(), w.sum(), 0.1 * (1 - same))
    assert not np.isin(b["tokens"][rand], SPECIAL_IDS).any()
    # The training stream masks too, and differently per index.
    t = next(P.make_train_iterator(c, tok))
    t_special = np.isin(unmasked(t), SPECIAL_IDS)  # padding is special too
    assert_binomial((t["mlm_weights"] > 0).sum(), (~t_special).sum(), c.mlm_rate)


def test_sentence_splitter():
    text = "Mr. Smith went to Washington. He liked it! Did he? Yes. The end"
    assert T.split_sentences(text) == [
        "Mr. Smith went to Washington.",
        "He liked it!",
        "Did he?",
        "Yes.",
        "The end",
    ]
    assert T.split_sentences("no end here") == ["no end here"]


def test_nsp_pairs(tok):
    c = make_config("bert", seq_len=96)
    docs = [r["text"] for r in load_records(c, "train")[0]]
    sents = [[tuple(tok.encode(s)) for s in T.split_sentences(d)] for d in docs]
    # A = sentences i..j-1 and B = sentences j..k-1 of one document (true next), or B = a run of
    # consecutive sentences of another document.
    run = lambda d, i, j: tuple(t for s in d[i:j] for t in s)
    consecutive = {
        (run(d, i, j), run(d, j, k))
        for d in sents
        for i in range(len(d))
        for j in range(i + 1, len(d))
        for k in range(j + 1, len(d) + 1)
    }
    all_runs = {
        run(d, i, j) for d in sents for i in range(len(d)) for j in range(i + 1, len(d) + 1)
    }
    batches = P.eval_batches(c, tok, "train", batch_size=64)
    labels, n_multi = [], 0
    sents_flat = {s for d in sents for s in d}
    for b in batches:
        x = unmasked(b)
        for r in range(len(x)):
            if b["nsp_weights"][r] == 0:
                assert (b["segment_ids"][r] == 0).all()
                continue
            ids = x[r][b["segment_ids"][r] > 0].tolist()
            assert ids[0] == BOS_ID and ids[-1] == SEP_ID
            s1 = ids.index(SEP_ID)
            a, bb = tuple(ids[1:s1]), tuple(ids[s1 + 1 : -1])
            tt = b["token_types"][r][: len(ids)]
            assert (tt[: s1 + 1] == 0).all() and (tt[s1 + 1 :] == 1).all()
            assert (b["token_types"][r][len(ids) :] == 0).all()
            labels.append(int(b["nsp_labels"][r]))
            n_multi += a not in sents_flat
            assert bb in all_runs
            if labels[-1] == 1:
                assert (a, bb) in consecutive
    assert len(labels) > 100 and n_multi > 5  # multi-sentence segments do occur
    assert_binomial(sum(labels), len(labels), 0.5)  # B is the true next with probability 1/2


def test_nsp_same_doc_negatives(tok):
    """nsp_negatives='same_doc': a not-next B is another run of A's own document, never its true
    continuation (so the person's name no longer gives the label away)."""
    c = make_config("bert", seq_len=96, nsp_negatives="same_doc")
    docs = [r["text"] for r in load_records(c, "train")[0]]
    sents = [[tuple(tok.encode(s)) for s in T.split_sentences(d)] for d in docs]
    run = lambda d, i, j: tuple(t for s in d[i:j] for t in s)
    doc_runs = [{run(d, i, j) for i in range(len(d)) for j in range(i + 1, len(d) + 1)}
                for d in sents]
    consecutive = {(run(d, i, j), run(d, j, k)) for d in sents for i in range(len(d))
                   for j in range(i + 1, len(d)) for k in range(j + 1, len(d) + 1)}
    negatives = 0
    for b in P.eval_batches(c, tok, "train", batch_size=64):
        x = unmasked(b)
        for r in range(len(x)):
            if b["nsp_weights"][r] == 0 or b["nsp_labels"][r] == 1:
                continue
            ids = x[r][b["segment_ids"][r] > 0].tolist()
            s1 = ids.index(SEP_ID)
            a, bb = tuple(ids[1:s1]), tuple(ids[s1 + 1: -1])
            assert any(a in runs and bb in runs for runs in doc_runs)
            assert (a, bb) not in consecutive
            negatives += 1
    assert negatives > 50


def test_sft_weights_cover_exactly_assistant_tokens(tok):
    c = make_config("sft", seq_len=128)
    records = load_records(c, "train")[0]
    rows = P.prepare_split(c, tok, "train")[0].rows
    expected_total = sum(
        len(tok.encode(" " + m["content"])) + 1  # the template spaces an assistant's text
        for r in records
        for m in r["messages"]
        if m["role"] == "assistant"
    )
    assert rows["weights"].sum() == expected_total
    roles = {SYSTEM_ID: "system", USER_ID: "user", ASSISTANT_ID: "assistant"}
    for r in range(len(rows["tokens"])):
        seg = rows["segment_ids"][r]
        for s in set(seg[seg > 0].tolist()):
            m = seg == s
            x, y, w = rows["tokens"][r][m], rows["targets"][r][m], rows["weights"][r][m]
            assert (y[:-1] == x[1:]).all() and x[0] == BOS_ID
            seq, role, want = [*x.tolist(), int(y[-1])], None, []
            for t in seq:  # independent re-derivation of the loss mask
                if t in roles:
                    role = roles[t]
                    want.append(0.0)
                else:
                    want.append(1.0 if role == "assistant" and t != BOS_ID else 0.0)
                    if t == EOT_ID:
                        role = None
            assert w.tolist() == want[1:]


def test_seq2seq_and_pairs_rows(tok):
    c = make_config("seq2seq")
    b = next(P.make_train_iterator(c, tok))
    assert b["src_tokens"].shape == (8, 48) and b["tokens"].shape == (8, 64)
    for r in range(8):
        n, k = b["src_segment_ids"][r].sum(), b["segment_ids"][r].sum()
        assert b["src_tokens"][r][n - 1] == EOS_ID and b["tokens"][r][0] == BOS_ID
        assert b["targets"][r][k - 1] == EOS_ID and b["weights"][r].sum() == k
        assert (b["targets"][r][: k - 1] == b["tokens"][r][1:k]).all()
    p = next(P.make_train_iterator(make_config("pairs"), tok))
    assert p["tokens_b"].shape == (8, 64) and (p["segment_ids_b"][:, 0] == 1).all()
    assert not (p["tokens"] == p["tokens_b"]).all()  # world pairs are paraphrases
    assert (p["pair_groups"] >= 0).all()  # each world pair names its fact (person/attribute)
    recs = [dict(text_a="a", text_b="b", group="Ann/city"), dict(text_a="c", text_b="d",
            group="Ann/city"), dict(text_a="e", text_b="f", group="Bo/city"),
            dict(text_a="g", text_b="h")]
    g = T.pairs_rows(tok, recs, 16)["pair_groups"]
    assert g.dtype == np.int32 and g[0] == g[1] != g[2] and g[3] == -1 and g[2] >= 0


def test_pairs_from_documents_are_dropout_views(tmp_path, tok):
    f = tmp_path / "d.txt"
    f.write_text("One doc.\n\nAnother doc here.\n\nThird.\n\nFourth one.")
    c = make_config("pairs", source=str(f), txt_split="blank_lines", batch_size=2)
    b = next(P.make_train_iterator(c, tok))
    assert (b["tokens"] == b["tokens_b"]).all()
    assert (b["pair_groups"] == -1).all()  # no groups: every other row is a negative


def test_shards_disjoint_and_covering(tok):
    c = make_config("lm")
    glob_it = P.make_train_iterator(c, tok)
    shards = [P.make_train_iterator(c, tok, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        g = next(glob_it)
        parts = [next(s) for s in shards]
        assert all(p["tokens"].shape == (4, 64) for p in parts)
        # process p feeds rows [4p, 4p + 4) of the one-process batch: the global batch that
        # make_array_from_process_local_data assembles is the same rows in the same order
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])


@pytest.mark.parametrize("batch_size", [6, 5])
def test_eval_shards_disjoint_and_covering(tok, batch_size):
    """Each process's slices are the one-process batches' rows; a batch that does not divide
    over the processes keeps its rows (which rows share a batch is a metric's business) and gets
    all-zero rows after them."""
    c = make_config("mlm")
    full = P.eval_batches(c, tok, batch_size=batch_size)
    parts = [P.eval_batches(c, tok, batch_size=batch_size, process_index=p, process_count=2)
             for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(full)
    for g, a, b in zip(full, *parts, strict=True):
        assert a["tokens"].shape[0] == b["tokens"].shape[0] == 3
        for k in g:
            both = np.concatenate([a[k], b[k]])
            np.testing.assert_array_equal(both[:batch_size], g[k])
            assert not both[batch_size:].any()


@pytest.mark.parametrize("task", ["mlm", "bert"])
def test_exact_resume(tok, task):
    c = make_config(task)
    it = P.make_train_iterator(c, tok)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    it2 = P.make_train_iterator(c, tok)
    it2.set_state(state)
    for a, b in zip(expected, take(it2, 4), strict=True):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    other = next(P.make_train_iterator(make_config(task, shuffle_seed=5), tok))
    assert not (other["tokens"] == expected[0]["tokens"]).all()


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_eval_batch_size_independence(tok, task):
    c = make_config(task)
    key = ("weights", "targets") if task == "lm" else ("mlm_weights", "mlm_targets")
    results = []
    for bs in (1, 7, 32):
        batches = P.eval_batches(c, tok, batch_size=bs)
        n_rows = len(P.prepare_split(c, tok, "validation")[0])
        assert len(batches) == -(-n_rows // bs) and all(len(b["tokens"]) == bs for b in batches)
        cat = {k: np.concatenate([b[k] for b in batches])[:n_rows] for k in batches[0]}
        pad = np.concatenate([b[key[0]] for b in batches])[n_rows:]
        assert (pad == 0).all()
        w = cat[key[0]]
        fake_loss = ((cat[key[1]] * 7 + cat["tokens"]) % 11).astype(np.float64)
        results.append((cat, (w * fake_loss).sum() / w.sum()))
    for cat, loss in results[1:]:
        assert loss == results[0][1]
        assert all((cat[k] == results[0][0][k]).all() for k in cat)


def test_mixture_pipeline(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Alice was born in Paris. " * 20)
    (tmp_path / "b.txt").write_text("Bob studied math at MIT. " * 20)
    c = make_config(
        "lm",
        source=f"{tmp_path}/a.txt:0.5,{tmp_path}/b.txt:0.5",
        val_fraction=0.0,
        batch_size=8,
        seq_len=16,
    )
    b = next(P.make_train_iterator(c, tok))
    text = " ".join(tok.decode(r) for r in b["tokens"])
    assert "Alice" in text and "Bob" in text


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tinyshakespeare.txt absent")
def test_shakespeare_char_rows(tmp_path):
    c = make_config(
        "lm",
        source=SHAKESPEARE,
        seq_len=256,
        batch_size=16,
        split_mode="tail",
        tokenizer=dict(kind="char", vocab_size=0, sample_size=100_000, path=""),
    )
    tok = P.build_tokenizer(c, str(tmp_path))
    b = next(P.make_train_iterator(c, tok))
    assert b["tokens"].shape == (16, 256) and (b["weights"] > 0).mean() > 0.99


def test_lm_task_keeps_the_chat_template_of_mixed_chat_records(tmp_path):
    """mix_qa='chat': the train chats join the LM corpus in the SFT template (role ids present);
    test_world checks that held-out people's questions are not among them."""
    from solo.data.tokenizer import ASSISTANT_ID, EOT_ID, USER_ID
    from solo.data.world import World

    c = make_config("lm", pack="first_fit")
    c = c.replace(world={**c.world, "mix_qa": "chat"})
    tok = P.build_tokenizer(c, str(tmp_path))
    rows = P.prepare_split(c, tok, "train")[0].rows
    tokens = rows["tokens"][rows["segment_ids"] > 0]
    world = World.from_config(c.world)
    n_chats = len(world.records("chats", "train"))
    assert (tokens == USER_ID).sum() == n_chats and (tokens == ASSISTANT_ID).sum() == n_chats
    assert (rows["targets"] == EOT_ID).sum() == 2 * n_chats  # user and assistant turns end
