"""SentencePiece tokenizer with fixed special ids and exact UTF-8 round trip.

Special ids 0..9 are fixed (see constants). They are sentencepiece *control* symbols, so encoding
their text ('<|user|>', '<pad>', ...) yields ordinary pieces, never the control id.

`vocab_size` is the TOTAL size of the vocabulary, including the 10 special pieces and the 256
byte-fallback pieces (<0x00>..<0xFF>, ids 10..265) that make any UTF-8 text encodable:
- kind='bpe' / 'unigram': exact total size; must be >= 266 + the distinct characters of the corpus
  (sentencepiece's "required chars"), otherwise a ValueError says the minimum.
- kind='char': an upper bound (0 = no bound): 266 + one piece per corpus character (most frequent
  first). A character-level model over tinyshakespeare has ~266 + 65 pieces. Characters left out
  still round-trip through the byte pieces.
Training text is split into lines, so line breaks are always the single byte pieces <0x0A> / <0x0D>
(one token each) and no learned piece spans a line break.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from solo.files import path as epath_of
from solo.files import write_atomic

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_ID, SEP_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, EOT_ID = 4, 5, 6, 7, 8, 9
SPECIAL_IDS = (
    PAD_ID,
    UNK_ID,
    BOS_ID,
    EOS_ID,
    MASK_ID,
    SEP_ID,
    SYSTEM_ID,
    USER_ID,
    ASSISTANT_ID,
    EOT_ID,
)
NUM_SPECIAL = 10
SPECIAL_PIECES = (
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
)
NUM_BYTES = 256
# Smallest total vocabulary accepted: specials + bytes + a handful of characters.
MIN_VOCAB_SIZE = NUM_SPECIAL + NUM_BYTES + 4
KINDS = ("bpe", "unigram", "char")

# sentencepiece skips training lines longer than max_sentence_length bytes; we cut lines into
# chunks of at most this many characters (<= 4 bytes each) so nothing is silently dropped.
_CHUNK_CHARS = 1000
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS + 16


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Yields non-empty training 'sentences' (lines keep their '\\n' so newlines get a piece)."""
    if isinstance(texts, str):  # a single string is one text, not an iterable of characters
        texts = [texts]
    for text in texts:
        for line in text.splitlines(keepends=True):
            for start in range(0, len(line), _CHUNK_CHARS):
                chunk = line[start : start + _CHUNK_CHARS]
                if chunk.strip("\r\n"):
                    yield chunk


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names it and the fix."""


class Tokenizer:
    """Thin wrapper around a SentencePieceProcessor; picklable (for data-loader workers)."""

    def __init__(
        self, model_proto: bytes, *, path: str | None = None, settings: dict | None = None
    ):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.path = path
        self.settings = dict(settings or {})
        self.kind = self.settings.get("kind")
        if self._sp.get_piece_size() < len(SPECIAL_PIECES):
            raise TokenizerError(f"tokenizer {path}: {self._sp.get_piece_size()} pieces, fewer "
                                 f"than solo's {len(SPECIAL_PIECES)} special ones")
        for i, piece in enumerate(SPECIAL_PIECES):
            got = self._sp.id_to_piece(i)
            if got != piece:
                raise TokenizerError(f"tokenizer {path!r}: id {i} is {got!r}, expected "
                                     f"{piece!r}")

    # --- training / io -------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_prefix: str,
        *,
        kind: str = "bpe",
        vocab_size: int,
        sample_size: int = 1_000_000,
    ) -> Tokenizer:
        """Trains on `texts`, writes `<model_prefix>.model` and `<model_prefix>.json`."""
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {KINDS}")
        lines = list(_training_lines(texts))
        if not lines:
            raise ValueError("cannot train a tokenizer on empty text (no non-empty training lines)")
        requested = vocab_size
        if kind == "char" and vocab_size <= 0:  # no bound: one piece per distinct character
            vocab_size = MIN_VOCAB_SIZE + len(set("".join(lines)))
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"data.tokenizer.vocab_size={vocab_size} is too small: the vocabulary always holds "
                f"{NUM_SPECIAL} special pieces + {NUM_BYTES} byte-fallback pieces, so it must be "
                f">= "
                f'{MIN_VOCAB_SIZE}. For the smallest vocabulary use kind="char" with vocab_size=0 '
                f"(= {NUM_SPECIAL + NUM_BYTES} + number of distinct characters)."
            )
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=writer,
                model_type=kind,
                vocab_size=vocab_size,
                input_sentence_size=sample_size,
                shuffle_input_sentence=True,
                character_coverage=1.0 if kind == "char" else 0.9995,
                byte_fallback=True,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                hard_vocab_limit=kind != "char",
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                control_symbols=list(SPECIAL_PIECES[4:]),
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise _friendly_error(e, kind, vocab_size) from e
        settings = dict(kind=kind, vocab_size=requested, sample_size=sample_size)
        path = os.fspath(model_prefix) + ".model"
        epath_of(path).parent.mkdir(parents=True, exist_ok=True)  # local or gs://
        tok = cls(writer.getvalue(), path=path, settings=settings)
        tok.settings["actual_vocab_size"] = tok.vocab_size
        tok.save(path)
        return tok

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads `<prefix>.model` (and `<prefix>.json` settings when present). A damaged file
        (truncated, emptied, not a sentencepiece model) is a TokenizerError naming it."""
        path = os.fspath(path)
        proto = epath_of(path).read_bytes()  # local or gs:// (solo.files)
        settings = {}
        json_path = epath_of(os.path.splitext(path)[0] + ".json")
        try:
            if json_path.exists():
                settings = json.loads(json_path.read_text())
            return cls(proto, path=path, settings=settings)
        except (RuntimeError, IndexError, ValueError, TypeError) as e:
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(
                f"tokenizer {path} is damaged ({type(e).__name__}: {str(e)[:120]}); copy it "
                "back from the run or file it came from (a workdir's tokenizer must stay the "
                "one its checkpoints were trained with)") from None

    def save(self, path: str) -> str:
        """Writes the .model and its .json settings beside it, each atomically; returns path."""
        write_atomic(path, self._proto)
        write_atomic(os.path.splitext(path)[0] + ".json", json.dumps(self.settings, indent=2))
        return path

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def __getstate__(self):
        return dict(proto=self._proto, path=self.path, settings=self.settings)

    def __setstate__(self, state):
        self.__init__(state["proto"], path=state["path"], settings=state["settings"])

    # --- use -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    # solo's fixed special ids, under the names every tokenizer solo loads answers to
    # (data/hf_tokenizer.py gives a pretrained model's): transforms, the sampler and the chat
    # template read them here, never as constants
    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID
    cls_id, sep_id, mask_id = BOS_ID, SEP_ID, MASK_ID
    special_ids = frozenset(SPECIAL_IDS)
    chat_template = None  # solo's own template (data/chat.py)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: end of text and solo's end of turn."""
        return (EOS_ID, EOT_ID)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def encode(self, text: str) -> list[int]:
        """Text -> ids; no BOS/EOS, never a special id (control pieces are not matched in text)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=2) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Special ids and ids >= vocab_size (padded model vocab) are dropped."""
        n = self.vocab_size
        keep = [int(i) for i in ids if NUM_SPECIAL <= int(i) < n]
        return self._sp.decode(keep)

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"


def _friendly_error(e: RuntimeError, kind: str, vocab_size: int) -> Exception:
    msg = str(e)
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return ValueError(
            f"data.tokenizer.vocab_size={vocab_size} is too large for this corpus: a {kind} "
            f"tokenizer trained on it supports at most vocab_size={m.group(2)}. Lower "
            f"data.tokenizer.vocab_size (or train on more text)."
        )
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return ValueError(
            f"data.tokenizer.vocab_size={vocab_size} is too small: the corpus needs at least "
            f"{m.group(2)} pieces ({NUM_SPECIAL} specials + {NUM_BYTES} bytes + its distinct "
            f'characters). Raise data.tokenizer.vocab_size, or use kind="char" (vocab_size=0).'
        )
    return ValueError(f"sentencepiece training failed ({kind}, vocab_size={vocab_size}): {msg}")
