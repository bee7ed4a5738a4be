"""`AgentConfig`: the frozen, validated `config.agent` section (keys and defaults:
experiments/base.py): the chat agent's sampling, context and guards."""

from __future__ import annotations

import dataclasses

from solo.config import ConfigError


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    system_prompt: str
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_k: int  # 0: off
    top_p: float  # 1: off
    max_input_chars: int  # 0: unlimited
    max_output_chars: int  # 0: no cap beyond max_new_tokens
    max_context: int  # chat history budget in tokens (0: the model's max_len)
    blocked_patterns: tuple[str, ...]
    refusal: str
    eval_questions: int  # 0: every held-out question
    sample_prompts: tuple[str, ...]  # `solo train` prints their continuations at the end

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"agent.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("agent sampling needs temperature >= 0, top_k >= 0, "
                              "0 < top_p <= 1")
        if min(self.max_input_chars, self.max_output_chars, self.max_context,
               self.eval_questions) < 0:
            raise ConfigError("agent limits (max_input_chars, max_output_chars, max_context, "
                              "eval_questions) must be >= 0")
