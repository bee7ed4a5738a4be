"""`solo eval` on any data: a data override scores the other data (perplexity re-derived by hand
from the model's logits), bits per byte on a known text, QA exact match on any JSONL of
question/answer pairs, results as JSON beside the checkpoint, one-line errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import data_config

from solo.agent.evaluate import eval_command, normalize
from solo.cli import main
from solo.data.tasks import chat_eval
from solo.experiments.base import get_config
from solo.train.inference import load
from solo.train.loop import train_and_evaluate

# a known text with multi-byte characters (bytes != characters), paragraphs of different
# lengths; one is longer than seq_len, so it is scored in chunks
TEXT = ("Anya Dorsey lives in Oslo. Naïve café owners say: ünïcode — ok.\n\n"
        "Hiro Galindo was born in Florence and works as a baker in a small town by the sea, "
        "where the winters are long and the summers are short.\n\n"
        "Short one.\n\nZoë ate crème brûlée.")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    c = get_config()
    c.name = "evaltiny"
    c.model.update(dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=64))
    c.data.update(dict(task="lm", seq_len=32, batch_size=8, eval_batch_size=8))
    c.data.tokenizer.update(dict(kind="char", vocab_size=0))
    c.data.world.update(dict(num_people=10, bios_per_person=2))
    c.train.update(dict(steps=1, log_every=1, eval_every=1, ckpt_every=1, eval_batches=1))
    c.optim.update(dict(warmup_steps=1))
    c.agent.max_new_tokens = 8
    wd = str(tmp / "wd")
    train_and_evaluate(c, wd)
    other = tmp / "other.txt"
    other.write_text(TEXT, encoding="utf-8")
    return wd, other, tmp


def reference_nll(wd, docs):
    """Sum of -ln p over every scored token and their count, re-derived from the model's logits:
    each document is BOS + text + EOS, predicted in chunks of seq_len (a fresh context each),
    every chunk its own right-padded row."""
    loaded = load(wd)
    tok, seq = loaded.tokenizer, loaded.config.data.seq_len
    chunks = []
    for doc in docs:
        ids = [tok.bos_id, *tok.encode(doc), tok.eos_id]
        chunks += [(ids[s: s + seq], ids[s + 1: s + 1 + seq]) for s in range(0, len(ids) - 1, seq)]
    x = np.zeros((len(chunks), seq), np.int32)
    seg = np.zeros((len(chunks), seq), np.int32)
    for i, (a, y) in enumerate(chunks):
        x[i, : len(y)], seg[i, : len(y)] = a[: len(y)], 1
    logits = loaded.model.apply({"params": loaded.params}, {"tokens": x, "segment_ids": seg})
    logp = np.asarray(jax.nn.log_softmax(logits["logits"].astype(jnp.float32), -1), np.float64)
    nll = -sum(logp[i, j, t] for i, (_, y) in enumerate(chunks) for j, t in enumerate(y))
    return nll, sum(len(y) for _, y in chunks)


def test_data_override_scores_the_other_text(run):
    wd, other, _ = run
    overrides = [f"--config.data.source={other}", "--config.data.txt_split=blank_lines"]
    report, path = eval_command(wd, overrides=overrides, splits=["train", "validation"])
    result = json.loads(open(path).read())
    docs = [p for p in TEXT.split("\n\n")]
    nll, count = reference_nll(wd, docs)
    m = result["metrics"]
    assert result["tokens"] == count
    # float32 logits of a 1-layer, 32-wide model, summed over ~200 tokens in float32 by the
    # eval step: relative error well under 1e-5
    assert m["causal_lm/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert m["causal_lm/perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    nbytes = len(TEXT.replace("\n\n", "").encode("utf-8"))
    assert result["bytes"] == nbytes and nbytes > len(TEXT.replace("\n\n", ""))
    assert result["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    # bits per byte = loss x tokens / bytes / ln 2
    assert result["bits_per_byte"] == pytest.approx(
        m["causal_lm/loss"] * result["tokens"] / result["bytes"] / math.log(2), rel=1e-6)
    assert path.endswith("eval/step_1/other.txt-train-validation.json")
    assert "bits per byte" in report and result["step"] == 1 and result["source"] == str(other)
    assert "qa" not in result  # an lm run gets no QA by default (it is not a chat model)


def test_qa_exact_match_on_any_jsonl(run):
    wd, _, tmp = run
    qa = tmp / "qa.jsonl"
    rows = [{"question": "Where does Anya Dorsey live?", "answer": "Oslo"},
            {"question": "What is 3+5?", "answer": "8"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, path = eval_command(wd, qa=str(qa))
    res = json.loads(open(path).read())["qa"]
    assert res["source"] == str(qa) and res["n"] == 2
    assert [e["question"] for e in res["examples"]] == [r["question"] for r in rows]
    assert res["correct"] == sum(normalize(e["reply"]) == normalize(e["answer"])
                                 for e in res["examples"])
    assert path.endswith("validation+qa-qa.json")


@pytest.mark.parametrize("args, expect", [
    (["--config.data.source=/no/such/file.txt"], "'/no/such/file.txt' matched no files"),
    (["--config.model.num_layers=3"], "only --config.data.* overrides apply"),
    (["--config.data.tokenizer.kind=bpe"], "data.tokenizer.* cannot change"),
    (["--split", "dev"], "valid splits are train, validation, test"),
    (["--qa", "QA"], "QA"),
])
def test_bad_eval_input_is_one_line(run, capsys, args, expect):
    wd, _, tmp = run
    if args[-1] == "QA":
        bad = tmp / "bad.jsonl"
        bad.write_text('{"question": "q"}\n')
        args, expect = ["--qa", str(bad)], f"{bad}:1: missing field 'answer'"
    assert main(["eval", wd, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err


def test_world_questions_only_for_world_chat_runs(tmp_path):
    world_sft = data_config(task="sft")
    assert chat_eval(world_sft)
    f = tmp_path / "chats.jsonl"
    f.write_text('{"prompt": "hi", "response": "hello"}\n')
    assert not chat_eval(data_config(task="sft", source=str(f)))
    assert chat_eval(data_config(task="sft", source=f"synthetic:world:0.5,{f}:0.5"))


def test_a_tfds_split(run):
    """A TFDS dataset's test split (array_record, no TensorFlow) scored like any other data."""
    from solo.data.tfds_io import write_tfds_dataset

    wd, _, tmp = run
    docs = ["Zoë ate crème brûlée in Oslo.", "Hiro Galindo was born in Florence."]
    write_tfds_dataset({"train": [{"text": "unused"}], "test": [{"text": d} for d in docs]},
                       "solo_eval_corpus", str(tmp / "tfds"))
    _, path = eval_command(wd, overrides=["--config.data.source=tfds:solo_eval_corpus",
                                          f"--config.data.data_dir={tmp / 'tfds'}"],
                           splits=["test"])
    result = json.loads(open(path).read())
    nll, count = reference_nll(wd, docs)
    assert result["tokens"] == count and path.endswith("tfds_solo_eval_corpus-test.json")
    assert result["bits_per_byte"] == pytest.approx(
        nll / len("".join(docs).encode()) / math.log(2), rel=1e-5)


