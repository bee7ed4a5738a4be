"""Writing files so that nothing already written is lost: every file solo writes goes through
`write_atomic` (a temporary file beside the target, flushed and fsynced, then renamed over it),
so a crash or a full disk leaves either the old file or the new one, never a torn one.

Paths may be local or remote (`gs://bucket/run`, any `etils.epath` scheme): `path(p)` is the one
way workdir code turns a string into a path object, and `is_remote` tells the two apart. On an
object store (GCS, S3) a rename is a copy then a delete, not atomic: write-then-rename is still
the best there is (a reader sees the old object or the whole new one; objects are written whole,
never torn), and it keeps one code path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
    """A local or remote (gs://, s3://) path as an `etils.epath.Path`."""
    return p if isinstance(p, epath.Path) else epath.Path(p)


def is_remote(p: PathLike) -> bool:
    """True for an object-store URI (gs://...), False for a local path."""
    return "://" in os.fspath(p)


def join(p: PathLike, *parts: str) -> str:
    """os.path.join that keeps a URI's scheme (gs://a + b = gs://a/b); returns a str."""
    return os.fspath(path(p).joinpath(*parts))


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


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


def write_atomic(p: PathLike, data: str | bytes) -> None:
    """Replaces `p` with `data` atomically (POSIX rename); the directory must exist. Remote
    paths: written to a temporary object beside it, then renamed (see the module docstring)."""
    data = data.encode() if isinstance(data, str) else data
    if is_remote(p):
        target = path(p)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            tmp.write_bytes(data)
            tmp.replace(target)  # epath's rename refuses an existing target
        except BaseException:
            with contextlib.suppress(Exception):
                tmp.unlink(missing_ok=True)
            raise
        return
    p = os.fspath(p)
    directory = os.path.dirname(os.path.abspath(p))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(p)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # an ordinary file's mode (mkstemp's is 0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
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


def copy_atomic(src: PathLike, dst: PathLike) -> None:
    write_atomic(dst, read_bytes(src))
