"""Multi-turn chat on top of `Sampler`, in the tokenizer's chat template (`data.chat`): solo's
own, or a pretrained model's, the same ids SFT trains on.

The prompt is re-encoded from the message history every turn. When history + generation budget
exceed `max_context`, the oldest turns are dropped (a user turn together with the assistant
answer that followed it); the system prompt and the newest user message are always kept.
Generation stops at the template's stop ids (end of turn, end of text, role markers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from solo.agent.guards import GuardDecision, Guards
from solo.agent.sampler import Sampler, Sampling
from solo.data.chat import SoloChatTemplate, chat_template

CHAT_STOP_IDS = SoloChatTemplate.stop_ids  # solo's own template's


class ContextOverflow(ValueError):
    """Even the system prompt + newest user message + budget do not fit the context."""


@dataclasses.dataclass
class ChatStats:
    turns: int = 0  # completed user/assistant exchanges in the history
    prompt_tokens: int = 0  # last prompt's length (tokens in the context window)
    completion_tokens: int = 0  # last reply's length
    total_generated: int = 0
    trimmed_messages: int = 0  # messages dropped to fit the context (cumulative)
    refusals: int = 0
    max_context: int = 0


class ChatSession:
    """Stateful chat: `reply(text) -> str`; `reset()`, `set_system(text)`, `stats`."""

    def __init__(self, sampler: Sampler, system_prompt: str = "", max_context: int = 0, *,
                 max_new_tokens: int = 64, sampling: Sampling | None = None,
                 guards: Guards | None = None, seed: int = 0, chunk: int = 4):
        self.sampler = sampler
        self.tok = sampler.tokenizer
        self.template = chat_template(self.tok)
        self.system_prompt = system_prompt
        self.max_context = min(max_context or sampler.cache_len, sampler.cache_len)
        self.max_new_tokens = int(max_new_tokens)
        self.sampling = sampling or Sampling()
        self.guards = guards or Guards(markers=self.template.marker_texts)
        self.seed = seed
        self.chunk = chunk
        self.history: list[dict] = []
        self.stats = ChatStats(max_context=self.max_context)
        self.last_decisions: list[GuardDecision] = []

    # --- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        self.history = []
        self.stats = ChatStats(max_context=self.max_context)

    def set_system(self, text: str) -> None:
        self.system_prompt = text

    def messages(self, user_text: str | None = None) -> list[dict]:
        msgs = [dict(role="system", content=self.system_prompt)] if self.system_prompt else []
        msgs += self.history
        if user_text is not None:
            msgs.append(dict(role="user", content=user_text))
        return msgs

    def prompt_ids(self, user_text: str) -> list[int]:
        """Template ids for history + user_text, trimming the oldest turns to fit."""
        budget = self.max_context - self.max_new_tokens
        while True:
            ids, _ = self.template.encode(self.messages(user_text), add_generation_prompt=True)
            if len(ids) <= budget:
                return ids
            if not self.history:
                raise ContextOverflow(
                    f"prompt needs {len(ids)} tokens + max_new_tokens={self.max_new_tokens} > "
                    f"context {self.max_context}; shorten the message or the system prompt")
            # drop the oldest exchange: a user message and the replies up to the next user one
            drop = 1
            while drop < len(self.history) and self.history[drop]["role"] != "user":
                drop += 1
            del self.history[:drop]
            self.stats.trimmed_messages += drop

    # --- generation ----------------------------------------------------------------------------

    def reply(self, user_text: str, stream_cb: Callable[[str], None] | None = None) -> str:
        """Answers user_text (guarded), appends the exchange to the history, returns the reply.

        stream_cb(text_delta) receives the reply as it is generated, guarded as it grows
        (agent/streaming.RowText): what it receives is the returned (and remembered) reply.
        """
        self.last_decisions = []
        d_in = self.guards.check_input(user_text)
        self.last_decisions.append(d_in)
        if not d_in.allowed:
            self.stats.refusals += 1
            if stream_cb:
                stream_cb(d_in.text)
            return d_in.text
        ids = self.prompt_ids(user_text)
        cb = None if stream_cb is None else (lambda _row, delta: stream_cb(delta))
        gen = self.sampler.generate([ids], max_new_tokens=self.max_new_tokens,
                                    method=self.sampling, seed=self.seed, stream_cb=cb,
                                    chunk=self.chunk, stop_ids=self.template.stop_ids,
                                    prefix=self.template.reply_prefix,
                                    guards=self.guards, continuation=False)[0]
        self.seed += 1  # a new draw each turn when sampling
        d_out = gen.guard
        self.last_decisions.append(d_out)
        if not d_out.allowed:
            self.stats.refusals += 1
        text = gen.text
        self.history += [dict(role="user", content=user_text),
                         dict(role="assistant", content=text)]
        self.stats.turns = sum(m["role"] == "user" for m in self.history)
        self.stats.prompt_tokens = len(ids)
        self.stats.completion_tokens = len(gen.tokens)
        self.stats.total_generated += len(gen.tokens)
        return text

    def describe_stats(self) -> str:
        s = self.stats
        return (f"turns={s.turns} context={s.prompt_tokens + s.completion_tokens}/{s.max_context} "
                f"tokens (last prompt {s.prompt_tokens}, last reply {s.completion_tokens}) "
                f"generated={s.total_generated} trimmed_messages={s.trimmed_messages} "
                f"refusals={s.refusals}")


def build_sampler(loaded, cache_len: int = 0) -> Sampler:
    """Sampler for `solo.train.inference.load(...)` (cache = model max_len)."""
    return Sampler(loaded.model, loaded.params, loaded.tokenizer,
                   cache_len=cache_len or loaded.model.cfg.max_len,
                   stop_ids=chat_template(loaded.tokenizer).stop_ids)


def build_session(loaded, sampler: Sampler | None = None, **overrides) -> ChatSession:
    """ChatSession configured from config.agent (system prompt, budget, sampling, context,
    guards) and the run's seed; `overrides` (ChatSession keyword arguments) win."""
    agent = loaded.config.agent
    kw = dict(system_prompt=agent.system_prompt, max_context=agent.max_context,
              max_new_tokens=agent.max_new_tokens,
              sampling=Sampling(agent.temperature, agent.top_k, agent.top_p),
              guards=Guards.from_config(agent, chat_template(loaded.tokenizer).marker_texts),
              seed=loaded.config.seed)
    kw.update(overrides)
    return ChatSession(sampler or build_sampler(loaded), **kw)
