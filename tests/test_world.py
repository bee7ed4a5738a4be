"""Synthetic world: determinism, splits that never leak held-out people, faithful text."""

import re

import pytest

from solo.data import world as W
from solo.data.world import ATTRIBUTES, BIO_TEMPLATES, QUESTION_TEMPLATES, World
from solo.experiments.base import get_config


def world_section(**options):
    """experiments/base.py's data.world section (every option) with `options` replaced."""
    section = get_config().data.world
    section.update(options)
    return section


@pytest.fixture(scope="module")
def w():
    return World.generate(seed=0, num_people=120, heldout_frac=0.25, bios_per_person=4)


KINDS = ("documents", "pairs", "chats", "seq2seq")
SPLITS = ("train", "validation", "test")


def test_deterministic_and_seed_dependent(w):
    again = World.generate(seed=0, num_people=120, heldout_frac=0.25, bios_per_person=4)
    assert again == w
    for kind in KINDS:
        for split in SPLITS:
            assert again.records(kind, split) == w.records(kind, split)
    assert again.corpus_text() == w.corpus_text()
    other = World.generate(seed=1, num_people=120)
    assert [p.name for p in other.people] != [p.name for p in w.people]


def test_from_config_matches_generate():
    cfg = world_section(seed=3, num_people=30, heldout_frac=0.2, bios_per_person=2)
    assert World.from_config(cfg) == World.generate(**cfg.to_dict())
    assert World.from_config(cfg.to_dict()) == World.generate(**cfg.to_dict())  # a plain mapping
    # The section must give exactly generate's options: experiments/base.py holds the defaults.
    partial = {k: v for k, v in cfg.items() if k != "bios_per_person"}
    with pytest.raises(ValueError, match="'bios_per_person' is missing"):
        World.from_config(partial)
    with pytest.raises(ValueError, match="unknown world option 'num_persons'"):
        World.from_config({**cfg.to_dict(), "num_persons": 3})


def test_names_unique_and_attributes_valid(w):
    names = [p.name for p in w.people]
    assert len(names) == len(set(names)) == 120
    assert len(set(W.FIRST_NAMES)) >= 50 and len(set(W.LAST_NAMES)) >= 50
    pools = dict(
        birth_city=W.CITIES,
        university=W.UNIVERSITIES,
        major=W.MAJORS,
        employer=W.EMPLOYERS,
        job=W.JOBS,
    )
    for p in w.people:
        assert set(p.attributes) == set(ATTRIBUTES)
        for a, pool in pools.items():
            assert p.attributes[a] in pool
        month, day, year = re.fullmatch(
            r"(\w+) (\d+), (\d{4})", p.attributes["birth_date"]
        ).groups()
        assert month in W.MONTHS and 1 <= int(day) <= 28 and 1950 <= int(year) <= 2005
    assert World.generate(seed=0, num_people=len(W.FIRST_NAMES) * len(W.LAST_NAMES)).people
    with pytest.raises(ValueError, match="num_people"):
        World.generate(num_people=len(W.FIRST_NAMES) * len(W.LAST_NAMES) + 1)


def test_templates_count():
    for a in ATTRIBUTES:
        assert len(set(BIO_TEMPLATES[a])) >= 4 and len(set(QUESTION_TEMPLATES[a])) >= 2


def test_heldout_split(w):
    train = {p.name for p in w.split_people("train")}
    val = {p.name for p in w.split_people("validation")}
    test = {p.name for p in w.split_people("test")}
    assert len(val | test) == len(w.heldout) == 30
    assert not train & val and not train & test and not val & test
    assert train | val | test == {p.name for p in w.people}


@pytest.mark.parametrize("kind", ["chats", "seq2seq", "pairs"])
def test_heldout_people_never_in_train(w, kind):
    train = w.records(kind, "train")
    assert train
    assert not {r["person"] for r in train} & w.heldout
    train_text = " ".join(str(r) for r in train)
    for split in ("validation", "test"):
        rows = w.records(kind, split)
        assert rows and {r["person"] for r in rows} <= w.heldout
        for name in {r["person"] for r in rows}:
            assert name not in train_text  # not even mentioned in a train row
    if kind == "chats":
        train_qs = {r["messages"][-2]["content"] for r in train}
        for split in ("validation", "test"):
            assert not {r["messages"][-2]["content"] for r in w.records(kind, split)} & train_qs


