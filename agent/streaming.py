"""One generated row, token ids in -> final text out: how every caller ends rows and streams.

`Sampler.generate`, `Sampler.generate_ids` and the server's batching worker all feed the chunks
of ids the decode loop yields into one `RowText` per row, so stop tokens, stop strings, budgets,
held-back text and a chat reply's output guard behave the same everywhere: what is streamed,
answered, counted in usage and kept in the history comes from one decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from solo.agent.guards import GuardDecision, Guards

CONTEXT = 8  # tokens before a piece of text that it is decoded after


def text_after(tokenizer, context: Sequence[int], tokens: Sequence[int],
               before: str | None = None) -> str:
    """The text `tokens` add after `context` (its decode: `before`, if known), decoded together
    (a SentencePiece word piece keeps the leading space its own decode strips); their own
    decode where the context's text does not begin the whole."""
    if context:
        before = tokenizer.decode(list(context)) if before is None else before
        full = tokenizer.decode([*context, *tokens])
        if full.startswith(before):
            return full[len(before):]
    return tokenizer.decode(list(tokens))


@dataclasses.dataclass
class Generation:
    """One row's result. tokens exclude the stop token and end where the text ends (the shortest
    run of them whose text covers it when a stop string or a guard cut it); text is cut before a
    stop string, and guarded where the row had guards (guard: their decision)."""

    tokens: list[int]
    text: str
    finish_reason: str  # 'stop' (stop token, stop string, role marker) | 'length' | 'cancelled'
    prompt_tokens: int
    guard: GuardDecision | None = None


