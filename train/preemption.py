"""Stop training cleanly on SIGTERM (preemption) or Ctrl-C: finish the step, checkpoint it, exit.

A preempted VM or a batch scheduler sends SIGTERM some seconds before it kills the job; Ctrl-C
sends SIGINT. Either sets a flag that the train loop reads after every step: it then saves a
checkpoint of that step (state and data position, like a periodic one), waits for the write and
raises `Stopped`; `solo train` prints where it stopped and exits with 128 + the signal number.
Running the same command again resumes there, bit-identical to a run that never stopped. A
second Ctrl-C interrupts at once; the latest complete checkpoint is still intact (saves are
atomic).

With several processes (multi-host), a signal to one of them is not acted on: stopping alone
would leave the others waiting in a collective. They stop together at jax's preemption sync
point instead (`CheckpointManager.reached_preemption`, which needs `jax.distributed`).
"""

from __future__ import annotations

import signal
import sys
import threading


class Stopped(Exception):
    """Training stopped at `step` (checkpointed) because of signal `signum`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}, which is checkpointed; run the "
                         "same command to resume from it")


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT request a stop (`signum` is then set).

    Handlers are installed only from the main thread (Python allows no other) and not for a
    signal the process ignores (nohup, background jobs); elsewhere this is inert and signals keep
    their previous meaning. Nested uses restore what they replaced.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. nohup / background jobs
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop waiting for the step to end
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint"
              + (" (Ctrl-C again to interrupt now)" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)