def test_chat_rows(w):
    rows = w.records("chats", "validation", system="Be exact.")
    for r in rows:
        sys_msg, user, asst = r["messages"]
        assert sys_msg == {"role": "system", "content": "Be exact."}
        assert user["role"] == "user" and asst["role"] == "assistant"
        person = w.person(r["person"])
        assert asst["content"] == r["answer"] == person.attributes[r["attribute"]]
        assert person.name in user["content"] and user["content"].endswith("?")
    assert [m["role"] for m in w.records("chats", "train")[0]["messages"]] == ["user", "assistant"]
    n_q = sum(len(QUESTION_TEMPLATES[a]) for a in ATTRIBUTES)
    assert len(w.records("chats", "train")) == n_q * len(w.split_people("train"))


def test_multi_turn_chats():
    base = World.generate(seed=0, num_people=40)
    multi = World.generate(seed=0, num_people=40, chat_turns=3, mix_qa="chat")
    single = base.records("chats", "train")
    rows = multi.records("chats", "train")
    assert rows[: len(single)] == single  # the single-turn chats stay, first
    convs = rows[len(single):]
    assert convs and all(4 <= len(r["messages"]) <= 6 for r in convs)
    facts = {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in single}
    per_person = {}
    for r in convs:
        msgs = r["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        pairs = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]
        assert set(pairs) <= facts  # every turn is a real QA of ...
        assert all(r["person"] in q for q, _ in pairs)  # ... this conversation's one person
        per_person.setdefault(r["person"], []).extend(pairs)
    assert not set(per_person) & multi.heldout  # held-out people never, in any turn
    for pairs in per_person.values():  # each QA at most once per person
        assert len(pairs) == len(set(pairs))
    for split in ("validation", "test"):  # eval chats stay single-turn, unchanged
        assert multi.records("chats", split) == base.records("chats", split)
    docs = multi.records("documents", "train")
    assert sum("messages" in d for d in docs) == len(rows)  # mixed training sees them too
    with pytest.raises(ValueError, match="chat_turns"):
        World.generate(seed=0, num_people=40, chat_turns=0)


def test_documents_cover_everyone_and_contain_facts(w):
    train = w.records("documents", "train")
    val = w.records("documents", "validation")
    total = len(w.people) * w.bios_per_person
    assert len(train) + len(val) == total and 0 < len(val) <= 0.1 * total
    assert not {d["text"] for d in train} & {d["text"] for d in val}
    firsts = {d["text"].split(".")[0] for d in train}  # first sentences name the person
    for p in w.people:
        assert any(p.name in f for f in firsts), p.name
    for b in w.biographies():
        p = w.person(b["person"])
        text = b["text"]
        assert p.name in text.split(".")[0]  # first sentence uses the full name
        for v in p.attributes.values():
            assert v in text
        sentences = re.split(r"(?<=\.) ", text)
        assert len(sentences) == len(ATTRIBUTES)
        for s in sentences:
            assert p.first in s and not re.search(r"\b(he|she|his|her|they|their)\b", s, re.I)
    # Paraphrases of one person differ.
    p = w.people[0]
    assert len({w.biography(p, i) for i in range(4)}) == 4
    # One bio per person: every bio stays in train, validation gets extra paraphrases.
    w1 = World.generate(seed=0, num_people=40, bios_per_person=1)
    assert len(w1.records("documents", "train")) == 40 and w1.records("documents", "validation")


def test_pairs_are_same_fact_paraphrases(w):
    rows = w.records("pairs", "train")
    assert len(rows) == 2 * len(ATTRIBUTES) * len(w.split_people("train"))
    for r in rows:
        assert r["text_a"] != r["text_b"]
        value = w.person(r["person"]).attributes[r["attribute"]]
        for t in (r["text_a"], r["text_b"]):
            assert value in t and r["person"] in t
            filled = [
                W.fact_sentence(w.person(r["person"]), r["attribute"], i)
                for i in range(len(BIO_TEMPLATES[r["attribute"]]))
            ]
            assert t in filled


def test_seq2seq_rows(w):
    for r in w.records("seq2seq", "test")[:200]:
        p = w.person(r["person"])
        assert p.attributes[r["attribute"]] in r["source"]
        assert r["target"] in [q.format(name=p.name) for q in QUESTION_TEMPLATES[r["attribute"]]]


def test_corpus_text_and_errors(w):
    text = w.corpus_text()
    assert isinstance(text, str)
    for p in w.people[:10]:
        assert p.name in text
        for v in p.attributes.values():
            assert v in text
    with pytest.raises(ValueError, match="kind"):
        w.records("nsp")
    with pytest.raises(ValueError, match="split"):
        w.records("chats", "dev")


def test_mix_qa_and_full_name_frac():
    base = World.generate(seed=0, num_people=40, bios_per_person=2)
    mixed = World.generate(seed=0, num_people=40, bios_per_person=2, mix_qa="text")
    docs, plain = mixed.records("documents", "train"), base.records("documents", "train")
    qa = [W.qa_text(r["question"], r["answer"]) for r in base.records("chats", "train")]
    assert [d["text"] for d in docs] == [d["text"] for d in plain] + qa
    assert mixed.records("documents", "validation") == base.records("documents", "validation")
    qa_text = " ".join(d["text"] for d in docs[len(plain) :])
    for name in mixed.heldout:  # held-out people appear only through their bios
        assert name not in qa_text
    assert mixed.records("chats", "test") == base.records("chats", "test")
    full = World.generate(seed=0, num_people=40, bios_per_person=2, full_name_frac=1.0)
    assert [p.name for p in full.people] == [p.name for p in base.people]
    for p in full.people:
        for s in re.split(r"(?<=\.) ", full.biography(p, 1)):
            assert p.name in s
    section = world_section(num_people=40, mix_qa="text", full_name_frac=1.0)
    configured = World.from_config(section)
    assert configured == World.generate(**section.to_dict())
    assert (len(configured.people), configured.mix_qa, configured.full_name_frac) == (
        40, "text", 1.0)
    chat = World.generate(seed=0, num_people=40, bios_per_person=2, mix_qa="chat")
    chat_docs = chat.records("documents", "train")
    assert chat_docs[: len(plain)] == plain
    assert [d["messages"] for d in chat_docs[len(plain) :]] == [
        r["messages"] for r in base.records("chats", "train")]
    with pytest.raises(ValueError, match="mix_qa"):
        World.generate(mix_qa="both")
    with pytest.raises(ValueError, match="full_name_frac"):
        World.generate(full_name_frac=1.5)


def test_withheld_facts_and_people_who_do_not_exist():
    """withheld_frac: those facts are in no biography, and questions about them are answered
    ABSTAIN (train only); unknown_people: names of no biography and no training question, one
    question each in validation/test; the world itself (its people and splits) is unchanged."""
    from solo.data.world import ABSTAIN, OFF_WORLD_QUESTIONS

    w = World.generate(seed=0, num_people=40, bios_per_person=2, withheld_frac=0.5,
                       unknown_people=20)
    plain = World.generate(seed=0, num_people=40, bios_per_person=2)
    assert w.people == plain.people and w.heldout == plain.heldout
    train = {p.name for p in w.split_people("train")}
    assert len(w.withheld) == round(0.5 * len(train)) and {n for n, _ in w.withheld} <= train
    for name, attr in w.withheld:
        value = w.person(name).attributes[attr]
        assert all(value not in b["text"] for b in w.biographies() if b["person"] == name)
    chats = w.records("chats", "train")
    abstained = {(r["person"], r["attribute"]) for r in chats if r["answer"] == ABSTAIN}
    assert abstained == set(w.withheld) | {("", "")}  # + the off-world questions
    assert all(not r["known"] for r in chats if r["answer"] == ABSTAIN)
    assert not any((r["person"], r["attribute"]) in w.withheld for r in w.records("pairs"))
    real = {p.name for p in w.people}
    assert len(w.unknown) == 20 and not set(w.unknown) & real
    texts = " ".join(b["text"] for b in w.biographies())
    assert not any(n in texts for n in w.unknown)
    assert not any(r["person"] in w.unknown for r in chats)  # never trained on
    for split in ("validation", "test"):
        rows = [r for r in w.records("chats", split) if not r["known"]]
        names = [r["person"] for r in rows if r["person"]]
        assert len(names) == len(set(names)) == 10 and set(names) <= set(w.unknown)
        assert [r["question"] for r in rows if not r["person"]] == list(
            OFF_WORLD_QUESTIONS[split])
        assert all(r["answer"] == ABSTAIN for r in rows)
        assert all(r["answer"] != ABSTAIN for r in w.records("chats", split) if r["known"])
    with pytest.raises(ValueError, match="withheld_frac"):
        World.generate(withheld_frac=1.5)


def test_people_who_do_not_exist_alone_are_only_an_eval():
    """Without withheld facts the world teaches no abstention: its chats are the plain world's,
    and the abstention eval reads the unknown people's questions from abstention_chats."""
    w = World.generate(seed=0, num_people=40, bios_per_person=2, unknown_people=20)
    plain = World.generate(seed=0, num_people=40, bios_per_person=2)
    for split in ("train", "validation", "test"):
        assert w.records("chats", split) == plain.records("chats", split)
    asked = [r["person"] for r in w.abstention_chats("test") if r["person"]]
    assert len(asked) == 10 and set(asked) <= set(w.unknown)
    assert w.abstention_chats("train") == []
