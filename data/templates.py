"""Hugging Face chat templates (Jinja) for pretrained models, rendered as transformers renders them.

A pretrained chat model only follows conversations laid out the way it was tuned, and its
tokenizer ships that layout as a Jinja template (`tokenizer.chat_template`). `JinjaChatTemplate`
renders it in a sandboxed environment configured like transformers' `apply_chat_template`
(transformers/utils/chat_template_utils.py: trim_blocks, lstrip_blocks, loop controls, the
`{% generation %}` tag, `raise_exception`, `strftime_now`, a non-escaping `tojson`, guarded `dict`
and `namespace`; variables `messages`, `tools`=None, `documents`=None, `add_generation_prompt` and
the tokenizer's named tokens: bos_token, eos_token, ...), so `render` is byte-identical to
`apply_chat_template(..., tokenize=False)`.

`encode` gives (ids, weights) for training and prompting. Message contents are user text: they are
tokenized as plain text, never as control tokens (a user typing "<|im_end|>" cannot close a turn).
The conversation is rendered twice, once as is and once with a unique sentinel for each message's
content; the sentinel rendering shows which characters the template wrote and where each content
sits (verbatim, or stripped of surrounding whitespace as Llama 3's `| trim` does). Special tokens
are recognised only in the template's own text; the text between two such tokens (template text
and contents together, exactly the stretches transformers tokenizes as units) is tokenized with
special tokens not recognised. For contents that spell no control token the ids therefore equal
`apply_chat_template(..., tokenize=True)`'s (merges across a template/content boundary included).

Weights are 1.0 on every token overlapping an assistant message's content (as transformers'
assistant masks count overlap) plus the template tokens after it up to and including the first
stop id (what the model must emit to end its turn), when that stop id comes before the next
message's content; 0.0 elsewhere.

`stop_ids`: the tokenizer's eos id plus the end-of-turn token the template writes, found by probing:
rendering [user, assistant(sentinel)] and taking the first special token after the sentinel
(ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, ...). The same probe yields
`reply_prefix` (what the template writes between the generation prompt and a reply, "" for
ChatML), the text between a reply and its end-of-turn token (`reply_text` strips both from decoded
generated text), and `marker_texts` (the control tokens the template writes, and eos).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from solo.data.hf_tokenizer import HFTokenizer

ROLES = ("system", "user", "assistant")
Message = dict  # {'role': 'system'|'user'|'assistant', 'content': str}


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: no HTML escaping, and these options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` / `dict.fromkeys(...)` in templates, without the dict type's attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore-prefixed attributes (no path to CPython internals)."""

    def __init__(*args, **kwargs):  # jinja's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    return env


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Copies of the messages after checking them; one-line ValueErrors name the problem."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is a {type(m).__name__}, expected a dict with 'role' "
                             "and 'content'")
        if set(m) != {"role", "content"}:
            raise ValueError(f"message {i} has keys {sorted(m)}; expected exactly 'role' and "
                             "'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; valid roles: {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content is a {type(m['content']).__name__}, expected "
                             "str")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class JinjaChatTemplate:
    """A Hugging Face chat template bound to the tokenizer it belongs to (see module doc)."""

    def __init__(self, tokenizer: HFTokenizer, template: str):
        if not isinstance(template, str) or not template.strip():
            raise ValueError("chat template is empty; pass the model's tokenizer.chat_template")
        self.tokenizer = tokenizer
        self.template = template
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse (line {e.lineno}: {e.message})"
                             ) from None
        self._variables = dict(tokenizer.named_tokens)
        self._probe()

    @classmethod
    def from_tokenizer(cls, tokenizer: HFTokenizer) -> JinjaChatTemplate:
        if not tokenizer.chat_template:
            raise ValueError(f"tokenizer {tokenizer.path} has no chat template; pass one "
                             "explicitly (JinjaChatTemplate(tokenizer, template))")
        return cls(tokenizer, tokenizer.chat_template)

    def __getstate__(self) -> dict:
        return dict(tokenizer=self.tokenizer, template=self.template)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"], state["template"])

    # --- rendering -----------------------------------------------------------------------------

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        try:
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=bool(add_generation_prompt),
                                         **self._variables)
        except jinja2.TemplateError as e:  # raise_exception(...), undefined names, sandbox
            msg = " ".join(str(e).split())
            raise ValueError(f"chat template rejected the messages: {msg}") from None
        except (TypeError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
            msg = " ".join(str(e).split())[:200]
            raise ValueError(f"chat template failed on the messages ({type(e).__name__}: "
                             f"{msg}); check the template") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as apply_chat_template(..., tokenize=False) gives it."""
        return self._render(validate_messages(messages), add_generation_prompt)

    def _content_spans(self, messages: list[Message], text: str,
                       add_generation_prompt: bool) -> dict[int, tuple[int, int]]:
        """Message index -> (start, end) of its content in `text` (the real rendering)."""
        nonce = uuid.uuid4().hex
        marked = [{"role": m["role"], "content": f"\ue000{nonce}:{k}\ue001"}
                  for k, m in enumerate(messages)]
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", self._render(marked, add_generation_prompt))
        pieces, order = parts[0::2], [int(k) for k in parts[1::2]]
        if len(set(order)) != len(order):
            raise ValueError("chat template writes a message's content more than once; encode() "
                             "needs each content written at most once")
        spans: list[tuple[int, int]] = []

        def walk(j: int, pos: int) -> bool:  # pieces[j] at pos, then content j (some form)
            if not text.startswith(pieces[j], pos):
                return False
            pos += len(pieces[j])
            if j == len(order):
                return pos == len(text)
            c = messages[order[j]]["content"]
            for form in dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())):
                if text.startswith(form, pos):
                    spans.append((pos, pos + len(form)))
                    if walk(j + 1, pos + len(form)):
                        return True
                    spans.pop()
            return False

        if not walk(0, 0):
            raise ValueError("chat template changes message contents (or branches on them) "
                             "beyond stripping whitespace; encode() cannot locate the contents")
        return dict(zip(order, spans, strict=True))

    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[float]]:
        """(ids, weights): the rendered conversation's ids, contents tokenized as plain text;
        weights 1.0 on assistant contents and their end-of-turn tokens (module doc)."""
        messages = validate_messages(messages)
        text = self._render(messages, add_generation_prompt)
        spans = self._content_spans(messages, text, add_generation_prompt)
        content = sorted(spans.values())

        def in_content(a: int, b: int) -> bool:
            return any(s < b and a < e for s, e in content)

        tok = self.tokenizer
        # Special tokens the template wrote: recognised in the whole text, kept only where their
        # own text (not whitespace an lstrip/rstrip token absorbs) lies outside every content.
        cuts = []
        for i, (a, b) in zip(*tok.encode_with_offsets(text, specials=True), strict=True):
            if i in tok.special_ids:
                core = tok.id_to_piece(i)
                start = text.find(core, a, b) if core else -1
                start = a if start < 0 else start
                if not in_content(start, start + max(len(core), 1)):
                    cuts.append((a, b, i))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for a, b, i in [*cuts, (len(text), len(text), None)]:
            if a > pos:  # a run of template text and contents, specials not recognised
                run_ids, run_offsets = tok.encode_with_offsets(text[pos:a])
                ids += run_ids
                offsets += [(pos + s, pos + e) for s, e in run_offsets]
            if i is not None:
                ids.append(i)
                offsets.append((a, b))
            pos = max(pos, b)
        weights = [0.0] * len(ids)
        starts = sorted(s for s, _ in content)
        for k, (s, e) in spans.items():
            if messages[k]["role"] != "assistant":
                continue
            inside = [j for j, (a, b) in enumerate(offsets) if a < e and s < b and s < e]
            for j in inside:
                weights[j] = 1.0
            # then the template's tokens up to the first stop id, if before the next content
            nxt = next((x for x in starts if x >= e and x > s), len(text))
            j = inside[-1] + 1 if inside else next(
                (j for j, (a, _) in enumerate(offsets) if a >= s), len(ids))
            first = j
            while j < len(ids) and offsets[j][0] < nxt:
                if ids[j] in self._stop_ids:
                    weights[first:j + 1] = [1.0] * (j + 1 - first)
                    break
                j += 1
        return ids, weights

    # --- generation ----------------------------------------------------------------------------

    def _probe(self) -> None:
        """Renders [user, assistant(sentinel)] (after a system message if the template insists)
        to find the end-of-turn token, what surrounds a reply, and the control tokens the template
        writes (module doc). A template that renders no probe leaves eos alone."""
        tok = self.tokenizer
        eos = () if tok.eos_id is None else (tok.eos_id,)
        self._stop_ids, self.reply_prefix, self._reply_suffix = eos, "", ""
        self._markers = [tok.id_to_piece(i) for i in eos]
        sentinel = f"\ue000{uuid.uuid4().hex}\ue001"
        reply = {"role": "assistant", "content": sentinel}
        for convo in ([{"role": "user", "content": "Hi."}],
                      [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi."}]):
            try:
                prompt = self._render(convo, True)
                full = self._render([*convo, reply], False)
            except ValueError:
                continue
            if full.count(sentinel) == 1:
                break
        else:
            return
        at = full.index(sentinel)
        for text in (full[:at], full[at + len(sentinel):]):
            ids, _ = tok.encode_with_offsets(text, specials=True)
            self._markers += [tok.id_to_piece(i) for i in ids if i in tok.special_ids]
        self._markers = list(dict.fromkeys(self._markers))
        if full.startswith(prompt):
            self.reply_prefix = full[len(prompt):at]
        after = full[at + len(sentinel):]
        ids, offsets = tok.encode_with_offsets(after, specials=True)
        for i, (a, _) in zip(ids, offsets, strict=True):
            if i in tok.special_ids:
                self._stop_ids = tuple(dict.fromkeys((*eos, i)))
                self._reply_suffix = after[:a]
                break

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: eos, then the template's end-of-turn token."""
        return self._stop_ids

    @property
    def marker_texts(self) -> tuple[str, ...]:
        """The texts of the control tokens the template writes, and of eos: a generated reply
        that spells one as plain text is starting a turn of its own (agent guards cut there)."""
        return tuple(self._markers)

    def reply_text(self, text: str) -> str:
        """The assistant's visible text from text decoded from generated ids (up to a stop id):
        without what the template writes around a reply (`reply_prefix` before it, e.g. Llama
        2's space, and the text between a reply and its end-of-turn token), where present."""
        if self.reply_prefix and text.startswith(self.reply_prefix):
            text = text[len(self.reply_prefix):]
        if self._reply_suffix and text.endswith(self._reply_suffix):
            text = text[:-len(self._reply_suffix)]
        return text

    def __repr__(self) -> str:
        return f"JinjaChatTemplate(tokenizer={self.tokenizer!r}, stop_ids={sorted(self.stop_ids)})"
