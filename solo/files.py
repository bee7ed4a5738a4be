"""Writing files so that nothing already written is lost: every file solo writes goes through
`write_atomic` (a temporary file beside the target, flushed and fsynced, then renamed over it),
so a crash or a full disk leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomic(path: str, data: str | bytes) -> None:
    """Replaces `path` with `data` atomically (POSIX rename); the directory must exist."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def copy_atomic(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        write_atomic(dst, f.read())
