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
def staged_dir(target: str, prefix: str = ".staging-", commit: tuple[str, ...] = ()):
    """Yields a new directory beside `target` (an ordinary directory's mode; mkdtemp's is 0700)
    to write in full; on success it is renamed to `target` (which must be absent or empty), on
    any error removed: the result is all there or not at all.

    A remote `target` (gs://): the directory is a local temporary one, uploaded on success by
    `upload_tree` with the files named in `commit` last (see there for what that guarantees)."""
    if is_remote(target):
        tmp = tempfile.mkdtemp(prefix=prefix)
        try:
            yield tmp
            upload_tree(tmp, target, commit)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
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


COMMIT_MARKERS = ("commit_success.txt",)  # Orbax's mark of a finished checkpoint on GCS


def upload_tree(local: str, target: PathLike, commit: tuple[str, ...] = ()) -> None:
    """Copies the local directory `local` to the remote directory `target` (absent or empty).

    An object store cannot rename a directory (a rename is a copy then a delete per object), so
    there is no atomic publish of many objects; what it does give is that each object appears
    whole or not at all. So the upload is ordered: ordinary files first, then Orbax's
    commit_success.txt markers (a checkpoint counts only once its marker exists), then the
    top-level files named in `commit` (a workdir's config.json, an HF directory's config.json),
    which readers look for first. A crash mid-upload leaves a directory without them (`solo`
    reports it as no workdir; transformers as no model); any other error removes what was
    uploaded."""
    dst = path(target)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty (a partial upload?); remove "
                              "it or choose another destination")
    files = sorted(os.path.relpath(os.path.join(d, f), local)
                   for d, _, names in os.walk(local) for f in names)
    rank = lambda rel: (2 if rel in commit else 1 if os.path.basename(rel) in COMMIT_MARKERS
                        else 0)
    done: list[epath.Path] = []
    try:
        for rel in sorted(files, key=rank):  # stable: the sorted order within each rank
            out = dst.joinpath(*rel.split(os.sep))
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(local, rel), "rb") as f, out.open("wb") as g:
                shutil.copyfileobj(f, g, 1 << 24)  # streamed: checkpoints may be large
            done.append(out)
    except BaseException:
        for out in reversed(done):
            with contextlib.suppress(Exception):
                out.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def local_file(p: PathLike):
    """`p` as a local file path for readers that need one (memory-mapped GGUF): a remote file
    is downloaded into a temporary directory, removed on exit; a local path is yielded as is."""
    if not is_remote(p):
        yield os.fspath(p)
        return
    tmp = tempfile.mkdtemp(prefix=".download-")
    try:
        local = os.path.join(tmp, path(p).name)
        with path(p).open("rb") as f, open(local, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 24)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
