"""Pretrained models' tokenizers (Hugging Face `tokenizers`) behind solo's `Tokenizer` interface.

A pretrained model only works with the tokenizer it was trained with, so solo loads that tokenizer
instead of training its own: from a `tokenizer.json` directory (as `transformers` saves it), from
GPT-2's `encoder.json` + `vocab.bpe`, or from the metadata a GGUF model file embeds. `HFTokenizer`
offers what solo's sentencepiece `Tokenizer` offers (encode, encode_batch, decode, vocab_size,
pieces, special ids, save, pickling for data-loader workers) with the same two promises:

- `encode` never yields a special (control) id: text that spells one ("<|im_start|>",
  "<|endoftext|>") is encoded as ordinary text (the backend's `encode_special_tokens`), so a user
  cannot forge a turn boundary. No BOS/EOS is added. Non-special added tokens (llama.cpp's
  "user-defined" ones, e.g. "<think>") are matched in text, as transformers and llama.cpp do.
- `decode` drops special ids (and ids outside the vocabulary, e.g. a model's padded vocab) and is
  the exact inverse of `encode` for a byte-level tokenizer whose vocabulary holds all 256 bytes
  (GPT-2 does). Some vocabularies lack a few bytes (SmolLM2 lacks 21: 0x04, 0x06, 0x13, 0x14,
  0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5..0xff); the BPE model, like transformers' and
  llama.cpp's, drops characters made of them, so `missing_bytes` lists them and only text free of
  them round-trips.

`vocab_size` is the size of the id space (max id + 1, added tokens included): what a model's
embedding needs. Named special tokens (bos/eos/pad/unk/cls/sep/mask) answer as `*_id` (None where
the model has none), as solo's own tokenizer does; `add_bos` says whether the model's documents
start with BOS, `stop_ids` which ids end a generation (eos, and the chat template's end of turn).
`encode_with_offsets(text, specials=True)` recognises special tokens: chat templates
(solo.data.templates) use it for the text the template itself writes.

GGUF files name their pre-tokenizer (the regex that cuts text into words before BPE) in
`tokenizer.ggml.pre`; `from_gguf` uses the regexes llama.cpp uses for that name. For SmolLM2
("smollm") that isolates every digit first, as the original tokenizer.json (Digits + ByteLevel)
does; transformers' GGUF loader does not know "smollm" and uses GPT-2's regex, which tokenizes
whitespace before a digit differently ("a  1"). `from_gguf(path, pre="gpt-2")` reproduces it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from solo.data.tokenizer import SPECIAL_PIECES, Tokenizer, TokenizerError
from solo.files import join, write_atomic
from solo.files import path as epath_of

# The named special tokens transformers knows (`SPECIAL_TOKENS_ATTRIBUTES`); chat templates see
# each one that is set as a variable of the same name.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
GPT2_EOT = "<|endoftext|>"

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special (never matched in text by
# `encode`, dropped by `decode`); USER_DEFINED ones are added tokens matched in text.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name (src/llama-vocab.cpp), applied in
# order, each splitting the pieces the previous one left (a llama.cpp regex list == a `tokenizers`
# Sequence of Split(..., "isolated")). Written in tokenizer.json's spelling; llama.cpp's `(?:'[sS]
# |...)` rewrite of `(?i:'s|...)` is the same set. The bool is llama.cpp's `ignore_merges`: a word
# that is itself a vocabulary token is taken whole.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _names(names: str, regexes: tuple[str, ...], ignore_merges: bool = False) -> dict:
    return {name: (regexes, ignore_merges) for name in names.split()}


GGUF_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **_names("gpt-2 phi-2 mpt olmo jais exaone4 trillion granite-docling", (_GPT2,)),
    **_names("starcoder refact command-r smollm codeshell exaone minerva-7b", (r"\p{N}", _GPT2)),
    **_names("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", (_LLAMA3,),
             True),
    **_names("dbrx smaug-bpe", (_LLAMA3,)),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2", (_QWEN2,)),
    **_names("gpt-4o llama4 kanana2 talkie minimax-m2", (_GPT4O,)),
    **_names("tekken", (_TEKKEN,), True),
}


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: how byte-level vocabularies spell bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@lru_cache(maxsize=1)
def _alphabet_chars() -> frozenset[str]:
    return frozenset(byte_alphabet().values())


@lru_cache(maxsize=1)
def _alphabet_bytes() -> dict[str, int]:
    """byte_alphabet inverted: a byte-level character -> the byte it spells."""
    return {c: b for b, c in byte_alphabet().items()}


def _byte_spelling(token: str) -> str:
    """`token` in the byte alphabet (tokens a GGUF stores as raw text, e.g. some added ones)."""
    if set(token) <= _alphabet_chars():
        return token
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def _token_text(value: Any) -> str | None:
    """A named token as transformers writes it: a string, or an AddedToken dict with content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _writes_first(processor: dict | None, token: str) -> bool:
    """Whether a tokenizer.json post-processor starts a single sequence with `token`."""
    if not processor:
        return False
    if processor.get("type") == "Sequence":
        return any(_writes_first(p, token) for p in processor.get("processors", []))
    if processor.get("type") != "TemplateProcessing" or not processor.get("single"):
        return False
    first = processor["single"][0]
    return first.get("SpecialToken", {}).get("id") == token


