"""Fixtures shared by several test files."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _unraisable_hook():
    """solo/cli.main run in-process installs its unraisable-exception filter (each call wraps the
    hook again); the next test gets the hook it started with."""
    saved = sys.unraisablehook
    yield
    sys.unraisablehook = saved


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// served by fsspec's in-memory filesystem (etils.epath's gs:// backend is fsspec)."""
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]  # its own, not the process-wide memory:// store

        def __init__(self, *args, finalize_on_close=False, **kwargs):
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).replace("gs://", "memory://", 1))

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS
    for name in ("gs", "gcs"):  # back to fsspec's lazy entry (gcsfs, if installed)
        sys.modules["fsspec.registry"]._registry.pop(name, None)
    backend.fsspec_backend._get_filesystem.cache_clear()
