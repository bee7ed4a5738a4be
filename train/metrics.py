"""Metric logging: metrics.jsonl, TensorBoard events, and a live progress line on stderr.

MFU (model FLOP utilisation):
    MFU = flops_per_token * tokens_per_second / (peak_flops_per_device * num_devices)
with `flops_per_token` from `model.flops_per_token(cfg, seq_len)` (6N + attention, fwd+bwd) and
tokens counted as every position of every row processed (padding included: MFU measures the
hardware, not the data). The peak comes from the one table, `train/peaks.py`, for the run's
compute dtype (an accelerator's data sheet; a CPU's cores x clock x vector FLOPs;
`SOLO_PEAK_FLOPS` overrides). Unknown accelerators report MFU as NaN.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax

from solo.files import is_remote, join, path, write_atomic


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int,
        peak: float | None = None, dtype: str = "bfloat16") -> float:
    """Model FLOP utilisation; `peak` per device, by default train/peaks.py's for `dtype`."""
    if peak is None:
        from solo.train.peaks import peak_flops

        peak = peak_flops(dtype)[0]
    return flops_per_token * tokens_per_sec / (peak * num_devices)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


class MetricWriter:
    """Appends to <workdir>/metrics.jsonl and TensorBoard (<workdir>/events.*). Process 0 only.

    The TensorBoard file is created with the first scalar (a run killed before it leaves none).
    A resumed run calls `truncate(step)` first: rows of steps after the restored checkpoint were
    written by the run that died and are redone, so they go (and a torn last line with them)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.workdir = os.fspath(workdir)
        self.path = join(workdir, "metrics.jsonl")
        self._tb = None
        self._tb_failed = False

    def _board(self):
        if self._tb is None and not self._tb_failed:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(logdir=self.workdir, flush_secs=30)
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional
                self._tb_failed = True
                print(f"warning: TensorBoard disabled ({e})", file=sys.stderr)
        return self._tb

    def truncate(self, step: int) -> None:
        """Drops the rows of steps after `step` (and any torn line)."""
        if not self.enabled or not path(self.path).exists():
            return
        lines = path(self.path).read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line torn by a crash
        if len(keep) != len(lines):
            write_atomic(self.path, "".join(k + "\n" for k in keep))

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: _clean(float(v)) for k, v in
                                                     metrics.items()}}
        line = json.dumps(row) + "\n"
        if is_remote(self.path):  # object stores cannot append: the file is rewritten whole
            p = path(self.path)
            write_atomic(p, (p.read_text() if p.exists() else "") + line)
        else:
            with open(self.path, "a") as f:
                f.write(line)
        board = self._board()
        if board is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    board.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """One status line: in place on a TTY ('\\r'), plain lines otherwise (logs, CI). Process 0
    only: the other processes of a multi-host run would print the same lines."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = int(total), stream or sys.stderr
        if jax.process_index() != 0:
            self.stream = _Discard()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()
        self._open = False

    def update(self, step: int, loss: float, tokens_per_sec: float, sec_per_step: float,
               extra: str = "") -> None:
        eta = max(self.total - step, 0) * sec_per_step
        line = (f"step {step}/{self.total}  loss {loss:.4g}  {tokens_per_sec:,.0f} tok/s  "
                f"ETA {_hms(eta)}{('  ' + extra) if extra else ''}")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _hms(sec: float) -> str:
    if not math.isfinite(sec):
        return "?"
    sec = int(sec)
    return f"{sec // 3600:d}:{sec % 3600 // 60:02d}:{sec % 60:02d}"