class HFTokenizer:
    """A `tokenizers.Tokenizer` with solo's tokenizer interface; picklable (via its JSON)."""

    kind = "hf"

    def __init__(
        self,
        tokenizer_json: str,
        *,
        named_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        path: str | None = None,
        add_bos: bool | None = None,
    ):
        self._json = tokenizer_json
        self.path = path
        self.chat_template = chat_template
        self.named_tokens = {k: v for k, v in (named_tokens or {}).items() if v is not None}
        unknown = set(self.named_tokens) - set(NAMED_TOKENS)
        if unknown:
            raise ValueError(f"unknown named tokens {sorted(unknown)}; valid: {NAMED_TOKENS}")
        spec = json.loads(tokenizer_json)
        # Internal copies: no truncation/padding, and no post-processor (it only adds specials,
        # which encode never does, or trims offsets, which chat templates need untrimmed).
        spec.update(truncation=None, padding=None, post_processor=None)
        plain_json = json.dumps(spec)
        self._plain = Backend.from_str(plain_json)
        self._plain.encode_special_tokens = True  # text spelling a special token stays text
        self._marked = Backend.from_str(plain_json)  # recognises special tokens (templates)
        added = spec.get("added_tokens") or []
        self._special_added = frozenset(t["id"] for t in added if t.get("special"))
        self._added_text = {t["id"]: t["content"] for t in added if not t.get("special")}
        vocab = self._plain.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        ids = {}
        for name, token in self.named_tokens.items():
            i = self._plain.token_to_id(token)
            if i is None:
                raise TokenizerError(f"tokenizer {path}: {name} {token!r} is not in its "
                                     "vocabulary; fix the tokenizer config or pass the right files")
            ids[name] = i
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.pad_id: int | None = ids.get("pad_token")
        self.unk_id: int | None = ids.get("unk_token")
        self.cls_id: int | None = ids.get("cls_token")
        self.sep_id: int | None = ids.get("sep_token")
        self.mask_id: int | None = ids.get("mask_token")
        self.special_ids: frozenset[int] = self._special_added | frozenset(ids.values())
        # whether the model's documents start with BOS (transformers' add_bos_token, llama.cpp's
        # tokenizer.ggml.add_bos_token); unknown: whether the post-processor writes BOS first
        self.add_bos = bool(add_bos) if add_bos is not None else (
            self.bos_id is not None and _writes_first(spec.get("post_processor"),
                                                      self.named_tokens["bos_token"]))
        self._stop_ids: tuple[int, ...] | None = None
        decoder = spec.get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [
            decoder]
        self._byte_level = any(d.get("type") == "ByteLevel" for d in parts)
        self.missing_bytes: frozenset[int] = frozenset(
            b for b, c in byte_alphabet().items() if c not in vocab) if self._byte_level else (
            frozenset())

    # --- constructors --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, directory: str) -> HFTokenizer:
        """Loads a directory as transformers saves it: tokenizer.json, plus the named tokens from
        tokenizer_config.json / special_tokens_map.json and the chat template from
        chat_template.jinja, chat_template.json or tokenizer_config.json (first found wins)."""
        tok_path = join(directory, "tokenizer.json")  # local or gs:// (solo.files)
        if not epath_of(tok_path).is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json; expected a directory saved by "
                                 "transformers (save_pretrained) or HFTokenizer.save")

        def read_json(name: str) -> dict:
            p = join(directory, name)
            if not epath_of(p).is_file():
                return {}
            try:
                out = json.loads(epath_of(p).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{p} is not valid JSON ({str(e)[:100]}); restore it from "
                                     "the model's files") from None
            if not isinstance(out, dict):
                raise TokenizerError(f"{p}: expected a JSON object, got {type(out).__name__}")
            return out

        config = read_json("tokenizer_config.json")
        named = {}
        for source in (config, read_json("special_tokens_map.json")):
            for name in NAMED_TOKENS:
                text = _token_text(source.get(name))
                if text is not None:
                    named[name] = text
        template = config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: [{name, template}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        template_json = read_json("chat_template.json").get("chat_template")
        if isinstance(template_json, str):
            template = template_json
        jinja_path = epath_of(join(directory, "chat_template.jinja"))
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        template = template if isinstance(template, str) else None
        add_bos = config.get("add_bos_token")
        text = epath_of(tok_path).read_text(encoding="utf-8")
        try:
            return cls(text, named_tokens=named, chat_template=template, path=directory,
                       add_bos=add_bos if isinstance(add_bos, bool) else None)
        except Exception as e:  # the backend's parse errors are multi-line Rust messages
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"{tok_path} cannot be loaded by tokenizers ("
                                 f"{str(e).splitlines()[0][:120]}); restore it from the model's "
                                 "files") from None

    @classmethod
    def from_gpt2_files(cls, encoder_json: str, vocab_bpe: str) -> HFTokenizer:
        """GPT-2's byte-level BPE from its original `encoder.json` (vocab) and `vocab.bpe`
        (merges); "<|endoftext|>" is BOS and EOS (and the only special token)."""
        for p in (encoder_json, vocab_bpe):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"GPT-2 tokenizer file {p} not found; pass the paths of "
                                        "encoder.json and vocab.bpe")
        try:
            backend = Backend(models.BPE.from_file(encoder_json, vocab_bpe))
        except Exception as e:  # the backend's parse errors are multi-line Rust messages
            raise TokenizerError(f"{encoder_json} / {vocab_bpe} are not GPT-2's BPE files ("
                                 f"{str(e).splitlines()[0][:120]})") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        if backend.token_to_id(GPT2_EOT) is None:
            raise TokenizerError(f"{encoder_json} has no {GPT2_EOT!r}; expected GPT-2's "
                                 "encoder.json")
        backend.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
        return cls(backend.to_str(), named_tokens=dict(bos_token=GPT2_EOT, eos_token=GPT2_EOT),
                   path=os.path.dirname(os.path.abspath(encoder_json)), add_bos=False)

    @classmethod
    def from_gguf(cls, path_or_reader: Any, *, pre: str | None = None) -> HFTokenizer:
        """The tokenizer a GGUF model file embeds (byte-level BPE, tokenizer.ggml.model "gpt2"):
        tokens, merges, token types (control tokens become special, user-defined ones added
        tokens), bos/eos/pad/unk ids, chat template, and the pre-tokenizer llama.cpp uses for
        tokenizer.ggml.pre (`pre` overrides that name). Accepts a path or a gguf.GGUFReader."""
        import gguf  # optional dependency: only GGUF users need it

        reader = path_or_reader
        if not isinstance(reader, gguf.GGUFReader):
            if not os.path.isfile(reader):
                raise FileNotFoundError(f"GGUF file {reader} not found")
            try:
                reader = gguf.GGUFReader(reader)
            except (ValueError, OSError, IndexError) as e:
                raise ValueError(f"{path_or_reader} is not a readable GGUF file "
                                 f"({str(e).splitlines()[0][:100]}); pass a .gguf model file"
                                 ) from None
        where = str(getattr(reader.data, "filename", None) or "GGUF file")

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}; from_gguf supports only "
                             "'gpt2' (byte-level BPE)")
        tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
        if not tokens or not merges:
            raise ValueError(f"{where}: a 'gpt2' tokenizer needs tokenizer.ggml.tokens and "
                             "tokenizer.ggml.merges; the file lacks one")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{where}: {len(types)} token types for {len(tokens)} tokens; the "
                             "file's tokenizer metadata is inconsistent")
        pre = pre or field("tokenizer.ggml.pre")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{where}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; "
                             f"supported: {sorted(GGUF_PRE_TOKENIZERS)} (or pass pre=...)")
        regexes, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
        # Ordinary tokens are byte-level spelled; control / user-defined ones keep their text, as
        # they are matched as added tokens, never built by merges.
        added_types = (_UNKNOWN, _CONTROL, _USER_DEFINED)
        vocab = {(t if k in added_types else _byte_spelling(t)): i
                 for i, (t, k) in enumerate(zip(tokens, types, strict=True))}
        pairs = []
        for m in merges:
            pair = m.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{where}: merge {m!r} is not two tokens separated by one space")
            pairs.append(tuple(pair))
        try:
            bpe = models.BPE(vocab, pairs, ignore_merges=ignore_merges, fuse_unk=False)
        except Exception as e:
            raise ValueError(f"{where}: vocabulary and merges do not fit together "
                             f"({str(e).splitlines()[0][:120]})") from None
        backend = Backend(bpe)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        specials = [(i, t) for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                    if k in (_UNKNOWN, _CONTROL)]
        user = [(i, t) for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                if k == _USER_DEFINED]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for _, t in specials])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for _, t in user])
        for i, t in specials + user:
            if backend.token_to_id(t) != i:
                raise ValueError(f"{where}: token {i} {t!r} is listed twice in "
                                 "tokenizer.ggml.tokens; the file's vocabulary is inconsistent")
        named = {}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            i = field(f"tokenizer.ggml.{key}")
            if i is not None:
                if not 0 <= int(i) < len(tokens):
                    raise ValueError(f"{where}: tokenizer.ggml.{key}={i} is outside the "
                                     f"vocabulary (0..{len(tokens) - 1})")
                named[name] = tokens[int(i)]
        add_bos = field("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's default: on for the Llama 3 and Tekken families
            add_bos = ignore_merges
        return cls(backend.to_str(), named_tokens=named,
                   chat_template=field("tokenizer.chat_template"), path=where,
                   add_bos=bool(add_bos))

    # --- io ------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The tokenizer.json text (as loaded or built: post-processor etc. kept)."""
        return self._json

    def save(self, directory: str) -> str:
        """Writes tokenizer.json and tokenizer_config.json (named tokens, chat template) into
        `directory`, each atomically; transformers.AutoTokenizer.from_pretrained loads it."""
        epath_of(directory).mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False,
                                  "add_bos_token": self.add_bos, **self.named_tokens}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_atomic(join(directory, "tokenizer.json"), self._json)
        write_atomic(join(directory, "tokenizer_config.json"),
                     json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    def __getstate__(self) -> dict:
        return dict(json=self._json, named_tokens=self.named_tokens,
                    chat_template=self.chat_template, path=self.path, add_bos=self.add_bos)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["json"], named_tokens=state["named_tokens"],
                      chat_template=state["chat_template"], path=state["path"],
                      add_bos=state["add_bos"])

    # --- use -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: eos, and the chat template's end of turn where there is a
        template (solo.data.templates.JinjaChatTemplate.stop_ids)."""
        if self._stop_ids is None:
            if self.chat_template:
                from solo.data.chat import chat_template

                self._stop_ids = chat_template(self).stop_ids
            else:
                self._stop_ids = () if self.eos_id is None else (self.eos_id,)
        return self._stop_ids

    def id_to_piece(self, i: int) -> str:
        piece = self._plain.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1}) "
                             "or unused")
        return piece

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes token `i` stands for: a byte-level piece spells one byte per character
        (so a piece may be part of a UTF-8 character, which `decode` would turn into U+FFFD);
        any other token, its decoded text."""
        piece = self.id_to_piece(i)
        if self._byte_level and set(piece) <= _alphabet_chars():
            return bytes(_alphabet_bytes()[c] for c in piece)
        return self.decode([i]).encode("utf-8")

    def piece_to_id(self, piece: str) -> int:
        """The piece's id; an unknown piece is unk_id (as sentencepiece), a KeyError without."""
        i = self._plain.token_to_id(piece)
        if i is not None:
            return i
        if self.unk_id is None:
            raise KeyError(f"piece {piece!r} is not in the vocabulary (which has no unk token)")
        return self.unk_id

    def encode(self, text: str) -> list[int]:
        """Text -> ids; no BOS/EOS, never a special id (special-token text is ordinary text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, got {type(text).__name__}")
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a sequence of str")
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(
        self, text: str, *, specials: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets into `text`); `specials=True` recognises special tokens (for
        text a chat template writes, never for user text)."""
        e = (self._marked if specials else self._plain).encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Special ids and ids outside [0, vocab_size) are dropped."""
        n, special = self.vocab_size, self.special_ids
        keep = [i for i in (int(x) for x in ids) if 0 <= i < n and i not in special]
        if not (self._byte_level and self._added_text):
            return self._plain.decode(keep, skip_special_tokens=False)
        # The byte-level decoder would read an added token's text as byte-alphabet characters;
        # such tokens stand for their text verbatim.
        out, run = [], []
        for i in keep:
            text = self._added_text.get(i)
            if text is None:
                run.append(i)
                continue
            if run:
                out.append(self._plain.decode(run, skip_special_tokens=False))
                run = []
            out.append(text)
        if run:
            out.append(self._plain.decode(run, skip_special_tokens=False))
        return "".join(out)

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer | HFTokenizer:
    """solo's own `Tokenizer` for a sentencepiece .model file (ids 0..9 = solo's specials), an
    `HFTokenizer` for a directory holding tokenizer.json (or GPT-2's encoder.json + vocab.bpe)
    or for a .gguf model file."""
    path = os.fspath(path)
    p = epath_of(path)  # a workdir's tokenizer may be remote (gs://): solo.files
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer.from_dir(path)
        if (p / "encoder.json").is_file() and (p / "vocab.bpe").is_file():  # GPT-2's own files
            return HFTokenizer.from_gpt2_files(str(p / "encoder.json"), str(p / "vocab.bpe"))
        raise TokenizerError(f"{path}: directory without tokenizer.json; expected a sentencepiece "
                             ".model file, a directory holding tokenizer.json (or GPT-2's "
                             "encoder.json + vocab.bpe), or a .gguf file")
    if path.endswith(".model") and p.is_file():
        return Tokenizer.load(path)  # checks ids 0..9 are solo's specials
    if path.endswith(".gguf") and p.is_file():
        return HFTokenizer.from_gguf(path)
    what = "does not exist" if not p.exists() else "is not a tokenizer"
    raise TokenizerError(f"{path} {what}; expected a sentencepiece .model file (solo's specials "
                         f"{SPECIAL_PIECES[0]}..{SPECIAL_PIECES[-1]} at ids 0..9), a directory "
                         "holding tokenizer.json, or a .gguf file")
