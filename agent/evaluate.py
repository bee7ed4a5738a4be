"""Held-out question answering accuracy, abstention and demo transcripts, through the REPL's
ChatSession path; and `solo eval` (eval_command): metrics on any data, QA on any JSONL of
question/answer pairs, results written beside the checkpoint.

Each question is asked in a fresh session (same template, guards, sampling and stop ids as
`solo chat`); the reply is compared with the world's answer by exact match after normalising
case, whitespace and trailing punctuation. A world with unknown_people also asks about people
who do not exist (and off-world questions): the share answered "I don't know." is the
abstention rate; the share of real held-out questions answered so is reported beside it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from solo.agent.chat import ChatSession, build_session

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding whitespace and trailing punctuation."""
    text = _WS.sub(" ", text.strip().lower())
    return text.rstrip(" .!?,;:'\"").strip()


def heldout_questions(config, split: str = "test", limit: int = 0, *,
                      known: bool = True) -> list[dict]:
    """The world's held-out chat questions: dicts with 'question', 'answer' (+ person, ...);
    known=False: the questions about people who do not exist and off-world ones."""
    from solo.data.world import World  # local: only chat experiments need the world

    world = World.from_config(config.data.world)
    if known:
        rows = [r for r in world.records("chats", split) if r["known"]]
    else:
        rows = world.abstention_chats(split)
    return rows[:limit] if limit else rows


def heldout_accuracy(loaded, questions: Sequence[dict] | None = None, *, split: str = "test",
                     limit: int | None = None, session: ChatSession | None = None,
                     num_examples: int = 5) -> dict:
    """Exact-match accuracy of replies on held-out questions.

    questions: dicts with 'question' and 'answer' (default: world records('chats', split),
    first config.agent.eval_questions of them, 0 = all). Returns dict(accuracy, correct, n,
    examples=[dict(question, answer, reply, correct)] (first num_examples)).
    """
    if questions is None:
        if limit is None:
            limit = loaded.config.agent.eval_questions
        questions = heldout_questions(loaded.config, split, limit)
    elif limit:
        questions = list(questions)[:limit]
    session = session or build_session(loaded)
    correct, examples = 0, []
    for q in questions:
        session.reset()
        reply = session.reply(q["question"])
        ok = normalize(reply) == normalize(q["answer"])
        correct += ok
        if len(examples) < num_examples:
            examples.append(dict(question=q["question"], answer=q["answer"], reply=reply,
                                 correct=ok))
    n = len(questions)
    return dict(accuracy=correct / n if n else 0.0, correct=correct, n=n, examples=examples)


def transcript(loaded_or_session, user_turns: Sequence[str] | None = None) -> str:
    """A short multi-turn demo chat rendered as text (default: three held-out questions)."""
    session = (loaded_or_session if isinstance(loaded_or_session, ChatSession)
               else build_session(loaded_or_session))
    if user_turns is None:
        user_turns = [q["question"] for q in heldout_questions(loaded_or_session.config,
                                                               "test", 3)]
    session.reset()
    lines = [f"[system] {session.system_prompt}"] if session.system_prompt else []
    for text in user_turns:
        lines.append(f"[user] {text}")
        lines.append(f"[assistant] {session.reply(text)}")
    lines.append(f"[stats] {session.describe_stats()}")
    return "\n".join(lines)


def abstention(loaded, *, split: str = "test", session: ChatSession | None = None) -> dict:
    """Share of replies that abstain ("I don't know."): on questions no fact answers (unknown
    people, off-world questions; the rate to maximise) and on real held-out questions (the
    false abstentions). n is 0 for a world without unknown_people."""
    from solo.data.world import ABSTAIN

    session = session or build_session(loaded)
    out = {}
    for name, known in (("abstain", False), ("false_abstain", True)):
        rows = heldout_questions(loaded.config, split, known=known)
        hits = 0
        for q in rows:
            session.reset()
            hits += normalize(session.reply(q["question"])) == normalize(ABSTAIN)
        out[name] = dict(rate=hits / len(rows) if rows else 0.0, hits=hits, n=len(rows))
    return out


