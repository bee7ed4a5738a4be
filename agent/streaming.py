"""One generated row, token ids in -> final text out: how every caller ends rows and streams.

`Sampler.generate`, `Sampler.generate_ids` and the server's batching worker all feed the chunks
of ids the decode loop yields into one `RowText` per row, so stop tokens, stop strings, budgets
and held-back text behave the same everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence


@dataclasses.dataclass
class Generation:
    """One row's result. tokens exclude the stop token; text is cut before a stop string."""

    tokens: list[int]
    text: str
    finish_reason: str  # 'stop' (stop token or string) | 'length' | 'cancelled'
    prompt_tokens: int


class RowText:
    """Accumulates a row's sampled ids and decides when it is finished.

    A row ends at a stop token (excluded), at `max_new` tokens, or at the first stop string
    (text cut before it). `prefix` (a chat template's content prefix) is dropped from the start
    of the text. With `incremental` the text is decoded after every chunk and `feed`
    returns the part that is final: text that could still be the start of a stop string, or a
    partial UTF-8 character, is held back until the next chunk decides it. Without it (no
    streaming, no stop strings) the text is decoded once, in `close`.
    """

    def __init__(self, tokenizer, max_new: int, stop: Sequence[str] = (),
                 prompt_tokens: int = 0, *, incremental: bool = True, prefix: str = ""):
        self.tokenizer, self.max_new, self.prompt_tokens = tokenizer, int(max_new), prompt_tokens
        self.prefix = prefix  # dropped from the start of the text (a chat template's)
        self.stop = [s for s in stop if s]
        if (self.stop or incremental) and tokenizer is None:
            raise ValueError("stop strings and streaming need a tokenizer")
        self.incremental = incremental or bool(self.stop)
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of text already returned
        self.finish: str | None = None
        self.stop_token: int | None = None  # the stop id that ended the row, if one did

    def feed(self, new_ids: Iterable[int], stop_ids: set[int]) -> str:
        """Adds one chunk of ids (a finished row ignores it); returns the text now final."""
        if self.finish:
            return ""
        for t in new_ids:
            t = int(t)
            if t in stop_ids:
                self.finish, self.stop_token = "stop", t
                break
            self.tokens.append(t)
            if len(self.tokens) >= self.max_new:
                self.finish = "length"
                break
        if not self.incremental:
            return ""
        text = self._decode()
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        self.text = text
        safe = len(text) if self.finish else len(text) - self._stop_prefix(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # partial UTF-8 character
            safe -= 1
        if safe <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:safe], safe
        return delta

    def _decode(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        if self.prefix and (text.startswith(self.prefix) or self.prefix.startswith(text)):
            text = text[len(self.prefix):]  # ("" while the text could still be the prefix)
        return text

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of text that is a proper prefix of a stop string."""
        for k in range(min(len(text), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def close(self, reason: str = "length") -> tuple[Generation, str]:
        """Ends the row (with `reason` unless it already finished): its Generation and the text
        `feed` has not returned yet."""
        self.finish = self.finish or reason
        if not self.incremental:
            self.text = self._decode() if self.tokenizer else ""
        rest, self.emitted = self.text[self.emitted:], len(self.text)
        return Generation(self.tokens, self.text, self.finish, self.prompt_tokens), rest
