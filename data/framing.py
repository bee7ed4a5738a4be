"""How a text becomes a model's input ids: one function per task, shared by the training rows
(data/transforms.py) and serving (agent/sampler.py, agent/scoring.py, agent/endpoints.py), so a
model is served the framing it was trained on.

- `document`: [start] text [end]: LM and MLM documents, contrastive views, embedding inputs.
- `prompt`: [start] text: a decoder's text prompt (a document's open beginning).
- `source`: text [end]: an encoder-decoder's source; its decoder starts at `decoder_start`.

start is the tokenizer's BOS where its documents start with one (`add_bos`), else CLS for a
tokenizer that names a CLS but no BOS (BERT-style, where [CLS] ... [SEP] frames a text); end is
its EOS, else its SEP. A tokenizer with neither gets no token there.
"""

from __future__ import annotations

from collections.abc import Sequence


def start(tok) -> list[int]:
    """The id a document starts with: [BOS] (where add_bos), [CLS] (no BOS named), or []."""
    if tok.bos_id is not None:
        return [tok.bos_id] if getattr(tok, "add_bos", True) else []
    cls_id = getattr(tok, "cls_id", None)
    return [] if cls_id is None else [cls_id]


def end(tok) -> list[int]:
    """The id a document ends with: [EOS], else [SEP], else []."""
    if tok.eos_id is not None:
        return [tok.eos_id]
    sep_id = getattr(tok, "sep_id", None)
    return [] if sep_id is None else [sep_id]


def _ids(tok, text: str | Sequence[int]) -> list[int]:
    return tok.encode(text) if isinstance(text, str) else [int(t) for t in text]


def document(tok, text: str | Sequence[int], max_len: int | None = None) -> list[int]:
    """[start] text [end] (text: a string, or its ids), cut to max_len keeping the end id."""
    tail = end(tok)
    ids = [*start(tok), *_ids(tok, text)]
    if max_len is not None:
        ids = ids[: max(max_len - len(tail), 0)]
    return ids + tail


def prompt(tok, text: str) -> list[int]:
    """A decoder-only model's text prompt: [start] text (the document goes on from there)."""
    return [*start(tok), *tok.encode(text)]


def decoder_start(tok) -> int:
    """An encoder-decoder's first decoder token: BOS (whether or not documents start with it),
    else CLS."""
    first = tok.bos_id if tok.bos_id is not None else getattr(tok, "cls_id", None)
    if first is None or not end(tok):
        raise ValueError(f"{tok!r}: encoder-decoder rows need a BOS (the decoder's start) and "
                         "an EOS; use a tokenizer that has both")
    return first


def source(tok, text: str | Sequence[int], max_len: int | None = None) -> list[int]:
    """An encoder-decoder's source: text [end], cut to max_len keeping the end id."""
    tail = end(tok)
    if not tail:
        raise ValueError(f"{tok!r}: encoder-decoder sources end with EOS; this tokenizer has none")
    ids = _ids(tok, text)
    if max_len is not None:
        ids = ids[: max(max_len - 1, 0)]
    return ids + tail
