"""Log-probabilities in OpenAI's two response shapes, from `Scorer` rows (agent/scoring.py).

Text completions (legacy): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry
per token from `start`; chat completions: {"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}. A token's string is the text it adds after the tokens before it
(decoded in context, so a SentencePiece word piece keeps its leading space; a token that adds no
text, such as a special token, is named by its vocabulary piece); text_offset[t] is where token t
starts in the choice's `text`.
"""

from __future__ import annotations

from collections.abc import Sequence

from solo.agent.scoring import TokenScores
from solo.agent.streaming import CONTEXT, text_after


def piece(tok, ids: Sequence[int], t: int, token: int | None = None) -> str:
    """The text `token` (default ids[t]) adds after ids[:t]; a token that adds none (a special
    token, part of a multi-byte character) is named by its vocabulary piece ("</s>", "<0xE2>")."""
    token = ids[t] if token is None else token
    text = text_after(tok, ids[max(0, t - CONTEXT):t], [token])
    return text or tok.id_to_piece(token)


def completion_logprobs(tok, s: TokenScores, start: int, offset0: int = 0) -> dict:
    """Legacy /v1/completions logprobs for tokens start.. of a scored row. offset0: where
    token `start` begins in the choice's text."""
    tokens, lps, tops, offsets = [], [], [], []
    text = tok.decode(list(s.ids[:start]))
    for t in range(start, len(s.ids)):
        tokens.append(piece(tok, s.ids, t))
        offsets.append(offset0 + max(0, len(tok.decode(list(s.ids[:t]))) - len(text)))
        lps.append(s.logprobs[t])
        if s.top[t] is None:
            tops.append(None)
        else:
            top: dict[str, float] = {}
            for i, lp in s.top[t]:
                top.setdefault(piece(tok, s.ids, t, i), lp)
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok, s: TokenScores, start: int) -> dict:
    """Chat-completions logprobs ({"content": [...]}) for tokens start.. of a scored row."""

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for t in range(start, len(s.ids)):
        e = entry(piece(tok, s.ids, t), s.logprobs[t])
        e["top_logprobs"] = [entry(piece(tok, s.ids, t, i), lp) for i, lp in (s.top[t] or [])]
        content.append(e)
    return {"content": content}
