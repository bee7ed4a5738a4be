"""Interactive chat loop over a `ChatSession`.

TTY: shows a banner and a '> ' prompt, streams the reply token by token, Ctrl-C during a reply
abandons it (history unchanged) and returns to the prompt, Ctrl-D or /quit exits.
Pipe (non-TTY): one reply per input line (not streamed), no prompts or banners; commands
/reset and /system are silent, /stats prints one line. Either way the lines are one
conversation (later questions see earlier answers) unless `one_shot` answers each line afresh.

Commands: /reset (clear history), /system TEXT (set the system prompt and reset),
/stats (turns, tokens used), /quit.
"""

from __future__ import annotations

import sys
from typing import TextIO

from solo.agent.chat import ChatSession, ContextOverflow

HELP = "commands: /reset, /system TEXT, /stats, /quit"


def run_repl(session: ChatSession, input_stream: TextIO | None = None,
             output_stream: TextIO | None = None, *, interactive: bool | None = None,
             one_shot: bool = False) -> int:
    """Runs until EOF or /quit; returns the number of replies produced. one_shot: every input
    line is a new conversation (the history is cleared before each reply)."""
    inp = input_stream or sys.stdin
    out = output_stream or sys.stdout
    if interactive is None:
        interactive = bool(getattr(inp, "isatty", lambda: False)())
    write = lambda s: (out.write(s), out.flush())
    if interactive:
        write(f"solo chat — {HELP}\n")
    replies = 0
    while True:
        if interactive:
            write("> ")
        try:
            line = inp.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: fresh prompt
            write("\n")
            continue
        if not line:  # EOF
            if interactive:
                write("\n")
            return replies
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "/quit":
            return replies
        if cmd == "/reset":
            session.reset()
            if interactive:
                write("[history cleared]\n")
            continue
        if cmd == "/system":
            session.set_system(arg.strip())
            session.reset()
            if interactive:
                write(f"[system prompt set ({len(arg.strip())} chars), history cleared]\n")
            continue
        if cmd == "/stats":
            write(session.describe_stats() + "\n")
            continue
        if cmd.startswith("/") and cmd in ("/help", "/?"):
            write(HELP + "\n")
            continue
        def on_delta(delta: str) -> None:
            write(delta)

        if one_shot:
            session.reset()
        try:  # pipes get the final (guarded) text only: exactly one answer per line
            text = session.reply(line, stream_cb=on_delta if interactive else None)
        except KeyboardInterrupt:
            write("\n[interrupted]\n")
            continue
        except ContextOverflow as e:
            write(f"[error: {e}]\n")
            continue
        if not interactive:  # (a TTY got the reply streamed: it is the guarded reply)
            write(text)
        write("\n")
        replies += 1


def chat(workdir: str, *, checkpoint: str | int = "latest", system: str | None = None,
         max_new_tokens: int | None = None, temperature: float | None = None,
         one_shot: bool = False, input_stream: TextIO | None = None,
         output_stream: TextIO | None = None) -> int:
    """`solo chat`: a REPL over a workdir's checkpoint; None keeps the run's config.agent value.
    one_shot: each input line is answered in a fresh conversation. Returns the number of
    replies."""
    from solo.agent.chat import build_session
    from solo.agent.sampler import Sampling
    from solo.train.inference import load

    loaded = load(workdir, checkpoint)
    agent = loaded.config.agent
    overrides = {}
    if system is not None:
        overrides["system_prompt"] = system
    if max_new_tokens is not None:
        overrides["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        overrides["sampling"] = Sampling(temperature, agent.top_k, agent.top_p)
    return run_repl(build_session(loaded, **overrides), input_stream, output_stream,
                    one_shot=one_shot)