class RowText:
    """Accumulates a row's sampled ids and decides when it is finished, and what its text is.

    A row ends at a stop token (excluded), at `max_new` tokens, or at the first stop string
    (text cut before it). `prefix` (a chat template's content prefix) is dropped from the start
    of the text. With `guards` (agent/guards.py: a chat reply's) the same decision applies the
    output guard: the text ends at the first role-marker text (finish 'stop') or at
    max_output_chars (finish 'length'), and a blocked pattern refuses the reply (its text
    becomes the refusal). With `incremental` the text is decoded after every chunk and `feed`
    returns the part that is final: text that could still be the start of a stop string or a
    marker, or a partial UTF-8 character, is held back until the next chunk decides it, and
    while blocked patterns are set nothing is released before the row ends (a later match
    refuses the whole reply). A row ends as soon as its text decides it. Without it (no
    streaming, no stop strings, no guards) the text is decoded once, in `close`; either way
    the stream (the deltas and close's rest) is exactly the final text.

    `context` (a raw continuation's prompt ids; the newest few are used): the text is what the
    tokens add after them, decoded in context as transformers' text-generation pipeline does,
    so a SentencePiece word piece keeps the leading space a decode of its own strips (Llama 2's
    Metaspace decoder). A chat reply (no context) is its tokens' own decode, as a chat template's
    reply is.
    """

    def __init__(self, tokenizer, max_new: int, stop: Sequence[str] = (),
                 prompt_tokens: int = 0, *, incremental: bool = True, prefix: str = "",
                 guards: Guards | None = None, context: Sequence[int] = ()):
        self.tokenizer, self.max_new, self.prompt_tokens = tokenizer, int(max_new), prompt_tokens
        self.context = [int(t) for t in list(context)[-CONTEXT:]] if tokenizer else []
        self.before = tokenizer.decode(self.context) if self.context else ""
        if self.before.endswith("\ufffd"):  # the prompt ends inside a character: decode alone
            self.context, self.before = [], ""
        self.prefix = prefix  # dropped from the start of the text (a chat template's)
        self.stop = [s for s in stop if s]
        self.guards = guards
        self.markers = list(guards.markers) if guards else []
        self.limit = guards.cfg.max_output_chars if guards else 0
        self.hold_all = bool(guards and guards.cfg.blocked_patterns)
        if (self.stop or guards or incremental) and tokenizer is None:
            raise ValueError("stop strings, guards and streaming need a tokenizer")
        self.incremental = incremental or bool(self.stop) or guards is not None
        self.tokens: list[int] = []
        self.text = ""
        self.settled = 0  # characters of text no later token can change
        self.emitted = 0  # characters of text already returned
        self.ended: str | None = None  # how the tokens ended: 'stop' (stop id), 'length'
        self.finish: str | None = None
        self.stop_token: int | None = None  # the stop id that ended the row, if one did
        self.end: int | None = None  # where the text ended the row (characters), if it did
        self.reasons: list[str] = []  # the output guard's edits
        self.blocked: str | None = None  # the blocked pattern found, if one was

    def feed(self, new_ids: Iterable[int], stop_ids: set[int]) -> str:
        """Adds one chunk of ids (a finished row ignores it); returns the text now final."""
        if self.finish:
            return ""
        for t in new_ids:
            t = int(t)
            if t in stop_ids:
                self.ended, self.stop_token = "stop", t
                break
            self.tokens.append(t)
            if len(self.tokens) >= self.max_new:
                self.ended = "length"
                break
        if not self.incremental:
            self.finish = self.ended
            return ""
        self._settle(final=self.ended is not None)
        return self._release(self.settled if not self.hold_all else 0)

    def _decode(self, tokens: list[int]) -> str:
        text = text_after(self.tokenizer, self.context, tokens, self.before)
        if self.prefix and (text.startswith(self.prefix) or self.prefix.startswith(text)):
            text = text[len(self.prefix):]  # ("" while the text could still be the prefix)
        return text

    def _settle(self, final: bool) -> None:
        """Decides the text from all tokens so far (final: no more will come): cut at the first
        stop string or marker, then at the character limit, then searched for blocked patterns.
        Sets text, settled, reasons, blocked, and finish/end where the text ends the row."""
        text, finish, end, reasons = self._decode(self.tokens), None, None, []
        hits = [(text.find(s), s in self.stop) for s in [*self.stop, *self.markers] if s in text]
        if hits:
            end, is_stop = min(hits)
            text, finish, final = text[:end], "stop", True
            reasons = [] if is_stop else ["role_marker_text"]
        settled = len(text) if final else len(text) - self._stop_prefix(text)
        while not final and settled > 0 and text[settled - 1] == "\ufffd":  # partial UTF-8
            settled -= 1
        if self.limit and settled > self.limit:  # nothing later can cut it before the limit
            text, finish, end, settled = text[: self.limit], "length", self.limit, self.limit
            reasons, final = ["too_long"], True  # (a marker past the limit cut nothing)
        self.blocked = None
        if self.hold_all:
            match = self.guards.blocked_match(text[:settled], partial=not final)
            if match is not None:  # the reply is refused: the row ends at the match
                self.blocked, at = match
                text, settled, finish, end = text[:at], at, "stop", at
        self.text, self.settled, self.reasons = text, settled, reasons
        self.end = end
        if end is not None or final:
            self.finish = finish or self.ended or "length"

    def _release(self, safe: int) -> str:
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # partial UTF-8
            safe -= 1
        if safe <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:safe], safe
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of text that is a proper prefix of a stop string or marker."""
        cuts = [*self.stop, *self.markers]
        for k in range(min(len(text), max(map(len, cuts), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in cuts):
                return k
        return 0

    def _trim(self, end: int) -> None:
        """Keeps the shortest run of tokens whose text covers text[:end] (usage, log-probs and
        history count the tokens of the text returned, not those sampled past its end)."""
        target, k = self.text[:end], len(self.tokens)
        while k > 0 and self._decode(self.tokens[: k - 1]).startswith(target):
            k -= 1
        self.tokens, self.stop_token = self.tokens[:k], None

    def close(self, reason: str = "length") -> tuple[Generation, str]:
        """Ends the row (with `reason` unless it already finished): its Generation and the text
        `feed` has not returned yet."""
        self.ended = self.ended or self.finish or reason
        if self.tokenizer is not None:
            self._settle(final=True)
        else:
            self.text = ""
        self.finish = self.finish or self.ended
        if self.end is not None:
            self._trim(self.end)
        decision = None
        if self.guards is not None:
            decision = self.guards.output_decision(self.text, self.reasons, self.blocked)
            self.text = decision.text
        rest, self.emitted = self.text[self.emitted:], len(self.text)
        gen = Generation(self.tokens, self.text, self.finish, self.prompt_tokens, decision)
        return gen, rest
