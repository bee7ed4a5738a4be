"""Tokenizer + chat template: round trips, fixed special ids, errors, SFT weights."""

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solo.data import chat
from solo.data.tokenizer import (
    ASSISTANT_ID,
    BOS_ID,
    EOS_ID,
    EOT_ID,
    MASK_ID,
    NUM_SPECIAL,
    PAD_ID,
    SEP_ID,
    SPECIAL_IDS,
    SPECIAL_PIECES,
    SYSTEM_ID,
    UNK_ID,
    USER_ID,
    Tokenizer,
)
from solo.data.world import World

UNICODE_EXTRA = "Grüße, naïve café — 東京 漢字 😀🚀 \t tab\n\nnew  lines   spaces\r\n"


@pytest.fixture(scope="module")
def corpus():
    return World.generate(seed=0, num_people=40).corpus_text() + "\n" + UNICODE_EXTRA


@pytest.fixture(scope="module")
def toks(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {
        "bpe": Tokenizer.train([corpus], str(d / "bpe"), kind="bpe", vocab_size=450),
        "char": Tokenizer.train([corpus], str(d / "char"), kind="char", vocab_size=0),
        "unigram": Tokenizer.train([corpus], str(d / "uni"), kind="unigram", vocab_size=450),
    }


def test_special_id_constants():
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID) == (0, 1, 2, 3, 4, 5)
    assert (SYSTEM_ID, USER_ID, ASSISTANT_ID, EOT_ID) == (6, 7, 8, 9)
    assert SPECIAL_IDS == tuple(range(10)) and NUM_SPECIAL == 10
    assert len(set(SPECIAL_IDS)) == NUM_SPECIAL


@pytest.mark.parametrize("kind", ["bpe", "char", "unigram"])
def test_special_pieces_and_never_encoded(toks, kind):
    tok = toks[kind]
    expected = [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
        "<mask>",
        "<sep>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    assert [tok.id_to_piece(i) for i in SPECIAL_IDS] == expected == list(SPECIAL_PIECES)
    for piece in expected:
        ids = tok.encode(piece)
        assert ids and not set(ids) & set(SPECIAL_IDS)
        assert tok.decode(ids) == piece
    text = "".join(expected) + " <|user|>hi<|end|>"
    assert not set(tok.encode(text)) & set(SPECIAL_IDS)


@pytest.mark.parametrize("kind", ["bpe", "char"])
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text() | st.text(alphabet=" \t\n\r\u3000\xa0ab東😀", max_size=30))
def test_round_trip_property(toks, kind, text):
    tok = toks[kind]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(NUM_SPECIAL <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("kind", ["bpe", "char", "unigram"])
def test_round_trip_whitespace_cases(toks, kind):
    tok = toks[kind]
    for text in [
        "",
        " ",
        "  lead",
        "trail  ",
        "a\nb",
        "\n\n",
        "\ttab\t",
        "x\r\ny",
        " \n \t ",
        "Where was Anya Kovac born?",
        "1987, 2005",
        "😀漢字\n",
    ]:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_decode_drops_special_and_out_of_range(toks):
    tok = toks["bpe"]
    ids = tok.encode("hello world")
    noisy = [BOS_ID] + ids[:1] + [PAD_ID, EOT_ID, UNK_ID] + ids[1:] + [EOS_ID, tok.vocab_size + 3]
    assert tok.decode(noisy) == "hello world"


def test_vocab_sizes(toks, corpus):
    assert toks["bpe"].vocab_size == 450
    # char: specials + 256 bytes + one piece per distinct character ('▁' stands for ' ');
    # line breaks split training lines, so they are always the byte pieces <0x0A>/<0x0D>.
    assert toks["char"].vocab_size == NUM_SPECIAL + 256 + len(set(corpus) - {"\n", "\r"})
    assert toks["char"].encode("\n") == [NUM_SPECIAL + ord("\n")]


def test_digits_split(toks):
    tok = toks["bpe"]
    pieces = [tok.id_to_piece(i) for i in tok.encode("1987")]
    assert pieces == ["1", "9", "8", "7"]


def test_save_load_and_pickle(toks, tmp_path):
    texts = ["Anya Kovac was born in Lisbon.", "  spaced\n\ttext <|user|> 漢字😀"]
    for tok in toks.values():
        loaded = Tokenizer.load(tok.path)
        assert loaded.settings["kind"] == tok.kind and loaded.vocab_size == tok.vocab_size
        assert loaded.settings["sample_size"] == 1_000_000
        copy = Tokenizer.load(tok.save(str(tmp_path / f"{tok.kind}.model")))
        clone = pickle.loads(pickle.dumps(tok))
        for t in texts:
            assert loaded.encode(t) == copy.encode(t) == clone.encode(t) == tok.encode(t)
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([], str(tmp_path / "a"), vocab_size=400)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(["", "\n\n"], str(tmp_path / "a"), vocab_size=400)
    with pytest.raises(ValueError, match=r"at most vocab_size=\d+.*[Ll]ower"):
        Tokenizer.train(["a small corpus of text"] * 5, str(tmp_path / "b"), vocab_size=600)
    with pytest.raises(ValueError, match="char"):
        Tokenizer.train([corpus], str(tmp_path / "c"), vocab_size=100)
    with pytest.raises(ValueError, match="kind"):
        Tokenizer.train([corpus], str(tmp_path / "d"), kind="wordpiece", vocab_size=400)


# ------------------------------------------------------------------------------ chat template


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where was Anya Kovac born? <|assistant|>"},
    {"role": "assistant", "content": "Lisbon"},
    {"role": "user", "content": "And\nher job?"},
    {"role": "assistant", "content": "  a pilot\t"},
]


