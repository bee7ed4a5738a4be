"""Input / output guards for the chat agent, configured per experiment via `config.agent`.

Settings come from `config.agent` (defaults in experiments/base.py). Every decision is logged on
logger
'solo.guards' (refusals and edits at INFO, plain allows at DEBUG) and returned as a
`GuardDecision`.

Role-marker forging needs no rewriting: chat content always goes through `tokenizer.encode`,
which never emits control ids, so a user typing '<|assistant|>' produces plain text tokens. The
input guard records that it saw such text (reason 'role_marker_text'); the output guard cuts a
reply at the first role-marker *text* as well (the sampler already stops at the control ids).
Streamed replies are guarded as they grow, in the same decision (agent/streaming.RowText).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

from solo.agent.config import AgentConfig
from solo.data.tokenizer import SPECIAL_PIECES

log = logging.getLogger("solo.guards")

ROLE_MARKER_TEXTS = tuple(p for p in SPECIAL_PIECES if p.startswith("<|")) + ("</s>",)


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """The guard settings of `config.agent` (AgentConfig); 0 / () mean no limit."""

    max_input_chars: int  # 0: unlimited
    blocked_patterns: tuple[str, ...]  # regexes, case-insensitive, on input and output
    refusal: str
    max_output_chars: int  # 0: unlimited (the token budget still applies)

    @classmethod
    def from_config(cls, agent: AgentConfig) -> GuardConfig:
        return cls(max_input_chars=agent.max_input_chars,
                   blocked_patterns=tuple(agent.blocked_patterns), refusal=agent.refusal,
                   max_output_chars=agent.max_output_chars)


# No limits and no blocked patterns: role-marker text is still cut from replies.
NO_LIMITS = GuardConfig(max_input_chars=0, blocked_patterns=(), refusal="",
                        max_output_chars=0)


@dataclasses.dataclass(frozen=True)
class GuardDecision:
    """stage 'input'|'output'; action 'allow'|'refuse'|'truncate'; text = what to use next
    (the input to send, or the reply to show); reason / pattern explain the action."""

    stage: str
    action: str
    text: str
    reason: str = ""
    pattern: str = ""

    @property
    def allowed(self) -> bool:
        return self.action != "refuse"


# What can make a match in a reply's beginning not one in the whole reply: "secret$" matches
# "the secret" but not "the secrets"; likewise \Z (\z from Python 3.14), \b, \B and lookaheads
# (conservatively, anywhere in the pattern, escaped or not).
_END_SENSITIVE = re.compile(r"\$|\\[ZzbB]|\(\?[=!]")


class Guards:
    """cfg: limits and patterns; markers: the chat template's control-token texts (a reply is
    cut at the first one; default solo's role markers)."""

    def __init__(self, cfg: GuardConfig = NO_LIMITS, markers: Sequence[str] = ROLE_MARKER_TEXTS):
        self.cfg = cfg
        self.markers = tuple(m for m in markers if m)
        self._patterns = [(p, re.compile(p, re.IGNORECASE), bool(_END_SENSITIVE.search(p)))
                          for p in self.cfg.blocked_patterns]

    @classmethod
    def from_config(cls, agent: AgentConfig, markers: Sequence[str] = ROLE_MARKER_TEXTS
                    ) -> Guards:
        return cls(GuardConfig.from_config(agent), markers)

    def _decide(self, decision: GuardDecision) -> GuardDecision:
        quiet = decision.action == "allow" and not decision.reason
        level = logging.DEBUG if quiet else logging.INFO
        log.log(level, "guard %s: %s (%s%s)", decision.stage, decision.action,
                decision.reason or "ok", f", pattern={decision.pattern!r}" if decision.pattern
                else "")
        return decision

    def blocked_match(self, text: str, *, partial: bool = False) -> tuple[str, int] | None:
        """The blocked pattern whose match in text ends first (ties: the first listed), and where
        it ends; None if none. Ending first, a match is found in the same place whether the
        reply is searched as it grows or whole. `partial`: text may still grow, so only patterns
        whose match no later text can undo are tried; one with an end anchor, a word boundary
        or a lookahead waits for the whole reply."""
        found = None
        for src, pat, end_sensitive in self._patterns:
            m = None if partial and end_sensitive else pat.search(text)
            if m and (found is None or m.end() < found[1]):
                found = src, m.end()
        return found

    def _blocked(self, text: str) -> str | None:
        match = self.blocked_match(text)
        return None if match is None else match[0]

    def check_input(self, text: str) -> GuardDecision:
        cfg = self.cfg
        if cfg.max_input_chars and len(text) > cfg.max_input_chars:
            return self._decide(GuardDecision("input", "refuse", cfg.refusal, "too_long"))
        pattern = self._blocked(text)
        if pattern is not None:
            return self._decide(GuardDecision("input", "refuse", cfg.refusal, "blocked_pattern",
                                              pattern))
        if any(m in text for m in self.markers):
            # Allowed: it is encoded as plain text, so it cannot open a new turn.
            return self._decide(GuardDecision("input", "allow", text, "role_marker_text"))
        return self._decide(GuardDecision("input", "allow", text))

    def check_output(self, text: str) -> GuardDecision:
        """The output guard on a whole reply: cut at the first role-marker text, then at
        max_output_chars, then refused if a blocked pattern is in what is left. A streamed
        reply gets the same decision chunk by chunk (agent/streaming.RowText)."""
        cfg, reasons = self.cfg, []
        cut = min((text.find(m) for m in self.markers if m in text), default=-1)
        if cut >= 0:  # the model wrote a role marker as text: the turn ends there
            text, reasons = text[:cut], ["role_marker_text"]
        if cfg.max_output_chars and len(text) > cfg.max_output_chars:
            text, reasons = text[: cfg.max_output_chars], ["too_long"]
        return self.output_decision(text, reasons, self._blocked(text))

    def output_decision(self, text: str, reasons: Sequence[str], pattern: str | None
                        ) -> GuardDecision:
        """The (logged) decision on a reply already cut (`reasons`: the cuts made) in which
        `pattern` (None: none) was found."""
        if pattern is not None:
            return self._decide(GuardDecision("output", "refuse", self.cfg.refusal,
                                              "blocked_pattern", pattern))
        action = "truncate" if reasons else "allow"
        return self._decide(GuardDecision("output", action, text, ",".join(reasons)))

    def check_messages(self, messages: Sequence[dict]) -> GuardDecision:
        """Input guard over the user messages of a request (server)."""
        for m in messages:
            if m.get("role") == "user":
                d = self.check_input(m["content"])
                if not d.allowed:
                    return d
        return GuardDecision("input", "allow", "")
