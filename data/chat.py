"""Chat templates, shared by the SFT pipeline and the agent: solo's own, and a pretrained model's.

`chat_template(tok)` is the one way to get a tokenizer's template: the model's own Jinja template
where its tokenizer carries one (data/templates.py, rendered as `transformers` does), else solo's
(below). Both answer to `encode(messages, add_generation_prompt) -> (ids, weights)`, `stop_ids`,
`reply_prefix` (text generation starts with and a reply drops) and `marker_texts` (control-token
texts a reply is cut at, for the guards).

solo's template:

Sequence = [BOS] + turn_1 + turn_2 + ..., each turn = [ROLE_ID] + tok.encode(content) + [EOT_ID],
an assistant's content after a space (CONTENT_PREFIX): it plays sentencepiece's dummy prefix, which
solo's tokenizers lack, so a reply's first word gets the word-initial pieces it has in running text
(" Florence", as the biographies spell it); decoding removes it again, so a reply reads
"Florence". Loss weights are 1 exactly on assistant content tokens and their EOT (what the model
must emit). Content always goes through `tok.encode`: typed text such as '<|user|>' never becomes
a control id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

from solo.data.tokenizer import (
    ASSISTANT_ID,
    BOS_ID,
    EOS_ID,
    EOT_ID,
    SYSTEM_ID,
    USER_ID,
)

Message = dict  # {'role': 'system'|'user'|'assistant', 'content': str}
CONTENT_PREFIX = " "
ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}
ID_ROLES = {v: k for k, v in ROLE_IDS.items()}


class _Tok(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...


def message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


class SoloChatTemplate:
    """solo's template over its own tokenizer's role ids (module docstring)."""

    stop_ids = (EOT_ID, EOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, BOS_ID)
    reply_prefix = CONTENT_PREFIX
    marker_texts = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "</s>")

    def __init__(self, tok: _Tok):
        self.tok = tok

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool
               ) -> tuple[list[int], list[float]]:
        return _encode_solo(self.tok, messages, add_generation_prompt)

    def reply_text(self, text: str) -> str:
        return content_text(text)


def chat_template(tok):
    """The tokenizer's chat template: its model's own (Jinja) if it has one, else solo's. Built
    once per tokenizer and kept on it (a Jinja template is compiled and probed by rendering)."""
    cached = getattr(tok, "_chat_template_built", None)
    if cached is not None:
        return cached
    if getattr(tok, "chat_template", None):
        from solo.data.templates import JinjaChatTemplate

        cached = JinjaChatTemplate(tok, tok.chat_template)
    else:
        cached = SoloChatTemplate(tok)
    with contextlib.suppress(AttributeError):  # a tokenizer with __slots__ builds it each time
        tok._chat_template_built = cached
    return cached


def encode_chat(
    tok: _Tok, messages: Sequence[Message], *, add_generation_prompt: bool
) -> tuple[list[int], list[float]]:
    """Messages -> (ids, weights) in the tokenizer's chat template (`chat_template`)."""
    return chat_template(tok).encode(messages, add_generation_prompt=add_generation_prompt)


def _encode_solo(
    tok: _Tok, messages: Sequence[Message], add_generation_prompt: bool
) -> tuple[list[int], list[float]]:
    """Messages -> (ids, weights); weights are 1.0 on assistant content + its EOT, else 0."""
    ids, weights = [BOS_ID], [0.0]
    for m in messages:
        role, content = m["role"], m["content"]
        if role not in ROLE_IDS:
            raise ValueError(f"unknown chat role {role!r}; valid roles: {tuple(ROLE_IDS)}")
        if not isinstance(content, str):
            raise TypeError(f"message content must be str, got {type(content).__name__}")
        prefix = CONTENT_PREFIX if role == "assistant" else ""
        body = list(tok.encode(prefix + content)) + [EOT_ID]
        w = 1.0 if role == "assistant" else 0.0
        ids += [ROLE_IDS[role]] + body
        weights += [0.0] + [w] * len(body)
    if add_generation_prompt:
        ids.append(ASSISTANT_ID)
        weights.append(0.0)
    return ids, weights


def split_turns(ids: Sequence[int]) -> list[tuple[str, list[int], bool]]:
    """Parses ids into turns: (role, content ids, closed by EOT). Ids outside a turn are ignored.

    A trailing unterminated turn (e.g. after a generation prompt) is returned with closed=False.
    """
    turns: list[tuple[str, list[int], bool]] = []
    role, body = None, []
    for i in (int(x) for x in ids):
        if i in ID_ROLES:
            if role is not None:  # a role marker without EOT closes the previous turn implicitly
                turns.append((role, body, False))
            role, body = ID_ROLES[i], []
        elif i == EOT_ID:
            if role is not None:
                turns.append((role, body, True))
            role, body = None, []
        elif role is not None:
            body.append(i)
    if role is not None:
        turns.append((role, body, False))
    return turns


def content_text(text: str) -> str:
    """An assistant turn's decoded text without the template's CONTENT_PREFIX."""
    return text.removeprefix(CONTENT_PREFIX)


def decode_chat(tok: _Tok, ids: Sequence[int]) -> list[Message]:
    """Inverse of encode_chat for the turns present in `ids`."""
    return [message(role, content_text(text) if role == "assistant" else text)
            for role, body, _ in split_turns(ids) for text in [tok.decode(body)]]


def truncate_reply(ids: Sequence[int]) -> list[int]:
    """Generated ids up to (excluding) the first EOT / EOS / role marker."""
    out = []
    for i in (int(x) for x in ids):
        if i in (EOT_ID, EOS_ID) or i in ID_ROLES:
            break
        out.append(i)
    return out


def decode_reply(tok: _Tok, ids: Sequence[int]) -> str:
    """Text of a sampled assistant reply: stops at the first EOT/EOS/role id."""
    return content_text(tok.decode(truncate_reply(ids)))


def render(messages: Sequence[Message]) -> str:
    """Human-readable transcript (for logs, not for the model)."""
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)
