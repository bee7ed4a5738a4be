"""Embedded synthetic world of people (offline, deterministic from a seed).

Each person has a unique full name and six attributes. The corpus follows the knowledge-storage
setup of "Physics of Language Models 3.1": several differently-paraphrased biographies per person
(the augmentation that makes facts extractable), question/answer chats whose held-out people are
never trained on, same-fact paraphrase pairs, and fact -> question seq2seq rows.

Splits: people are split once into train / held-out (validation half + test half). Documents cover
every person (held-out people's facts are learned from their bios only); chats and seq2seq rows
for held-out people exist only in 'validation' / 'test'. Sentences never use pronouns, so every
sentence names its person (full or first name) and states one fact.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import random

from solo.data.world_text import (  # noqa: F401  (re-exported: the world's vocabulary)
    ABSTAIN,
    ATTRIBUTES,
    BIO_TEMPLATES,
    CITIES,
    DEFAULT_SYSTEM,
    EMPLOYERS,
    FIRST_NAMES,
    JOBS,
    LAST_NAMES,
    MAJORS,
    MIX_QA,
    MONTHS,
    OFF_WORLD_QUESTIONS,
    QUESTION_TEMPLATES,
    UNIVERSITIES,
    VALIDATION_DOC_FRAC,
    Person,
    fact_sentence,
    qa_text,
    question,
)


@dataclasses.dataclass(frozen=True)
class World:
    seed: int
    people: tuple[Person, ...]
    heldout: frozenset[str]  # names of held-out people (validation + test)
    test_people: frozenset[str]  # the held-out half used for split 'test'
    bios_per_person: int = 5
    # Chance that a bio sentence after the first names its person in full (else first name only).
    full_name_frac: float = 0.5
    # documents 'train' also hold the train people's questions and answers ("mixed training"):
    # '' no, 'text' as 'question answer' texts, 'chat' as chat records in the SFT template.
    mix_qa: str = ""
    # > 1: the train split's chats also hold conversations of this many turns about one person
    # (the single-turn chats stay): a reply then ends at its own end-of-turn in a multi-turn
    # context instead of running on.
    chat_turns: int = 1
    # Knowing what it does not know. (person, attribute) facts no biography states: the train
    # split's questions about them are answered ABSTAIN (with a few off-world questions), so the
    # model learns to abstain where its memory holds no fact, for names it has seen answered
    # questions about as well. People who do NOT exist (no biography, no question in training):
    # evaluation only, half in 'validation', half in 'test', with off-world questions.
    withheld: frozenset[tuple[str, str]] = frozenset()
    unknown: tuple[str, ...] = ()
    unknown_test: frozenset[str] = frozenset()

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        num_people: int = 200,
        heldout_frac: float = 0.25,
        bios_per_person: int = 5,
        full_name_frac: float = 0.5,
        mix_qa: str = "",
        chat_turns: int = 1,
        withheld_frac: float = 0.0,
        unknown_people: int = 0,
    ) -> World:
        cls.check_options(num_people=num_people, heldout_frac=heldout_frac,
                          bios_per_person=bios_per_person, full_name_frac=full_name_frac,
                          mix_qa=mix_qa, chat_turns=chat_turns, withheld_frac=withheld_frac,
                          unknown_people=unknown_people)
        max_people = len(FIRST_NAMES) * len(LAST_NAMES)
        rng = random.Random(f"world:{seed}:people")
        people = []
        chosen = rng.sample(range(max_people), num_people)
        for k in chosen:
            first, last = FIRST_NAMES[k // len(LAST_NAMES)], LAST_NAMES[k % len(LAST_NAMES)]
            attrs = {
                "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, "
                f"{rng.randint(1950, 2005)}",
                "birth_city": rng.choice(CITIES),
                "university": rng.choice(UNIVERSITIES),
                "major": rng.choice(MAJORS),
                "employer": rng.choice(EMPLOYERS),
                "job": rng.choice(JOBS),
            }
            people.append(Person(first, last, attrs))
        n_held = round(heldout_frac * num_people)
        held = random.Random(f"world:{seed}:heldout").sample(people, n_held)
        # people who do not exist: other name pairs (a separate draw: the world itself is the
        # same with or without them)
        taken = set(chosen)
        unknown_rng = random.Random(f"world:{seed}:unknown")
        unknown = [FIRST_NAMES[k // len(LAST_NAMES)] + " " + LAST_NAMES[k % len(LAST_NAMES)]
                   for k in unknown_rng.sample([k for k in range(max_people) if k not in taken],
                                               unknown_people)]
        train = [p for p in people if p not in held]
        w_rng = random.Random(f"world:{seed}:withheld")
        withheld = {(p.name, w_rng.choice(ATTRIBUTES))
                    for p in w_rng.sample(train, round(withheld_frac * len(train)))}
        return cls(
            seed=seed,
            people=tuple(people),
            heldout=frozenset(p.name for p in held),
            test_people=frozenset(p.name for p in held[(n_held + 1) // 2 :]),
            bios_per_person=bios_per_person,
            full_name_frac=full_name_frac,
            mix_qa=mix_qa,
            chat_turns=chat_turns,
            withheld=frozenset(withheld),
            unknown=tuple(unknown),
            unknown_test=frozenset(unknown[(len(unknown) + 1) // 2:]),
        )

    @staticmethod
    def check_options(*, num_people: int, heldout_frac: float, bios_per_person: int,
                      full_name_frac: float, mix_qa: str, chat_turns: int,
                      withheld_frac: float, unknown_people: int) -> None:
        """ValueError naming the first invalid option (generate's own checks, run early)."""
        max_people = len(FIRST_NAMES) * len(LAST_NAMES)
        if not 0 < num_people <= max_people:
            raise ValueError(f"num_people must be in [1, {max_people}], got {num_people}")
        if not 0.0 <= withheld_frac <= 1.0:
            raise ValueError(f"withheld_frac must be in [0, 1], got {withheld_frac}")
        if not 0 <= unknown_people <= max_people - num_people:
            raise ValueError(f"unknown_people must be in [0, {max_people - num_people}] (names "
                             f"left after num_people), got {unknown_people}")
        if not 0.0 <= heldout_frac < 1.0:
            raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
        if bios_per_person < 1:
            raise ValueError(f"bios_per_person must be >= 1, got {bios_per_person}")
        if not 0.0 <= full_name_frac <= 1.0:
            raise ValueError(f"full_name_frac must be in [0, 1], got {full_name_frac}")
        if mix_qa not in MIX_QA:
            raise ValueError(f"mix_qa must be one of {MIX_QA}, got {mix_qa!r}")
        if chat_turns < 1:
            raise ValueError(f"chat_turns must be >= 1, got {chat_turns}")

    @classmethod
    def from_config(cls, cfg) -> World:
        """From a `data.world` section (ConfigDict or mapping) with every option."""
        return cls.generate(**cls.config_options(cfg))

    @classmethod
    def config_options(cls, cfg) -> dict:
        """`generate`'s keyword arguments from a config section: its signature is the one list
        of options, and the section must give exactly those (defaults live in
        experiments/base.py). Values must have the type of the signature's example value (an int
        where a float is expected is taken as that float); the values are checked too."""
        values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        params = inspect.signature(cls.generate).parameters
        unknown = sorted(set(values) - set(params))
        if unknown:
            raise ValueError(f"unknown world option {unknown[0]!r}; options: {', '.join(params)}")
        missing = [k for k in params if k not in values]
        if missing:
            raise ValueError(f"world option {missing[0]!r} is missing (experiments/base.py "
                             "lists every option)")
        out = {}
        for k, p in params.items():
            kind, v = type(p.default), values[k]
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or isinstance(v, bool) != (kind is bool):
                raise ValueError(f"world option {k}={v!r} must be {kind.__name__}")
            out[k] = v
        cls.check_options(**{k: v for k, v in out.items() if k != "seed"})
        return out

    # --- people and splits ---------------------------------------------------------------------

    @functools.cached_property
    def _by_name(self) -> dict[str, Person]:
        return {p.name: p for p in self.people}

    def person(self, name: str) -> Person:
        return self._by_name[name]

    def split_people(self, split: str) -> list[Person]:
        """'train': not held out; 'validation'/'test': the two halves of the held-out people."""
        if split == "train":
            return [p for p in self.people if p.name not in self.heldout]
        if split == "validation":
            return [
                p for p in self.people if p.name in self.heldout and p.name not in self.test_people
            ]
        if split == "test":
            return [p for p in self.people if p.name in self.test_people]
        raise ValueError(f"unknown split {split!r}; valid: 'train', 'validation', 'test'")

    def split_unknown(self, split: str) -> list[str]:
        """Names of people who do not exist: none in 'train' (evaluation only)."""
        if split == "train":
            return []
        test = split == "test"
        return [n for n in self.unknown if (n in self.unknown_test) == test]

    def unknown_qa(self, split: str) -> list[tuple[str, str, str]]:
        """(name, attribute, question) no fact answers, beyond the withheld facts: one question
        about each non-existent person of the split, then the split's off-world questions (name
        and attribute ''), those of 'train' where facts are withheld, those of 'validation' and
        'test' where there are non-existent people."""
        rows = []
        for name in self.split_unknown(split):  # one question each
            rng = random.Random(f"world:{self.seed}:unknownq:{name}")
            a = rng.choice(ATTRIBUTES)
            t = rng.randrange(len(QUESTION_TEMPLATES[a]))
            rows.append((name, a, QUESTION_TEMPLATES[a][t].format(name=name)))
        if self.withheld if split == "train" else self.unknown:
            rows += [("", "", q) for q in OFF_WORLD_QUESTIONS[split]]
        return rows

    def abstention_chats(self, split: str, system: str | None = None) -> list[dict]:
        """Chats answered ABSTAIN beyond the withheld facts (unknown_qa): the abstention eval
        reads them in every world; a world with withheld facts trains on them too."""
        head = [dict(role="system", content=system)] if system else []
        return [dict(messages=head + [dict(role="user", content=q),
                                      dict(role="assistant", content=ABSTAIN)],
                     person=name, attribute=a, question=q, answer=ABSTAIN, known=False)
                for name, a, q in self.unknown_qa(split)]

    # --- text ----------------------------------------------------------------------------------

    def biography(self, person: Person, index: int) -> str:
        """The `index`-th paraphrase of a person's biography (deterministic)."""
        rng = random.Random(f"world:{self.seed}:bio:{person.name}:{index}")
        order = list(ATTRIBUTES)
        rng.shuffle(order)
        sentences = []
        for j, attr in enumerate(order):
            name = person.name if j == 0 or rng.random() < self.full_name_frac else person.first
            t = rng.randrange(len(BIO_TEMPLATES[attr]))
            if (person.name, attr) not in self.withheld:
                if not sentences:
                    name = person.name  # the first sentence names the person in full
                sentences.append(fact_sentence(person, attr, t, name=name))
        return " ".join(sentences)

    def biographies(self, num_per_person: int | None = None) -> list[dict]:
        """[{'person', 'index', 'text'}], person-major, `num_per_person` paraphrases each."""
        n = self.bios_per_person if num_per_person is None else num_per_person
        return [
            dict(person=p.name, index=i, text=self.biography(p, i))
            for p in self.people
            for i in range(n)
        ]

    def _validation_docs(self) -> set[tuple[str, int]]:
        """~5% of (person, bio index) held out for LM validation, never a person's bio 0."""
        n = self.bios_per_person
        if n == 1:  # keep every bio in train; validation gets an extra paraphrase (index 1)
            k = max(1, round(VALIDATION_DOC_FRAC * len(self.people)))
            chosen = random.Random(f"world:{self.seed}:valdocs").sample(self.people, k)
            return {(p.name, 1) for p in chosen}
        cands = [(p.name, i) for p in self.people for i in range(1, n)]
        k = max(1, round(VALIDATION_DOC_FRAC * len(self.people) * n))
        return set(random.Random(f"world:{self.seed}:valdocs").sample(cands, min(k, len(cands))))

    def qa(self, people: list[Person]) -> list[tuple[Person, str, str, str]]:
        """(person, attribute, question, answer) for every question template; a withheld fact's
        answer is ABSTAIN."""
        return [
            (p, a, QUESTION_TEMPLATES[a][t].format(name=p.name),
             ABSTAIN if (p.name, a) in self.withheld else p.attributes[a])
            for p in people
            for a in ATTRIBUTES
            for t in range(len(QUESTION_TEMPLATES[a]))
        ]

    def records(self, kind: str, split: str = "train", **opts) -> list[dict]:
        """Rows for one task. kinds: 'documents', 'pairs', 'chats', 'seq2seq'.

        opts: documents: num_per_person (mix_qa='text'|'chat' appends each train person's
        question and answer to 'train', as a 'question answer' text or a chat record);
        pairs: num_per_fact (default 2);
        chats: system (str or None = no system message, default None); with chat_turns > 1
        the train split also holds multi-turn conversations (one person each).
        documents 'test' = the 'validation' documents (all people's facts are in train anyway).
        """
        if split not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {split!r}; valid: 'train', 'validation', 'test'")
        if kind == "documents":
            return self._documents(split, **opts)
        if kind == "pairs":
            return self._pairs(split, **opts)
        if kind == "chats":
            return self._chats(split, **opts)
        if kind == "seq2seq":
            return self._seq2seq(split)
        raise ValueError(
            f"unknown record kind {kind!r}; valid: 'documents', 'pairs', 'chats', 'seq2seq'"
        )

    def _documents(self, split: str, num_per_person: int | None = None) -> list[dict]:
        world = (
            self
            if num_per_person is None
            else dataclasses.replace(self, bios_per_person=num_per_person)
        )
        val = world._validation_docs()
        if split == "train":
            docs = [
                dict(text=b["text"])
                for b in world.biographies()
                if (b["person"], b["index"]) not in val
            ]
            # Mixed training (PoLM 3.1): train people's QA as text teaches extraction during
            # pretraining; held-out people's questions stay out (their facts come from bios only).
            if self.mix_qa == "text":
                docs += [
                    dict(text=qa_text(q, ans))
                    for _, _, q, ans in self.qa(self.split_people("train"))
                ]
                docs += [dict(text=qa_text(q, ABSTAIN)) for _, _, q in self.unknown_qa("train")]
            elif self.mix_qa == "chat":  # the SFT chats themselves, as LM documents
                docs += [dict(messages=r["messages"]) for r in self._chats("train")]
            return docs
        return [dict(text=world.biography(world.person(name), i)) for name, i in sorted(val)]

    def _pairs(self, split: str, num_per_fact: int = 2) -> list[dict]:
        # Facts of train people train; held-out people's facts are the eval pairs.
        rows = []
        for p in self.split_people(split):
            for a in ATTRIBUTES:
                if (p.name, a) in self.withheld:  # a fact the world never states
                    continue
                rng = random.Random(f"world:{self.seed}:pair:{p.name}:{a}")
                n_t = len(BIO_TEMPLATES[a])
                combos = [(i, j) for i in range(n_t) for j in range(n_t) if i != j]
                for i, j in rng.sample(combos, min(num_per_fact, len(combos))):
                    rows.append(
                        dict(
                            text_a=fact_sentence(p, a, i),
                            text_b=fact_sentence(p, a, j),
                            person=p.name,
                            attribute=a,
                            group=f"{p.name}/{a}",  # this fact's other pairs are positives too
                        )
                    )
        return rows

    def _chats(self, split: str, system: str | None = None) -> list[dict]:
        head = [dict(role="system", content=system)] if system else []
        turn = lambda q, ans: [dict(role="user", content=q),
                               dict(role="assistant", content=ans)]
        qa = self.qa(self.split_people(split))
        rows = [dict(messages=head + turn(q, ans), person=p.name, attribute=a, question=q,
                     answer=ans, known=ans != ABSTAIN) for p, a, q, ans in qa]
        if self.withheld:  # a world that teaches abstention: its chats hold all of it
            rows += self.abstention_chats(split, system)
        if split == "train" and self.chat_turns > 1:  # + conversations: shuffled QAs, in groups
            by_person: dict[str, list] = {}
            for row in qa:
                by_person.setdefault(row[0].name, []).append(row)
            for name, rows_p in by_person.items():
                random.Random(f"world:{self.seed}:turns:{name}").shuffle(rows_p)
                for i in range(0, len(rows_p) - 1, self.chat_turns):
                    group = rows_p[i : i + self.chat_turns]
                    msgs = head + [m for _, _, q, ans in group for m in turn(q, ans)]
                    rows.append(dict(messages=msgs, person=name,
                                     attribute=",".join(a for _, a, _, _ in group),
                                     question=group[0][2], answer=group[0][3], known=True))
        return rows

    def _seq2seq(self, split: str) -> list[dict]:
        return [
            dict(source=fact_sentence(p, a, t), target=q, person=p.name, attribute=a)
            for p, a, q, ans in self.qa(self.split_people(split)) if ans != ABSTAIN
            for t in range(len(BIO_TEMPLATES[a]))
        ]

    def corpus_text(self) -> str:
        """All text worth training a tokenizer on: bios, questions, answers (newline-separated)."""
        parts = [b["text"] for b in self.biographies()]
        parts += [f"{q}\n{ans}" for _, _, q, ans in self.qa(list(self.people))]
        parts += [f"{q}\n{ABSTAIN}" for s in ("train", "validation", "test")
                  for _, _, q in self.unknown_qa(s)]
        parts += [DEFAULT_SYSTEM]
        return "\n".join(parts)