def test_encode_chat_layout_and_weights(toks):
    tok = toks["bpe"]
    ids, w = chat.encode_chat(tok, MESSAGES, add_generation_prompt=False)
    assert len(ids) == len(w) and ids[0] == BOS_ID
    # Independent re-derivation of the layout.
    exp_ids, exp_w = [BOS_ID], [0.0]
    for m in MESSAGES:
        # the template spaces an assistant's text (chat.CONTENT_PREFIX)
        body = tok.encode((" " if m["role"] == "assistant" else "") + m["content"])
        exp_ids += [chat.ROLE_IDS[m["role"]], *body, EOT_ID]
        a = float(m["role"] == "assistant")
        exp_w += [0.0] + [a] * (len(body) + 1)
    assert ids == exp_ids and w == exp_w
    # Weighted tokens are exactly assistant content + their EOT.
    weighted = [i for i, x in zip(ids, w, strict=True) if x == 1.0]
    assistant = [
        t for m in MESSAGES if m["role"] == "assistant"
        for t in tok.encode(" " + m["content"]) + [EOT_ID]  # after the template's space
    ]
    assert weighted == assistant
    assert set(w) <= {0.0, 1.0}
    # The typed '<|assistant|>' string is text, so only the two real assistant markers exist.
    assert ids.count(ASSISTANT_ID) == 2 and ids.count(USER_ID) == 2


def test_generation_prompt_and_round_trip(toks):
    tok = toks["char"]
    prompt = MESSAGES[:2]
    ids, w = chat.encode_chat(tok, prompt, add_generation_prompt=True)
    assert ids[-1] == ASSISTANT_ID and w[-1] == 0.0 and sum(w) == 0.0
    turns = chat.split_turns(ids)
    assert [t[0] for t in turns] == ["system", "user", "assistant"]
    assert turns[-1] == ("assistant", [], False)
    full, _ = chat.encode_chat(tok, MESSAGES, add_generation_prompt=False)
    assert chat.decode_chat(tok, full) == MESSAGES
    with pytest.raises(ValueError, match="role"):
        chat.encode_chat(tok, [{"role": "tool", "content": "x"}], add_generation_prompt=False)


def test_decode_reply_and_render(toks):
    tok = toks["bpe"]
    reply = tok.encode("Lisbon") + [EOT_ID] + tok.encode("junk")
    assert chat.decode_reply(tok, reply) == "Lisbon"
    assert chat.decode_reply(tok, tok.encode("no end")) == "no end"
    text = chat.render(MESSAGES[1:3])
    assert "Where was Anya Kovac born?" in text and "Lisbon" in text