def _gpt2_piece_bytes() -> dict[int, int]:
    """GPT-2 id -> its piece's byte count (encoder.json's pieces spell bytes through GPT-2's
    bytes_to_unicode table: 188 printable bytes as themselves, the other 68 as chr(256 + i))."""
    from reference import gpt2_bpe_dir

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled = {chr(b) for b in printable} | {chr(256 + i) for i in range(256 - len(printable))}
    vocab = json.loads((gpt2_bpe_dir() / "encoder.json").read_text(encoding="utf-8"))
    assert all(ch in spelled for piece in vocab for ch in piece)
    return {i: len(piece) for piece, i in vocab.items()}


def test_bits_per_byte_counts_no_first_token_bytes_without_bos(tmp_path):
    """GPT-2's tokenizer has no BOS: each document's first token is context, never scored, so
    its bytes stay out of the byte count (or bits per byte would come out low)."""
    from reference import gpt2_bpe_dir

    from solo.config import RunConfig
    from solo.data.hf_tokenizer import HFTokenizer
    from solo.train.eval_data import scored_bytes

    tok = HFTokenizer.from_gpt2_files(*(str(gpt2_bpe_dir() / n)
                                        for n in ("encoder.json", "vocab.bpe")))
    assert tok.bos_id is None or not tok.add_bos
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    c = get_config()
    c.data.update(dict(source=str(path), txt_split="blank_lines", task="lm", val_fraction=0.0))
    got = scored_bytes(RunConfig.from_config(c), tok, "train")
    piece = _gpt2_piece_bytes()
    docs = TEXT.split("\n\n")
    expect = sum(len(d.encode("utf-8")) - piece[tok.encode(d)[0]] for d in docs)
    assert got == expect, (got, expect)
    # a document that starts inside a character GPT-2 splits over tokens: the first token holds
    # part of its bytes (decoding the rest would count U+FFFD's 3 bytes for them)
    cjk = "日本語のテキスト\n\n𝔘nicode start"
    path.write_text(cjk, encoding="utf-8")
    got = scored_bytes(RunConfig.from_config(c), tok, "train")
    docs = cjk.split("\n\n")
    assert any(piece[tok.encode(d)[0]] < len(d[0].encode("utf-8")) for d in docs)
    expect = sum(len(d.encode("utf-8")) - piece[tok.encode(d)[0]] for d in docs)
    assert got == expect, (got, expect)
    assert expect < len(TEXT.replace("\n\n", "").encode("utf-8"))