def heldout_report(workdir: str, checkpoint: str | int = "latest") -> str:
    """`solo eval` / end of `solo train` on chat experiments: accuracy line (+ abstention) and a
    short transcript."""
    from solo.train.inference import load

    loaded = load(workdir, checkpoint)
    session = build_session(loaded)
    res = heldout_accuracy(loaded, session=session)
    lines = [f"heldout exact-match accuracy: {res['accuracy']:.3f} "
             f"({res['correct']}/{res['n']} questions, chat path)"]
    if loaded.config.data.world["unknown_people"]:
        lines.append(abstention_line(abstention(loaded, session=session)))
    lines += example_lines(res)
    lines.append(transcript(session, [ex["question"] for ex in res["examples"][:2]]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- solo eval


def qa_file(path: str) -> list[dict]:
    """Question/answer pairs from a JSONL file: one {"question": ..., "answer": ...} per line
    (a bad line is a one-line error naming it)."""
    from solo.data.sources import SourceError, expand_paths, read_jsonl

    if not path.endswith(".jsonl"):
        raise SourceError(f"--qa {path}: expected a .jsonl file of {{\"question\", \"answer\"}} "
                          "lines")
    rows = []
    for p in expand_paths(path):
        for rec in read_jsonl(p, "chats", "", "question", "answer"):
            user, assistant = rec["messages"]
            rows.append(dict(question=user["content"], answer=assistant["content"]))
    return rows


def world_qa(config) -> bool:
    """Whether a run (with its data, as overridden) gets the world's held-out questions by
    default: a chat model of the synthetic world (data/tasks.chat_eval)."""
    from solo.data.tasks import chat_eval

    return chat_eval(config.data)


def abstention_line(ab: dict) -> str:
    """The report line of `abstention(...)`'s two rates."""
    a, f = ab["abstain"], ab["false_abstain"]
    return (f"abstention on questions no fact answers: {a['rate']:.3f} ({a['hits']}/{a['n']}); "
            f"on held-out questions: {f['rate']:.3f} ({f['hits']}/{f['n']})")


def example_lines(res: dict) -> list[str]:
    """One report line per example question of an exact-match result, marked right or wrong."""
    return [f"  [{'ok ' if ex['correct'] else 'bad'}] Q: {ex['question']}  "
            f"A: {ex['reply']!r}  (want {ex['answer']!r})" for ex in res["examples"]]


def eval_command(workdir: str, checkpoint: str | int = "latest", *,
                 overrides: Sequence[str] = (), splits: Sequence[str] = ("validation",),
                 qa: str = "", name: str = "") -> tuple[str, str]:
    """`solo eval`: every objective's metrics (and perplexity, bits per byte) of a checkpoint on
    its own or overridden data (train/eval_data.py), and QA exact match through the chat path on
    `qa` (a JSONL of question/answer pairs; default: the world's held-out questions for a world
    chat run, none otherwise; 'none': skip). Writes everything to
    WORKDIR/eval/step_N/<name>.json atomically; returns (report text, that path)."""
    import json
    import os

    from solo import files, multihost
    from solo.train import eval_data
    from solo.train.inference import load
    from solo.train.workdir import read_config

    config = eval_data.eval_config(read_config(workdir), overrides)  # bad overrides first
    questions, qa_source = None, ""
    if qa and qa != "none":
        questions, qa_source = qa_file(qa), qa
    for split in eval_data.check_splits(splits):  # a missing file: one line, before loading
        eval_data.check_data(config, split)
    loaded = load(workdir, checkpoint)
    loaded.config = config
    result = dict(workdir=os.path.abspath(workdir), step=loaded.step, checkpoint=str(checkpoint),
                  overrides=list(overrides), source=config.data.source, task=config.data.task,
                  splits=list(splits))
    result.update(eval_data.evaluate_data(loaded, config, splits))
    m = result["metrics"]
    lines = [f"eval step={loaded.step} on {config.data.source} ({config.data.task}, "
             f"{'+'.join(splits)}): " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()))]
    if "bits_per_byte" in result:
        lines.append(f"bits per byte: {result['bits_per_byte']:.4f} ({result['tokens']} tokens, "
                     f"{result['bytes']} bytes)")
    if questions is None and qa != "none" and world_qa(config):
        questions, qa_source = heldout_questions(config, "test",
                                                 config.agent.eval_questions), "world:test"
    if questions is not None:
        if loaded.model.cfg.kind == "encoder":
            raise ValueError(f"--qa: {workdir} is an encoder model; QA exact match needs a "
                             "decoder (chat path)")
        session = build_session(loaded)
        res = heldout_accuracy(loaded, questions, session=session)
        result["qa"] = dict(source=qa_source, **res)
        lines.append(f"QA exact match on {qa_source}: {res['accuracy']:.3f} "
                     f"({res['correct']}/{res['n']} questions, chat path)")
        if qa_source == "world:test" and config.data.world["unknown_people"]:
            ab = abstention(loaded, session=session)
            result["qa"]["abstention"] = ab
            lines.append(abstention_line(ab))
        lines += example_lines(res)
        if qa_source == "world:test":  # a short multi-turn demo, as at the end of training
            lines.append(transcript(session, [ex["question"] for ex in res["examples"][:2]]))
    if not name:
        name = eval_data.result_name(config, splits, bool(overrides))
        if qa and qa != "none":
            name += "+qa-" + os.path.splitext(os.path.basename(qa))[0]
    path = files.join(workdir, "eval", f"step_{loaded.step}",
                      name if name.endswith(".json") else name + ".json")
    if multihost.is_primary():  # every process scored the same data; one writes
        files.path(path).parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    lines.append(f"written to {path}")
    return "\n".join(lines), path
