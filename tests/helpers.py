"""Helpers the tests share: configs built from experiments/base.py, the one home of defaults."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from solo.config import RunConfig
from solo.data.config import DataConfig
from solo.experiments.base import get_config
from solo.model import ModelConfig


def model_config(**overrides) -> ModelConfig:
    """base.py's model section with `overrides` (give vocab_size: base's 0 means 'tokenizer's')."""
    return ModelConfig.from_config(get_config().model, **overrides)


def data_config(config=None, **overrides) -> DataConfig:
    """The typed data section of `config` (default: base.py's), with `overrides` replaced."""
    return DataConfig.from_config(config or get_config()).replace(**overrides)


def run_config(config=None) -> RunConfig:
    return RunConfig.from_config(config or get_config())


@contextlib.contextmanager
def serving(app):
    """A real uvicorn server on a free localhost port, in a thread; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
