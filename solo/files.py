"""Writing files so that nothing already written is lost: every file solo writes goes through
`write_atomic` (a temporary file beside the target, flushed and fsynced, then renamed over it),
so a crash or a full disk leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def staged_dir(target: str, prefix: str = ".staging-"):
    """Yields a new directory beside `target` (an ordinary directory's mode; mkdtemp's is 0700)
    to write in full; on success it is renamed to `target` (which must be absent or empty), on
    any error removed: the result is all there or not at all."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without setting it (os.umask would race with writer threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


def write_atomic(path: str, data: str | bytes) -> None:
    """Replaces `path` with `data` atomically (POSIX rename); the directory must exist."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # an ordinary file's mode (mkstemp's is 0600)
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
