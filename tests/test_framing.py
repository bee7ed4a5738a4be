"""Train/serve framing parity (data/framing.py): what a model is served is what it was trained on,
per task: seq2seq sources, BERT-style [CLS] ... [SEP] documents, views and embedding inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config

from solo.agent.sampler import Sampler
from solo.agent.scoring import Scorer
from solo.data import transforms as T
from solo.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from solo.data.world import World
from solo.model.transformer import Transformer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return Tokenizer.train([World.generate(seed=0, num_people=10).corpus_text()], str(d / "c"),
                           kind="char", vocab_size=0)


def test_seq2seq_sampler_source_is_the_training_source(tok):
    """Sampler.generate frames a text source as seq2seq_rows does (text + [EOS], no BOS), starts
    the decoder at the training rows' first token, and its first greedy token is the argmax of
    the training forward's logits on that row."""
    cfg = model_config(kind="encoder_decoder", vocab_size=tok.vocab_size, d_model=32,
                       num_layers=1, num_heads=4, d_ff=64, max_len=64)
    model = Transformer(cfg)
    params = model.init(jax.random.key(1), {"tokens": jnp.zeros((1, 4), jnp.int32),
                                            "src_tokens": jnp.zeros((1, 4), jnp.int32)})["params"]
    s = Sampler(model, params, tok, stop_ids=())
    seen = []
    prefill = s._prefill

    def spy(variables, prompt, lengths, src, *a, **k):
        seen.append((np.asarray(prompt)[0].tolist(), np.asarray(src)[0].tolist()))
        return prefill(variables, prompt, lengths, src, *a, **k)

    s._prefill = spy
    text = "Anna lives"
    rows = T.seq2seq_rows(tok, [dict(source=text, target="x")], 16, 16)
    want_src = rows["src_tokens"][0][rows["src_segment_ids"][0] > 0].tolist()
    assert want_src == [*tok.encode(text), EOS_ID]  # the reference framing, by hand
    first = s.generate([text], max_new_tokens=1)[0].tokens
    s.generate(["x"], max_new_tokens=1, src=[text])  # explicit source, decoder prompt text
    (p1, src1), (p2, src2) = seen
    assert [t for t in src1 if t] == want_src and [t for t in src2 if t] == want_src
    assert [t for t in p1 if t] == [int(rows["tokens"][0, 0])] == [BOS_ID]
    assert [t for t in p2 if t] == rows["tokens"][0, :2].tolist()  # [BOS] + "x"
    logits = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in rows.items()
                                              if k not in ("targets", "weights")})["logits"]
    assert first == [int(jnp.argmax(logits[0, 0]))]


@pytest.fixture(scope="module")
def bert_tok():
    """A BERT-style tokenizer as transformers' bert-base config names it: CLS/SEP, no BOS/EOS."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from solo.data.hf_tokenizer import HFTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate([*specials, "anya", "lives", "in", "lima"])}
    b = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    b.pre_tokenizer = pre_tokenizers.Whitespace()
    b.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return HFTokenizer(b.to_str(), named_tokens=dict(
        cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]"))


def test_bert_style_documents_views_and_embedding_inputs_are_cls_sep_framed(bert_tok):
    cls_id, sep_id = 2, 3
    assert (bert_tok.bos_id, bert_tok.eos_id, bert_tok.cls_id, bert_tok.sep_id) == (
        None, None, cls_id, sep_id)
    text, words = "anya lives in lima", [5, 6, 7, 8]
    assert T.encode_docs(bert_tok, [text])[0].tolist() == [cls_id, *words, sep_id]
    view = T.view_row(bert_tok, bert_tok.encode(text), 8)
    assert view["tokens"].tolist() == [cls_id, *words, sep_id, 0, 0]
    assert T.view_row(bert_tok, bert_tok.encode(text), 4)["tokens"].tolist() == [
        cls_id, 5, 6, sep_id]  # truncated keeping [SEP]
    cfg = model_config(kind="encoder", vocab_size=16, d_model=16, num_layers=1, num_heads=2,
                       d_ff=32, max_len=5, pooling="first")
    assert Scorer(Transformer(cfg), {}, bert_tok).text_ids(text) == [cls_id, 5, 6, 7, sep_id]


def test_solo_tokenizer_framing_is_unchanged(tok):
    """solo's own tokenizer (BOS and EOS, which are also its CLS and SEP's neighbours)."""
    ids = tok.encode("Anna")
    assert T.encode_docs(tok, ["Anna"])[0].tolist() == [BOS_ID, *ids, EOS_ID]
    assert T.view_row(tok, ids, 4)["tokens"].tolist() == [BOS_ID, *ids[:2], EOS_ID]


def test_decoder_prompt_and_embedding_input_match_the_training_rows(tok):
    """Decoder LM: a text prompt reaches the model as its training document begins (the document
    without its EOS); embeddings: Scorer.text_ids is the contrastive training view."""
    cfg = model_config(vocab_size=tok.vocab_size, d_model=16, num_layers=1, num_heads=2,
                       d_ff=32, max_len=32)
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), {"tokens": jnp.zeros((1, 4), jnp.int32)})["params"]
    s = Sampler(model, params, tok, cache_len=32)
    seen = []
    prefill = s._prefill

    def spy(variables, prompt, lengths, *a, **k):
        seen.append([t for t in np.asarray(prompt)[0].tolist() if t])
        return prefill(variables, prompt, lengths, *a, **k)

    s._prefill = spy
    text = "Anna lives in Oslo"
    s.generate([text], max_new_tokens=1)
    assert seen == [T.encode_docs(tok, [text])[0][:-1].tolist()]
    view = T.view_row(tok, tok.encode(text), cfg.max_len)
    assert Scorer(model, params, tok).text_ids(text) == view["tokens"][
        view["segment_ids"] > 0].tolist()
